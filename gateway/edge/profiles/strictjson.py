"""Strict JSON for firmware profiles, and RFC 6901 JSON pointers.

Stricter than RFC 8259 requires, because a ledger must not record one payload
that two readers understand differently: UTF-8 only, no duplicate member
names, no NaN or Infinity, no integer beyond 64 bits, no number that
overflows a double, bounded nesting. Every refusal is a Rejected.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec

from gateway.common.errors import Rejected

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
# Longest decimal text of a 64-bit integer, sign included: anything longer is
# refused before int() is asked to build it.
_INT_TEXT_MAX = 21


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise Rejected("not_decodable", f"duplicate member name {k[:64]!r}")
            seen.add(k)
    return out


def _int(text: str) -> int:
    if len(text) > _INT_TEXT_MAX:
        raise Rejected("out_of_range", f"integer of {len(text)} digits is beyond 64 bits")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise Rejected("out_of_range", f"integer {text} is beyond 64 bits")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Rejected("out_of_range", f"number {text[:32]} overflows a double")
    return value


def _constant(name: str) -> Any:
    raise Rejected("not_decodable", f"{name} is not a JSON value")


_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs, parse_int=_int, parse_float=_float, parse_constant=_constant
)


# Nesting the compiled path takes; deeper documents take the strict path, which bounds them.
_FAST_DEPTH = 32
_MISS = object()
_MS_DECODE = msgspec.json.decode
_MS_ENCODE = msgspec.json.encode
_MS_FORMAT = msgspec.json.format


def _within(value: Any, depth: int) -> bool:
    """Integers within 64 bits and nesting within _FAST_DEPTH, as the strict path allows."""
    t = type(value)
    if t is int:
        return bool(INT_MIN <= value <= INT_MAX)
    if t is dict:
        items = value.values()
    elif t is list:
        items = value
    else:
        return True
    if depth >= _FAST_DEPTH:
        return False
    for v in items:
        tv = type(v)
        if tv is int:
            if not INT_MIN <= v <= INT_MAX:
                return False
        elif (tv is dict or tv is list) and not _within(v, depth + 1):
            return False
    return True


def _compiled(payload: bytes) -> Any:
    """The document through the compiled parser (msgspec), or _MISS for the strict path.
    Taken only when encoding what was parsed gives the payload's own bytes back,
    whitespace aside: the compiled parser keeps the last of duplicate member names and
    reads some spellings (escapes, exponents, -0) the strict parser reads otherwise, and
    each of those changes the bytes. So what is taken is what the strict path would have
    returned; everything else, refusals included, is answered by the strict path."""
    try:
        doc = _MS_DECODE(payload)
    except (msgspec.DecodeError, RecursionError):
        return _MISS
    if not _within(doc, 0):
        return _MISS
    encoded = _MS_ENCODE(doc)
    if encoded != payload and encoded != _MS_FORMAT(payload, indent=-1):
        return _MISS
    return doc


def parse(payload: bytes) -> Any:
    """Decode one strict JSON text; raise Rejected for anything it refuses."""
    doc = _compiled(payload)
    if doc is not _MISS:
        return doc
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected("bad_encoding", f"payload is not UTF-8 (byte {e.start})") from None
    try:
        return _DECODER.decode(text)
    except RecursionError:
        # The C scanner guards its own recursion: deep nesting ends here, cheaply.
        raise Rejected("not_decodable", "JSON nested too deeply") from None
    except ValueError as e:
        raise Rejected("not_decodable", f"payload is not JSON: {e}") from None


def pointer(text: str) -> tuple[str, ...]:
    """RFC 6901 pointer text to its reference tokens; ValueError if malformed."""
    if text == "":
        return ()
    if not text.startswith("/"):
        raise ValueError("a JSON pointer starts with '/'")
    tokens = []
    for raw in text[1:].split("/"):
        if "~" in raw.replace("~0", "").replace("~1", ""):
            raise ValueError("'~' must be followed by 0 or 1")
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    return tuple(tokens)


def pointer_text(tokens: tuple[str | int, ...]) -> str:
    return "".join("/" + str(t).replace("~", "~0").replace("/", "~1") for t in tokens)
