"""CBOR (RFC 8949): a strict decoder for device payloads, a deterministic encoder.

The decoder accepts the part of CBOR that maps onto JSON values and refuses the
rest with a Rejected, never another exception: integers within 64 bits, byte
and text strings (definite or indefinite), arrays, maps keyed by integers or
text with no duplicate key, false/true/null, and finite floats. It refuses
every tag (bignums 2 and 3 as out_of_range), undefined, simple values,
reserved additional information, invalid UTF-8, and nesting deeper than
MAX_DEPTH. General-purpose libraries keep the last of duplicate map keys and
materialise tags (regular expressions, MIME messages, shared references) from
untrusted input; a ledger's input validator may do neither.

The encoder writes RFC 8949 section 4.2.1 core deterministic encoding: shortest
heads, definite lengths, map keys sorted by their encoded bytes, floats in the
shortest of half, single and double precision that keeps the value.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.common.errors import Rejected

MAX_DEPTH = 16

_HALF = struct.Struct(">e")
_SINGLE = struct.Struct(">f")
_DOUBLE = struct.Struct(">d")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class _Break:
    """The 0xff stop code; only meaningful inside an indefinite-length item."""


_BREAK = _Break()


def _bad(detail: str) -> Rejected:
    return Rejected("not_decodable", f"CBOR: {detail}")


class _Reader:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)

    def _argument(self, ai: int, at: int) -> int:
        data, pos = self.data, self.pos
        if ai < 24:
            return ai
        if ai == 24:
            if pos + 1 > self.end:
                raise _bad(f"truncated at byte {at}")
            self.pos = pos + 1
            return data[pos]
        if ai == 25:
            if pos + 2 > self.end:
                raise _bad(f"truncated at byte {at}")
            self.pos = pos + 2
            return int(_U16.unpack_from(data, pos)[0])
        if ai == 26:
            if pos + 4 > self.end:
                raise _bad(f"truncated at byte {at}")
            self.pos = pos + 4
            return int(_U32.unpack_from(data, pos)[0])
        if ai == 27:
            if pos + 8 > self.end:
                raise _bad(f"truncated at byte {at}")
            self.pos = pos + 8
            return int(_U64.unpack_from(data, pos)[0])
        raise _bad(f"reserved additional information {ai} at byte {at}")

    def item(self, depth: int) -> Any:
        at = self.pos
        if at >= self.end:
            raise _bad(f"truncated at byte {at}")
        ib = self.data[at]
        self.pos = at + 1
        major, ai = ib >> 5, ib & 0x1F
        if major == 7:
            return self._simple(ai, at)
        if ai == 31:
            return self._indefinite(major, depth, at)
        arg = self._argument(ai, at)
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2 or major == 3:
            start = self.pos
            if arg > self.end - start:
                raise _bad(f"truncated: string of {arg} bytes at byte {at}")
            self.pos = start + arg
            chunk = self.data[start : start + arg]
            return chunk if major == 2 else _text(chunk, at)
        if major == 4:
            if depth >= MAX_DEPTH:
                raise _bad(f"nested deeper than {MAX_DEPTH} levels")
            # Each item takes at least one byte: a count beyond what is left is a lie.
            if arg > self.end - self.pos:
                raise _bad(f"truncated: array of {arg} items at byte {at}")
            items: list[Any] = []
            for _ in range(arg):
                v = self.item(depth + 1)
                if v is _BREAK:
                    raise _bad(f"break inside a definite-length array at byte {at}")
                items.append(v)
            return items
        if major == 5:
            if depth >= MAX_DEPTH:
                raise _bad(f"nested deeper than {MAX_DEPTH} levels")
            if arg > (self.end - self.pos) // 2:
                raise _bad(f"truncated: map of {arg} pairs at byte {at}")
            m: dict[int | str, Any] = {}
            for _ in range(arg):
                if not self._pair(m, depth, at):
                    raise _bad(f"break inside a definite-length map at byte {at}")
            return m
        # major 6: a tag
        if arg in (2, 3):
            raise Rejected("out_of_range", f"CBOR bignum (tag {arg}) is beyond 64 bits")
        raise _bad(f"tag {arg} at byte {at} is not accepted")

    def _pair(self, m: dict[int | str, Any], depth: int, at: int) -> bool:
        key_at = self.pos
        k = self.item(depth + 1)
        if k is _BREAK:
            return False
        if isinstance(k, bool) or not isinstance(k, int | str):
            raise _bad(f"map key at byte {key_at} is not an integer or text")
        v = self.item(depth + 1)
        if v is _BREAK:
            raise _bad(f"map at byte {at} has a key without a value")
        if k in m:
            raise _bad(f"duplicate map key {k!r:.64} at byte {key_at}")
        m[k] = v
        return True

    def _indefinite(self, major: int, depth: int, at: int) -> Any:
        if major == 2 or major == 3:
            chunks = []
            while True:
                c_at = self.pos
                if c_at >= self.end:
                    raise _bad(f"truncated indefinite-length string at byte {at}")
                ib = self.data[c_at]
                if ib == 0xFF:
                    self.pos = c_at + 1
                    break
                if ib >> 5 != major or ib & 0x1F == 31:
                    raise _bad(f"bad chunk in indefinite-length string at byte {c_at}")
                chunks.append(self.item(depth))
            if major == 2:
                return b"".join(chunks)
            return "".join(chunks)
        if major == 4:
            if depth >= MAX_DEPTH:
                raise _bad(f"nested deeper than {MAX_DEPTH} levels")
            out: list[Any] = []
            while True:
                v = self.item(depth + 1)
                if v is _BREAK:
                    return out
                out.append(v)
        if major == 5:
            if depth >= MAX_DEPTH:
                raise _bad(f"nested deeper than {MAX_DEPTH} levels")
            m: dict[int | str, Any] = {}
            while self._pair(m, depth, at):
                pass
            return m
        raise _bad(f"indefinite length on major type {major} at byte {at}")

    def _simple(self, ai: int, at: int) -> Any:
        if ai == 20:
            return False
        if ai == 21:
            return True
        if ai == 22:
            return None
        if ai == 31:
            return _BREAK
        if 25 <= ai <= 27:
            size = 1 << (ai - 24)
            pos = self.pos
            if pos + size > self.end:
                raise _bad(f"truncated float at byte {at}")
            self.pos = pos + size
            fmt = _HALF if ai == 25 else _SINGLE if ai == 26 else _DOUBLE
            value = float(fmt.unpack_from(self.data, pos)[0])
            if not math.isfinite(value):
                raise Rejected("out_of_range", f"CBOR float {value} at byte {at} is not finite")
            return value
        if ai == 23:
            raise _bad(f"undefined at byte {at} is not accepted")
        if ai == 24:
            self._argument(ai, at)
            raise _bad(f"simple value at byte {at} is not accepted")
        if ai < 20:
            raise _bad(f"simple value {ai} at byte {at} is not accepted")
        raise _bad(f"reserved additional information {ai} at byte {at}")


def _text(chunk: bytes, at: int) -> str:
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected(
            "bad_encoding", f"CBOR text at byte {at} is not UTF-8 (byte {e.start})"
        ) from None


def decode(data: bytes) -> Any:
    """Decode exactly one CBOR data item that fills `data`."""
    r = _Reader(data)
    value = r.item(0)
    if value is _BREAK:
        raise _bad("break code outside an indefinite-length item")
    if r.pos != r.end:
        raise _bad(f"{r.end - r.pos} bytes after the data item")
    return value


# ---- encoder ---------------------------------------------------------------


def _head(major: int, arg: int) -> bytes:
    if arg < 24:
        return bytes((major << 5 | arg,))
    if arg < 0x100:
        return bytes((major << 5 | 24, arg))
    if arg < 0x10000:
        return bytes((major << 5 | 25,)) + _U16.pack(arg)
    if arg < 0x100000000:
        return bytes((major << 5 | 26,)) + _U32.pack(arg)
    return bytes((major << 5 | 27,)) + _U64.pack(arg)


def _float_bytes(value: float) -> bytes:
    if math.isnan(value):
        return b"\xf9\x7e\x00"
    for ai, fmt in ((25, _HALF), (26, _SINGLE)):
        try:
            packed = fmt.pack(value)
        except OverflowError:
            continue
        if fmt.unpack(packed)[0] == value:
            return bytes((0xE0 | ai,)) + packed
    return b"\xfb" + _DOUBLE.pack(value)


def _encode(value: object, out: list[bytes]) -> None:
    if value is None:
        out.append(b"\xf6")
    elif value is True:
        out.append(b"\xf5")
    elif value is False:
        out.append(b"\xf4")
    elif isinstance(value, int):
        if not -(2**64) <= value < 2**64:
            raise ValueError(f"integer {value} is beyond 64 bits")
        out.append(_head(0, value) if value >= 0 else _head(1, -1 - value))
    elif isinstance(value, float):
        out.append(_float_bytes(value))
    elif isinstance(value, bytes | bytearray):
        out.append(_head(2, len(value)))
        out.append(bytes(value))
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out.append(_head(3, len(raw)))
        out.append(raw)
    elif isinstance(value, Mapping):
        pairs = sorted((encode(k), encode(v)) for k, v in value.items())
        out.append(_head(5, len(pairs)))
        for k, v in pairs:
            out.append(k)
            out.append(v)
    elif isinstance(value, Sequence):
        out.append(_head(4, len(value)))
        for item in value:
            _encode(item, out)
    else:
        raise ValueError(f"{type(value).__name__} has no CBOR form here")


def encode(value: object) -> bytes:
    """RFC 8949 section 4.2.1 core deterministic encoding of `value`."""
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)
