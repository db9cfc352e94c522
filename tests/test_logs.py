"""The log line format: one logfmt event per line, whatever a message holds."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest

from gateway.common.logs import LogfmtFormatter, RateLimit

_VALUE = r'"(?:[^"\\]|\\.)*"|[^\s"=]+'
_PAIR = re.compile(rf"([a-z]+)=({_VALUE})(?: |$)")
_ESCAPE = re.compile(r'\\(["\\nrt]|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})')
_NAMED = {"n": "\n", "r": "\r", "t": "\t"}


def parse(line: str) -> dict[str, str]:
    """The pairs of one logfmt line; fails unless the whole line is pairs."""
    pairs: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        m = _PAIR.match(line, pos)
        assert m, f"unparseable at {pos}: {line!r}"
        key, value = m[1], m[2]
        assert key not in pairs, f"{key} twice: {line!r}"
        if value.startswith('"'):
            value = _ESCAPE.sub(_unescape, value[1:-1])
        pairs[key] = value
        pos = m.end()
    return pairs


def _unescape(m: re.Match[str]) -> str:
    e = m[1]
    return _NAMED.get(e) or (e if len(e) == 1 else chr(int(e[1:], 16)))


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(LogfmtFormatter())
    handler.addFilter(RateLimit(burst=2))
    log = logging.getLogger("gateway.test_logs")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log, out
    log.handlers.clear()
    log.propagate = True


MESSAGES = [
    "ready",
    "a=b c=d",
    'say "hi"',
    "two\nlines",
    "carriage\rreturn",
    "tab\there",
    "nul\x00byte",
    "line\u2028separator",
    "next\x85line",
    "back\\slash",
    'back\\"quote\\n',
    'all "of\\ them"\n=\r\x00',
    "",
    "Grüße, 東京",
    "msg=forged level=error",
]


@pytest.mark.parametrize("message", MESSAGES)
def test_any_message_is_one_line_of_pairs_that_reads_back(
    logger: tuple[logging.Logger, io.StringIO], message: str
) -> None:
    log, out = logger
    log.info("%s", message)
    text = out.getvalue()
    line = text.removesuffix("\n")
    assert text.endswith("\n") and line.isprintable(), repr(text)  # no NUL, CR, U+2028, ...
    pairs = parse(line)
    assert list(pairs) == ["ts", "level", "logger", "msg"]
    assert pairs["msg"] == message
    assert pairs["level"] == "info" and pairs["logger"] == "gateway.test_logs"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", pairs["ts"])


def test_a_traceback_is_one_exc_value_at_error_and_left_out_below(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = logger
    try:
        raise ValueError('bad "value"\nsecond line')
    except ValueError:
        log.warning("expected failure", exc_info=True)
        log.exception("unexpected failure")
    warning, error = out.getvalue().splitlines()
    assert list(parse(warning)) == ["ts", "level", "logger", "msg"]
    pairs = parse(error)
    assert list(pairs) == ["ts", "level", "logger", "msg", "exc"]
    assert pairs["exc"].startswith("Traceback (most recent call last):\n")
    assert pairs["exc"].endswith('ValueError: bad "value"\nsecond line')


def test_only_the_fixed_keys_are_written_nothing_passed_beside_the_message(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = logger
    log.warning("rejected", extra={"device_id": "310150123456789", "client_id": "dev-7"})
    line = out.getvalue()
    assert list(parse(line.rstrip("\n"))) == ["ts", "level", "logger", "msg"]
    assert "310150123456789" not in line and "dev-7" not in line


def test_a_template_is_rate_limited_whatever_its_arguments(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = logger
    for n in range(10):
        log.warning("connect failed: attempt %d", n)
        log.info("progress %d", n)
    lines = out.getvalue().splitlines()
    warnings = [parse(ln)["msg"] for ln in lines if "level=warning" in ln]
    assert warnings == [
        "connect failed: attempt 0",
        "connect failed: attempt 1",
        "connect failed: attempt 2 (repeats suppressed for 60 s)",
    ]
    assert sum("level=info" in ln for ln in lines) == 10
