"""Canonical encodings: RFC 8785 JSON for normalised fields, deterministic
protobuf for the Transaction leaf. The same input always gives the same bytes;
tests/vectors pins them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import msgspec

from gateway._pb.edgegateway.v1 import transaction_pb2

JsonValue: TypeAlias = (
    "bool | int | float | str | Sequence[JsonValue] | Mapping[str, JsonValue] | None"
)

# RFC 8785 serialises numbers as IEEE 754 doubles; integers beyond 2**53 would
# silently lose precision in any verifier that follows it, so they are refused.
MAX_SAFE_INTEGER = 2**53 - 1


class CanonicalError(ValueError):
    """A value has no RFC 8785 form (NaN, Infinity, unsafe integer, non-string key)."""


def _number(value: float) -> str:
    """ECMAScript Number.prototype.toString, as RFC 8785 section 3.2.2.3 requires."""
    if math.isnan(value) or math.isinf(value):
        raise CanonicalError(f"{value!r} has no JSON form")
    if value == 0:
        return "0"
    # Below 2**53 an integral double's exact digits are its shortest digits; above,
    # ECMAScript pads the shortest digits with zeros (2.0**68 -> 295147905179352830000).
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    sign = "-" if value < 0 else ""
    # repr gives the shortest round-trip digits; lay them out as ECMAScript does:
    # digits d1..dk with the decimal point after position n.
    text = repr(abs(value))
    mant, _, exp_text = text.partition("e")
    int_part, _, frac_part = mant.partition(".")
    digits = (int_part + frac_part).lstrip("0")
    point = len(int_part) + (int(exp_text) if exp_text else 0)
    point -= len(int_part + frac_part) - len((int_part + frac_part).lstrip("0"))
    digits = digits.rstrip("0") or "0"
    k, n = len(digits), point
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * (-n) + digits
    e = n - 1
    exp = f"e{'+' if e >= 0 else '-'}{abs(e)}"
    if k == 1:
        return sign + digits + exp
    return sign + digits[0] + "." + digits[1:] + exp


def _string(value: str) -> str:
    out = ['"']
    for ch in value:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif o < 0x20:
            out.append({8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r"}.get(o, f"\\u{o:04x}"))
        elif 0xD800 <= o <= 0xDFFF:
            raise CanonicalError("lone surrogate in string")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _encode(value: object, out: list[str], depth: int) -> None:
    # depth counts the arrays and objects around `value`; at most 64 may nest.
    if depth >= 64 and isinstance(value, Mapping | Sequence) and not isinstance(value, str):
        raise CanonicalError("nested deeper than 64 levels")
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise CanonicalError(f"integer {value} is beyond 2**53 and has no exact JSON form")
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, Mapping):
        keys = list(value.keys())
        if not all(isinstance(k, str) for k in keys):
            raise CanonicalError("object keys must be strings")
        # RFC 8785 3.2.3: sort by UTF-16 code units.
        # surrogatepass: a lone surrogate reaches _string and is refused there.
        keys.sort(key=lambda k: k.encode("utf-16-be", "surrogatepass"))
        out.append("{")
        for i, k in enumerate(keys):
            if i:
                out.append(",")
            out.append(_string(k))
            out.append(":")
            _encode(value[k], out, depth + 1)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out, depth + 1)
        out.append("]")
    else:
        raise CanonicalError(f"{type(value).__name__} has no JSON form")


def _plain(value: object, depth: int) -> bool:
    """True when the stdlib encoder's output equals RFC 8785 for `value`: ASCII keys
    (code-point order is then UTF-16 order), no floats, safe integers, no lone
    surrogates, nesting within bounds."""
    if depth > 64:
        return False
    if value is None or value is True or value is False:
        return True
    if isinstance(value, int):
        return -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER
    if isinstance(value, str):
        if value.isascii():
            return True
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(
            isinstance(k, str) and k.isascii() and _plain(v, depth + 1) for k, v in value.items()
        )
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    return False


def _flat_plain(value: dict[Any, Any]) -> bool:
    """_plain for the common payload, a flat object of ASCII keys and plain scalars,
    without a call per member; anything else goes to _plain."""
    for k, v in value.items():
        t = type(v)
        if t is int:
            if not -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
                return False
        elif t is str:
            if not v.isascii():
                return _plain(value, 1)  # UTF-8 (and no lone surrogate) checked there
        elif not (v is None or t is bool):
            return _plain(value, 1)
        if type(k) is not str or not k.isascii():
            return False
    return True


# msgspec's encoder with sorted keys: for plain values (see _plain) its bytes are RFC 8785's
# (it escapes exactly '"', '\\' and control characters, as \b \t \n \f \r or lowercase
# \u00xx, and keeps the rest as UTF-8), at a tenth of the stdlib encoder's cost.
_MS_SORTED = msgspec.json.Encoder(order="sorted").encode


def canonical_json(value: object) -> bytes:
    """RFC 8785 JSON Canonicalization Scheme bytes of `value`."""
    if (
        _flat_plain(value)
        if type(value) is dict
        else _plain(value, 1 if isinstance(value, dict | list) else 0)
    ):
        if isinstance(value, dict | list):
            return _MS_SORTED(value)
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8"
        )
    out: list[str] = []
    _encode(value, out, 0)
    return "".join(out).encode("utf-8")


def transaction_bytes(tx: transaction_pb2.Transaction) -> bytes:
    """The leaf bytes of a transaction: deterministic protobuf, fields in number order."""
    return tx.SerializeToString(deterministic=True)


def tx_id(leaf: bytes) -> str:
    """Hex RFC 9162 leaf hash SHA-256(0x00 || leaf): the transaction's id."""
    return hashlib.sha256(b"\x00" + leaf).hexdigest()
