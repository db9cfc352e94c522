"""The compiled JSON paths (gateway.edge.profiles.builtin._flat_object for json@1,
gateway.edge.profiles.strictjson._compiled for firmware profiles) answer exactly as the
strict stdlib paths do: same values, same refusals, word for word."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.common import resources
from gateway.common.errors import Rejected
from gateway.edge.profiles import builtin, strictjson


def strict(payload: bytes) -> Any:
    """The strict path alone."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected("bad_encoding", f"payload is not UTF-8 (byte {e.start})") from None
    try:
        return builtin._DECODER.decode(text)
    except (ValueError, RecursionError) as e:
        raise Rejected("not_decodable", f"payload is not JSON: {e}") from None


def outcome(fn: Any, payload: bytes) -> tuple[str, str]:
    try:
        value = fn(payload)
    except Rejected as r:
        return ("rejected", str(r))
    # repr tells -0.0 from 0, 1.0 from 1 and keeps key order.
    return ("value", repr(value))


TRICKY = [
    b'{"seq":1,"time":2,"a":3}',
    b'{"seq": 1, "time": 2}',
    b'{"a":1,"a":2}',
    b'{"a":1,"a":1}',
    b'{"a":-0}',
    b'{"a":-0.0}',
    b'{"a":1e5}',
    b'{"a":1E5}',
    b'{"a":1.0}',
    b'{"a":1e400}',
    b'{"a":NaN}',
    b'{"a":Infinity}',
    b'{"a":123456789012345678901234567890}',
    b'{"a":"\\u0065"}',
    b'{"\\u0061":1}',
    b'{"a":"\\/"}',
    b'{"a":"\\ud800"}',
    b'{"a":"\xff"}',
    b'{"a":"\xc3\xa9\\n\\u0001"}',
    b'{"a":[1,2]}',
    b'{"a":{"b":1}}',
    b"[1,2]",
    b"1",
    b'{"a":1} ',
    b' {"a":1}',
    b'{"a":1}x',
    b"\xef\xbb\xbf{}",
    b"{}",
    b"[" * 5000 + b"]" * 5000,
]


@pytest.mark.parametrize("payload", TRICKY)
def test_tricky_payloads_answer_as_the_strict_path(payload: bytes) -> None:
    assert outcome(builtin.parse_json, payload) == outcome(strict, payload)


def test_duplicate_members_are_refused() -> None:
    with pytest.raises(Rejected, match="duplicate key 'a'"):
        builtin.parse_json(b'{"a":1,"a":1}')


def test_the_common_payload_takes_the_fast_path() -> None:
    doc = builtin._flat_object(b'{"seq":7,"time":1700000000000,"kind":"m","v":-3,"ok":true}')
    assert doc == {"seq": 7, "time": 1700000000000, "kind": "m", "v": -3, "ok": True}


_scalar = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _scalar, max_size=6), st.sampled_from([0, 1, 2]))
def test_flat_objects_answer_as_the_strict_path(doc: dict[str, Any], style: int) -> None:
    import json

    separators = [(",", ":"), (", ", ": "), (",", ": ")][style]
    payload = json.dumps(doc, separators=separators, ensure_ascii=style == 1).encode()
    assert outcome(builtin.parse_json, payload) == outcome(strict, payload)
    got = builtin.parse_json(payload)
    for k, v in doc.items():
        assert type(got[k]) is type(v)
        if isinstance(v, float) and not math.isnan(v):
            assert math.copysign(1, got[k]) == math.copysign(1, v)


def strict_profiles(payload: bytes) -> Any:
    """strictjson's strict path alone."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected("bad_encoding", f"payload is not UTF-8 (byte {e.start})") from None
    try:
        return strictjson._DECODER.decode(text)
    except RecursionError:
        raise Rejected("not_decodable", "JSON nested too deeply") from None
    except ValueError as e:
        raise Rejected("not_decodable", f"payload is not JSON: {e}") from None


PROFILE_TRICKY = [
    *TRICKY,
    b'{"a":{"b":[1,{"c":2}]}}',
    b'{"a":{"b":1,"b":2}}',
    b'{"a":[18446744073709551615]}',
    b'{"a":[18446744073709551616]}',
    b'{"a":{"b":-9223372036854775808}}',
    b'{"a":{"b":-9223372036854775809}}',
    b'{"a":[1e308,2.5,-0.0]}',
    b"[" * 40 + b"]" * 40,
]


@pytest.mark.parametrize("payload", PROFILE_TRICKY)
def test_profile_json_answers_as_the_strict_path(payload: bytes) -> None:
    assert outcome(strictjson.parse, payload) == outcome(strict_profiles, payload)


def test_profile_samples_answer_as_the_strict_path() -> None:
    samples = sorted(Path(resources.profiles_dir(), "samples").glob("*/*.json"))
    assert samples
    for path in samples:
        payload = path.read_bytes()
        assert outcome(strictjson.parse, payload) == outcome(strict_profiles, payload), path


_json = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(_json, st.sampled_from([0, 1, 2]))
def test_nested_documents_answer_as_the_strict_path(doc: Any, style: int) -> None:
    import json

    separators = [(",", ":"), (", ", ": "), (",", ": ")][style]
    payload = json.dumps(doc, separators=separators, ensure_ascii=style == 1).encode()
    assert outcome(strictjson.parse, payload) == outcome(strict_profiles, payload)
