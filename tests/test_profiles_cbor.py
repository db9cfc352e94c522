"""The strict CBOR decoder and deterministic encoder, checked against cbor2.

cbor2 is an independent RFC 8949 implementation: whatever our decoder accepts,
cbor2 must read as the same value; whatever cbor2 writes from plain values,
our decoder must read back. Our decoder is stricter on purpose (no tags, no
duplicate keys, no undefined, bounded depth) and says why with a reason code.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.common.errors import Rejected
from gateway.edge.profiles import cbor
from gateway.edge.profiles.reasons import REASONS

keys = st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=8))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=25,
)
FAST = settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def same(a: Any, b: Any) -> bool:
    """Equality that tells 1 from 1.0 and True from 1, and -0.0 from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@FAST
@given(values)
def test_cbor2_reads_what_we_write_and_we_read_what_cbor2_writes(v: Any) -> None:
    ours = cbor.encode(v)
    assert same(cbor2.loads(ours), v)
    assert same(cbor.decode(ours), v)
    assert same(cbor.decode(cbor2.dumps(v)), v)


@FAST
@given(values)
def test_encoding_is_deterministic_per_rfc8949_4_2_1(v: Any) -> None:
    ours = cbor.encode(v)
    assert cbor.encode(cbor.decode(ours)) == ours
    if not isinstance(v, dict | list):
        # For scalars cbor2's canonical mode is the same shortest-form encoding.
        assert ours == cbor2.dumps(v, canonical=True)
    if isinstance(v, dict):
        # Core deterministic order: keys sorted by their encoded bytes (cbor2's canonical
        # mode sorts by length first, RFC 7049's rule).
        encoded = [cbor.encode(k) for k in v]
        assert [cbor.encode(k) for k in cbor.decode(ours)] == sorted(encoded)


@settings(max_examples=3000, derandomize=True, deadline=None, database=None)
@given(st.binary(max_size=64))
def test_whatever_we_accept_cbor2_reads_the_same(data: bytes) -> None:
    try:
        ours = cbor.decode(data)
    except Rejected as r:
        assert r.reason in REASONS
        return
    assert same(cbor2.loads(data), ours)


@pytest.mark.parametrize(
    ("hexdata", "reason"),
    [
        ("", "not_decodable"),
        ("18", "not_decodable"),  # truncated argument
        ("1c", "not_decodable"),  # reserved additional information
        ("5f", "not_decodable"),  # unterminated indefinite string
        ("5f6161ff", "not_decodable"),  # text chunk inside a byte string
        ("7f5f", "not_decodable"),
        ("ff", "not_decodable"),  # break outside indefinite item
        ("a1ff01", "not_decodable"),
        ("a20101", "not_decodable"),  # truncated map
        ("a2010101 02".replace(" ", ""), "not_decodable"),  # duplicate key
        ("a1f401", "not_decodable"),  # bool key
        ("a1a00101", "not_decodable"),  # map key
        ("c11a5e0be100", "not_decodable"),  # tag 1: tags are refused
        ("c249010000000000000000", "out_of_range"),  # bignum
        ("c349010000000000000000", "out_of_range"),
        ("f7", "not_decodable"),  # undefined
        ("f0", "not_decodable"),  # simple value 16
        ("f818", "not_decodable"),  # two-byte simple value 24: not well-formed
        ("f8ff", "not_decodable"),
        ("f97e00", "out_of_range"),  # NaN
        ("f97c00", "out_of_range"),  # +Infinity
        ("fbfff0000000000000", "out_of_range"),  # -Infinity
        ("62c328", "bad_encoding"),  # invalid UTF-8
        ("63eda080", "bad_encoding"),  # encoded surrogate
        ("0000", "not_decodable"),  # trailing bytes
        ("9bffffffffffffffff", "not_decodable"),  # absurd array length
        ("5bffffffffffffffff", "not_decodable"),  # absurd string length
    ],
)
def test_refusals(hexdata: str, reason: str) -> None:
    with pytest.raises(Rejected) as ei:
        cbor.decode(bytes.fromhex(hexdata))
    assert ei.value.reason == reason


def test_depth_limit() -> None:
    ok = b"\x81" * cbor.MAX_DEPTH + b"\x00"
    assert cbor.decode(ok) is not None
    for deep in (b"\x81" * (cbor.MAX_DEPTH + 1) + b"\x00", b"\x9f" * 100_000, b"\xbf\x01" * 50_000):
        with pytest.raises(Rejected, match="nested deeper"):
            cbor.decode(deep)


def test_rfc8949_appendix_a_examples() -> None:
    # A selection of RFC 8949 Appendix A: (diagnostic value, hex).
    cases: list[tuple[Any, str]] = [
        (0, "00"),
        (23, "17"),
        (24, "1818"),
        (1000000, "1a000f4240"),
        (18446744073709551615, "1bffffffffffffffff"),
        (-18446744073709551616, "3bffffffffffffffff"),
        (-1000, "3903e7"),
        (0.0, "f90000"),
        (-0.0, "f98000"),
        (1.1, "fb3ff199999999999a"),
        (65504.0, "f97bff"),
        (100000.0, "fa47c35000"),
        (5.960464477539063e-8, "f90001"),
        (-4.1, "fbc010666666666666"),
        ("\u6c34", "63e6b0b4"),
        (b"\x01\x02\x03\x04", "4401020304"),
        ([1, [2, 3], [4, 5]], "8301820203820405"),
        ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    ]
    for value, hexdata in cases:
        assert cbor.encode(value).hex() == hexdata
        assert same(cbor.decode(bytes.fromhex(hexdata)), value)
    assert cbor.decode(bytes.fromhex("5f42010243030405ff")) == b"\x01\x02\x03\x04\x05"
    assert cbor.decode(bytes.fromhex("7f657374726561646d696e67ff")) == "streaming"
    assert cbor.decode(bytes.fromhex("9f018202039f0405ffff")) == [1, [2, 3], [4, 5]]
    assert cbor.decode(bytes.fromhex("bf61610161629f0203ffff")) == {"a": 1, "b": [2, 3]}
    assert math.isinf(struct.unpack(">e", bytes.fromhex("7c00"))[0])
