"""RFC 8785 canonical JSON and the canonical Transaction leaf.

tests/vectors/canonical.json holds the number, value and transaction vectors;
the transaction ones pin the leaf encoding every tx_id and Merkle root rests on.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._pb.edgegateway.v1 import transaction_pb2
from gateway.formats import merkle
from gateway.formats.canonical import (
    MAX_SAFE_INTEGER,
    CanonicalError,
    canonical_json,
    transaction_bytes,
    tx_id,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "canonical.json").read_text(encoding="utf-8")
)
NUMBERS = VECTORS["numbers"]["cases"]
VALUES = VECTORS["values"]["cases"]
TRANSACTIONS = VECTORS["transactions"]["cases"]
BYTES_FIELDS = {"fields", "payload_sha256"}


def _double(bits_hex: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(bits_hex))[0]
    return value


# --------------------------------------------------------------------------
# Numbers: ECMAScript Number.prototype.toString.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", NUMBERS, ids=lambda c: c["ieee754"])
def test_number_vector(case: dict[str, str]) -> None:
    assert canonical_json(_double(case["ieee754"])) == case["canonical"].encode("ascii")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1e21, "1e+21"),
        (1e-7, "1e-7"),
        (0.000001, "0.000001"),
        (-0.0, "0"),
        (333333333.3333333, "333333333.3333333"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (2.0**68, "295147905179352830000"),
        (1e20, "100000000000000000000"),
        (0.5, "0.5"),
        (-2.5e-8, "-2.5e-8"),
        (1.0, "1"),
    ],
)
def test_number_formatting_follows_ecmascript(value: float, text: str) -> None:
    assert canonical_json(value) == text.encode("ascii")


def test_number_vectors_include_rfc_8785_appendix_b_edges() -> None:
    texts = {c["canonical"] for c in NUMBERS}
    assert {"1e+21", "0.000001", "5e-324", "-0.0000033333333333333333"} <= texts


# --------------------------------------------------------------------------
# Values: sorting, escaping, whitespace.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", VALUES, ids=lambda c: c["name"])
def test_value_vector(case: dict[str, str]) -> None:
    out = canonical_json(json.loads(case["input"]))
    assert out == case["canonical"].encode("utf-8")
    assert out.hex() == case["canonical_utf8_hex"]


def test_keys_sort_by_utf16_code_units_not_code_points() -> None:
    # U+1F600 is D83D DE00 in UTF-16, which sorts before U+E000; by code point it would not.
    assert canonical_json({"\ue000": 1, "😀": 2}) == '{"😀":2,"\ue000":1}'.encode()
    assert canonical_json({"😀": 2, "\ue000": 1}) == canonical_json({"\ue000": 1, "😀": 2})


@pytest.mark.parametrize(
    ("char", "escaped"),
    [
        ("\x00", "\\u0000"),
        ("\x08", "\\b"),
        ("\t", "\\t"),
        ("\n", "\\n"),
        ("\x0b", "\\u000b"),
        ("\x0c", "\\f"),
        ("\r", "\\r"),
        ("\x1f", "\\u001f"),
        ('"', '\\"'),
        ("\\", "\\\\"),
        ("/", "/"),
        ("\x7f", "\x7f"),
        ("é", "é"),
        ("\u2028", "\u2028"),
        ("😀", "😀"),
    ],
)
def test_string_escapes(char: str, escaped: str) -> None:
    assert canonical_json(char) == f'"{escaped}"'.encode()


def test_non_ascii_is_kept_as_utf8() -> None:
    assert canonical_json("é€😀") == b'"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"'


def test_tuples_are_arrays_and_bools_are_not_numbers() -> None:
    assert canonical_json((1, True, False, None)) == b"[1,true,false,null]"


# --------------------------------------------------------------------------
# Values without an RFC 8785 form.
# --------------------------------------------------------------------------


def _nested(levels: int, inner: object) -> object:
    value = inner
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        [1.0, math.nan],
        {"a": math.inf},
        MAX_SAFE_INTEGER + 1,
        -(MAX_SAFE_INTEGER + 1),
        2**64,
        {1: "a"},
        {None: "a"},
        {("a",): 1},
        b"bytes",
        {1.5},
        object(),
        "\ud800",
        {"\udc00": 1},
    ],
    ids=repr,
)
def test_values_without_a_json_form_are_refused(value: object) -> None:
    with pytest.raises(CanonicalError):
        canonical_json(value)


def test_largest_safe_integer_is_accepted() -> None:
    assert canonical_json([MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER]) == (
        b"[9007199254740991,-9007199254740991]"
    )


@pytest.mark.parametrize("inner", [[], 0, {}])
def test_nesting_up_to_64_levels_is_accepted(inner: object) -> None:
    canonical_json(_nested(63, inner))  # 63 arrays around inner: 64 levels when inner is one
    canonical_json({"a": _nested(63, 1)})


@pytest.mark.parametrize("inner", [[], 0, {}])
def test_nesting_beyond_64_levels_is_refused(inner: object) -> None:
    levels = 65 if isinstance(inner, int) else 64  # 65 containers either way
    with pytest.raises(CanonicalError, match="64"):
        canonical_json(_nested(levels, inner))
    with pytest.raises(CanonicalError):
        canonical_json(_nested(1000, inner))


# --------------------------------------------------------------------------
# Property: canonical output is a fixed point.
# --------------------------------------------------------------------------

safe_ints = st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | safe_ints | finite_floats | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


def _parse_int_as_ijson(text: str) -> int | float:
    # RFC 8785 reads every number as an IEEE 754 double. An integral double of 2**53 or more
    # prints as plain digits ("9007199254740992"); Python's json would make an int of it,
    # which canonical_json rightly refuses, so such digits are read back as the double.
    n = int(text)
    return n if abs(n) <= MAX_SAFE_INTEGER else float(n)


@settings(max_examples=1000, deadline=None)
@given(json_values)
def test_canonical_json_is_a_fixed_point(value: Any) -> None:
    once = canonical_json(value)
    assert canonical_json(json.loads(once, parse_int=_parse_int_as_ijson)) == once


def test_large_integral_double_prints_as_digits_that_parse_back_to_it() -> None:
    once = canonical_json(2.0**53)
    assert once == b"9007199254740992"
    assert json.loads(once, parse_int=_parse_int_as_ijson) == 2.0**53
    with pytest.raises(CanonicalError):  # the same digits as a Python int are out of range
        canonical_json(json.loads(once))


@settings(max_examples=1000, deadline=None)
@given(finite_floats)
def test_every_finite_double_round_trips(value: float) -> None:
    text = canonical_json(value)
    assert float(text) == value
    assert b" " not in text and not text.endswith(b".0")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), safe_ints, max_size=8))
def test_key_order_does_not_depend_on_insertion_order(d: dict[str, int]) -> None:
    assert canonical_json(d) == canonical_json(dict(reversed(list(d.items()))))


# --------------------------------------------------------------------------
# The Transaction leaf (pinned).
# --------------------------------------------------------------------------


def _tx(fields: dict[str, Any]) -> transaction_pb2.Transaction:
    kw = {k: bytes.fromhex(v) if k in BYTES_FIELDS else v for k, v in fields.items()}
    return transaction_pb2.Transaction(**kw)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 negatives travel as their 64-bit two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _encode_by_hand(fields: dict[str, Any]) -> bytes:
    """The documented leaf encoding, written out: number order, proto3 defaults omitted."""
    schema = [
        (1, "device_id", "str"),
        (2, "device_seq", "int"),
        (3, "device_time_ms", "int"),
        (4, "received_time_ms", "int"),
        (5, "profile", "str"),
        (6, "kind", "str"),
        (7, "fields", "bytes"),
        (8, "payload_sha256", "bytes"),
        (9, "gateway_id", "str"),
        (10, "channel", "str"),
    ]
    out = bytearray()
    for number, name, kind in schema:
        value = fields.get(name)
        if not value:
            continue
        if kind == "int":
            out += _varint(number << 3) + _varint(value)
        else:
            data = value.encode("utf-8") if kind == "str" else bytes.fromhex(value)
            out += _varint(number << 3 | 2) + _varint(len(data)) + data
    return bytes(out)


@pytest.mark.parametrize("case", TRANSACTIONS, ids=lambda c: c["name"])
def test_transaction_leaf_is_pinned(case: dict[str, Any]) -> None:
    leaf = transaction_bytes(_tx(case["transaction"]))
    assert leaf.hex() == case["leaf_hex"]
    assert tx_id(leaf) == case["tx_id"]


@pytest.mark.parametrize("case", TRANSACTIONS, ids=lambda c: c["name"])
def test_transaction_leaf_is_the_documented_encoding(case: dict[str, Any]) -> None:
    assert _encode_by_hand(case["transaction"]).hex() == case["leaf_hex"]


@pytest.mark.parametrize("case", TRANSACTIONS, ids=lambda c: c["name"])
def test_tx_id_is_the_merkle_leaf_hash(case: dict[str, Any]) -> None:
    leaf = bytes.fromhex(case["leaf_hex"])
    assert tx_id(leaf) == hashlib.sha256(b"\x00" + leaf).hexdigest()
    assert tx_id(leaf) == merkle.leaf_hash(leaf).hex()


def test_transaction_vectors_cover_defaults_and_extremes() -> None:
    assert any(c["leaf_hex"] == "" for c in TRANSACTIONS)
    assert any(c["transaction"].get("device_seq") == 2**64 - 1 for c in TRANSACTIONS)
    assert any(c["transaction"].get("device_time_ms", 0) < 0 for c in TRANSACTIONS)


def test_field_assignment_order_does_not_change_the_leaf() -> None:
    case = TRANSACTIONS[0]["transaction"]
    forward = _tx(case)
    backward = transaction_pb2.Transaction()
    for name in reversed(list(case)):
        value = case[name]
        setattr(backward, name, bytes.fromhex(value) if name in BYTES_FIELDS else value)
    assert transaction_bytes(backward) == transaction_bytes(forward)
    parsed = transaction_pb2.Transaction.FromString(transaction_bytes(forward))
    assert transaction_bytes(parsed) == transaction_bytes(forward)


def test_fields_carry_canonical_json() -> None:
    fields = bytes.fromhex(TRANSACTIONS[0]["transaction"]["fields"])
    assert canonical_json(json.loads(fields)) == fields
