"""Structured logs: one logfmt event per line on stdout, for journald.

Ours, not a library's: logfmter and structlog's LogfmtRenderer leave line separators unescaped
(U+2028 and NEL; structlog also CR and NUL), so one event could read as two lines, and
logfmter writes every `extra` attribute of a record, where this writes only ts, level, logger,
msg and exc, so nothing passed beside a message (a device's identity) reaches a log.
"""

from __future__ import annotations

import logging
import sys
import time


def _escape(c: str) -> str:
    if c in '\\"':
        return "\\" + c
    if c.isprintable():
        return c
    return c.encode("unicode_escape").decode("ascii")  # \n, \r, \t, \x00, \u2028, ...


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-_./:@" for c in value):
        return value
    if value.isprintable():  # the common case, quickly
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return '"' + "".join(map(_escape, value)) + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={_quote(record.name)}",
            f"msg={_quote(record.getMessage())}",
        ]
        if record.exc_info and record.levelno >= logging.ERROR:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class RateLimit(logging.Filter):
    """Let the same message template through at most `burst` times per `window_s`."""

    def __init__(self, burst: int = 5, window_s: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._seen: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.msg)
        now = time.monotonic()
        start, count = self._seen.get(key, (now, 0))
        if now - start > self.window_s:
            start, count = now, 0
        count += 1
        self._seen[key] = (start, count)
        if count == self.burst + 1:
            record.msg = f"{record.msg} (repeats suppressed for {int(self.window_s)} s)"
        return count <= self.burst + 1


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LogfmtFormatter())
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and paho are chatty at debug; keep them at warning.
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
