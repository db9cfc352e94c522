"""One firmware profile at work: payload bytes to a canonical Transaction.

Pure logic: the profile, its device keys and the pseudonymisation key are
given; nothing here reads a file or a clock. Checks run in a fixed order
(firmware_profiles/README.md, "Rejection reasons"), so a payload with several
faults always gets the same reason: size, a trailer tag (before any parsing),
parsing, document shape, a field tag, unknown members, each field in the
profile's order, device time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from gateway.common.errors import Rejected
from gateway.edge.profiles import cbor, strictjson
from gateway.edge.profiles.builtin import MAX_FIELDS_BYTES, make_incoming
from gateway.edge.profiles.spec import BINARY_TYPES, MAX_SEQ, FieldSpec, Profile
from gateway.edge.spool import Incoming
from gateway.formats.canonical import MAX_SAFE_INTEGER, CanonicalError, canonical_json

PSEUDONYM_DOMAIN = b"edge-gateway/pseudonym/v1\x00"
# Device times past year 9999 are refused as implausible before any arithmetic.
MAX_TIME_MS = 253_402_300_800_000
_DECIMAL = Context(prec=60)
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)
_HEX = re.compile(r"^(?:[0-9a-fA-F]{2})*$")
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_MISSING: Any = object()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_quote = json.encoder.encode_basestring


def fields_json(values: Mapping[str, Any]) -> bytes:
    """canonical_json(values) for a flat map of field names to decoded values.

    The general encoder walks any JSON value; this one knows the shape: keys are
    ASCII field names (so code-point order is RFC 8785's UTF-16 order), strings
    were checked for lone surrogates, integers for 2**53. Python's JSON string
    escaping (", \\, short escapes, lower-case \\u00xx for other controls,
    everything else literal) is RFC 8785's. Floats and flag lists take the general
    path. tests/test_profiles_decode.py checks it against canonical_json.
    """
    parts = []
    for k in sorted(values):
        v = values[k]
        if isinstance(v, str):
            text = _quote(v)
        elif v is True:
            text = "true"
        elif v is False:
            text = "false"
        elif isinstance(v, int):
            text = str(v)
        else:
            text = canonical_json(v).decode("utf-8")
        parts.append(f'"{k}":{text}')
    return ("{" + ",".join(parts) + "}").encode("utf-8")


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded payload: the spool's Incoming plus what rate limiting needs."""

    incoming: Incoming
    device_time_ms: int


def _type_name(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, bytes):
        return "bytes"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def identity(cls: str, value: str) -> str | None:
    """The normalised subscriber identity, or None if `value` is not one of class `cls`."""
    v = value
    if cls == "msisdn" and v.startswith("+"):
        v = v[1:]
    if cls == "iccid" and v[-1:] in ("F", "f"):
        v = v[:-1]
    if not (v.isascii() and v.isdigit()):
        return None
    n = len(v)
    if cls in ("imsi", "msisdn"):
        return v if 6 <= n <= 15 else None
    if cls == "iccid":
        return v if 18 <= n <= 20 and _luhn_ok(v) else None
    # EID: 32 digits whose last two are ISO/IEC 7064 MOD 97-10 check digits.
    return v if n == 32 and int(v) % 97 == 1 else None


_IDENTITY_RULE = {
    "imsi": "an IMSI (6-15 digits)",
    "msisdn": "an MSISDN (6-15 digits, optional '+')",
    "iccid": "an ICCID (18-20 digits with a valid Luhn check digit)",
    "eid": "an EID (32 digits with valid MOD 97-10 check digits)",
}


class _Field:
    """A FieldSpec compiled for the hot path."""

    __slots__ = (
        "dec_bias",
        "dec_scale",
        "enum",
        "label",
        "scaled",
        "spec",
        "struct",
    )

    def __init__(self, spec: FieldSpec, byte_order: str | None) -> None:
        self.spec = spec
        self.label = f"field {spec.name} ({spec.where})"
        self.scaled = spec.scale is not None or spec.bias is not None
        self.dec_scale = Decimal(repr(spec.scale)) if spec.scale is not None else Decimal(1)
        self.dec_bias = Decimal(repr(spec.bias)) if spec.bias is not None else Decimal(0)
        self.enum = frozenset(spec.enum) if spec.enum is not None else None
        self.struct: struct.Struct | None = None
        code = BINARY_TYPES.get(spec.type, ("", 0, ""))[0] if byte_order else ""
        if code:
            self.struct = struct.Struct(("<" if byte_order == "little" else ">") + code)

    def fail(self, reason: str, what: str) -> Rejected:
        return Rejected(reason, f"{self.label}: {what}")

    def _show(self, v: object) -> str:
        # Subscriber identities never appear in a rejection detail.
        return "the value" if self.spec.pseudonymise else f"{v!r:.64}"

    def value(self, v: Any, pseudonym_key: bytes | None) -> Any:
        """Type-check, normalise and range-check one raw value; the JSON value to store."""
        spec = self.spec
        kind = spec.kind
        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.fail("wrong_type", f"expected int, got {_type_name(v)}")
        elif kind == "number":
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise self.fail("wrong_type", f"expected number, got {_type_name(v)}")
        elif kind == "string":
            if not isinstance(v, str):
                raise self.fail("wrong_type", f"expected string, got {_type_name(v)}")
            return self._string(v, pseudonym_key)
        elif kind == "bool":
            if not isinstance(v, bool):
                raise self.fail("wrong_type", f"expected bool, got {_type_name(v)}")
            return v
        else:
            if not isinstance(v, bytes):
                raise self.fail("wrong_type", f"expected bytes, got {_type_name(v)}")
            self._length(len(v), "bytes")
            return v.hex()
        if spec.flags is not None:
            return self._flags(v)
        if self.scaled:
            if (
                isinstance(v, int)
                and isinstance(spec.scale or 1, int)
                and isinstance(spec.bias or 0, int)
            ):
                v = v * (spec.scale or 1) + (spec.bias or 0)
            else:
                exact = _DECIMAL.add(
                    _DECIMAL.multiply(
                        Decimal(repr(v)) if isinstance(v, float) else Decimal(v), self.dec_scale
                    ),
                    self.dec_bias,
                )
                v = float(exact)
                if not math.isfinite(v):
                    raise self.fail("out_of_range", "scaled value overflows a double")
        if spec.minimum is not None and v < spec.minimum:
            raise self.fail("out_of_range", f"{v!r:.32} is below the minimum {spec.minimum}")
        if spec.maximum is not None and v > spec.maximum:
            raise self.fail("out_of_range", f"{v!r:.32} is above the maximum {spec.maximum}")
        if isinstance(v, int) and abs(v) > MAX_SAFE_INTEGER:
            raise self.fail("out_of_range", f"{v} is beyond 2**53 and has no exact JSON form")
        if self.enum is not None and v not in self.enum:
            raise self.fail("out_of_range", f"{v!r:.32} is not one of the profile's values")
        return v

    def _length(self, n: int, unit: str) -> None:
        spec = self.spec
        if spec.length is not None and n != spec.length and spec.kind == "bytes":
            raise self.fail("out_of_range", f"{n} {unit}, expected {spec.length}")
        if spec.min_length is not None and n < spec.min_length:
            raise self.fail("out_of_range", f"{n} {unit}, at least {spec.min_length} expected")
        if spec.max_length is not None and n > spec.max_length:
            raise self.fail("out_of_range", f"{n} {unit}, at most {spec.max_length} allowed")

    def _string(self, v: str, pseudonym_key: bytes | None) -> str:
        spec = self.spec
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise self.fail("bad_encoding", "contains a lone UTF-16 surrogate") from None
        self._length(len(v), "characters")
        fmt = spec.format
        if fmt is not None:
            if fmt == "digits":
                ok = v.isascii() and v.isdigit()
            elif fmt == "hex":
                ok = all(c in "0123456789abcdefABCDEF" for c in v)
            else:
                ok = v.isprintable()
            if not ok:
                raise self.fail("out_of_range", f"{self._show(v)} is not {fmt}")
        if self.enum is not None and v not in self.enum:
            raise self.fail("out_of_range", f"{v!r:.64} is not one of the profile's values")
        cls = spec.pseudonymise
        if cls is not None:
            norm = identity(cls, v)
            if norm is None:
                raise self.fail("out_of_range", f"not {_IDENTITY_RULE[cls]}")
            assert pseudonym_key is not None
            msg = PSEUDONYM_DOMAIN + cls.encode("ascii") + b"\x00" + norm.encode("ascii")
            return hmac.new(pseudonym_key, msg, hashlib.sha256).hexdigest()
        return v

    def _flags(self, v: int) -> list[str]:
        names = self.spec.flags
        assert names is not None
        if v < 0:
            raise self.fail("out_of_range", f"{v} is negative; flags are unsigned")
        out = []
        bit = 0
        while v:
            if v & 1:
                name = names[bit] if bit < len(names) else ""
                if not name:
                    raise self.fail("out_of_range", f"bit {bit} is set but the profile names none")
                out.append(name)
            v >>= 1
            bit += 1
        return out


class ProfileDecoder:
    """Decodes payloads of one profile, bound to its keys."""

    def __init__(
        self,
        profile: Profile,
        gateway_id: str,
        hmac_keys: Mapping[str, bytes] | None = None,
        public_keys: Mapping[str, ec.EllipticCurvePublicKey] | None = None,
        pseudonym_key: bytes | None = None,
    ) -> None:
        auth = profile.auth
        if auth is not None and auth.scheme == "hmac-sha256" and hmac_keys is None:
            raise ValueError(f"{profile.id} authenticates with HMAC: hmac_keys are needed")
        if auth is not None and auth.scheme == "ecdsa-p256" and public_keys is None:
            raise ValueError(f"{profile.id} authenticates with ECDSA: public_keys are needed")
        if profile.personal_data and pseudonym_key is None:
            raise ValueError(f"{profile.id} pseudonymises fields: a pseudonym_key is needed")
        self.profile = profile
        self.id = profile.id
        self.gateway_id = gateway_id
        self._hmac_keys = hmac_keys or {}
        self._public_keys = public_keys or {}
        self._pseudonym_key = pseudonym_key
        self._fields = tuple(_Field(f, profile.byte_order) for f in profile.fields)
        self._seq = profile.sequence_field
        self._time = profile.time
        self._trie = self._member_trie() if profile.unknown_fields == "reject" else None

    def _member_trie(self) -> dict[Any, Any]:
        trie: dict[Any, Any] = {}
        paths = [f.path for f in self.profile.fields]
        auth = self.profile.auth
        if auth is not None and auth.field is not None:
            paths.append((auth.field,))
        for path in paths:
            node: dict[Any, Any] | None = trie
            for i, token in enumerate(path):
                assert node is not None
                last = i == len(path) - 1
                # A leaf is None: whatever sits below it belongs to the field.
                node = node.setdefault(token, None if last else {})
                if node is None:
                    break
        return trie

    # ---- authentication ----------------------------------------------------

    def _verify(self, device_id: str, signed: bytes, tag: bytes) -> None:
        auth = self.profile.auth
        assert auth is not None
        if auth.scheme == "hmac-sha256":
            key = self._hmac_keys.get(device_id)
            if key is None:
                raise Rejected("bad_device_auth", f"no HMAC key for device {device_id}")
            if len(tag) != 32 or not hmac.compare_digest(
                hmac.new(key, signed, hashlib.sha256).digest(), tag
            ):
                raise Rejected("bad_device_auth", "HMAC-SHA256 tag does not match")
            return
        pub = self._public_keys.get(device_id)
        if pub is None:
            raise Rejected("bad_device_auth", f"no public key for device {device_id}")
        if auth.signature_format == "raw":
            if len(tag) != 64:
                raise Rejected("bad_device_auth", f"signature is {len(tag)} bytes, not r || s (64)")
            der = encode_dss_signature(
                int.from_bytes(tag[:32], "big"), int.from_bytes(tag[32:], "big")
            )
        else:
            der = tag
        try:
            pub.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise Rejected("bad_device_auth", "ECDSA P-256 signature does not verify") from None

    def _field_tag(self, device_id: str, doc: dict[str, Any]) -> None:
        auth = self.profile.auth
        assert auth is not None and auth.field is not None
        text = doc.get(auth.field, _MISSING)
        if text is _MISSING:
            raise Rejected("bad_device_auth", f"no tag: member {auth.field!r} is missing")
        if not isinstance(text, str) or len(text) > 200:
            raise Rejected("bad_device_auth", f"member {auth.field!r} is not a tag string")
        tag = b""
        if auth.tag_encoding == "hex":
            if _HEX.match(text):
                tag = bytes.fromhex(text)
        elif _B64URL.match(text) and len(text) % 4 != 1:
            try:
                tag = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            except binascii.Error:
                tag = b""
            if base64.urlsafe_b64encode(tag).rstrip(b"=").decode("ascii") != text:
                tag = b""  # non-canonical trailing bits: one tag, one text
        if not tag:
            raise Rejected("bad_device_auth", f"member {auth.field!r} is not {auth.tag_encoding}")
        rest = {k: v for k, v in doc.items() if k != auth.field}
        try:
            signed = canonical_json(rest)
        except CanonicalError as e:
            raise Rejected(
                "out_of_range", f"document has no RFC 8785 form to verify: {e}"
            ) from None
        self._verify(device_id, signed, tag)

    # ---- documents -----------------------------------------------------------

    def _unknown(self, doc: dict[Any, Any], trie: dict[Any, Any], prefix: str) -> None:
        for k, v in doc.items():
            if k not in trie:
                where = f"{prefix}/{k}" if self.profile.encoding == "json" else f"{prefix} {k!r}"
                raise Rejected("wrong_type", f"member {where[:80]} is not in {self.id}")
            sub = trie[k]
            if sub is not None and isinstance(v, dict):
                self._unknown(v, sub, f"{prefix}/{k}")

    @staticmethod
    def _lookup(doc: Any, f: _Field) -> Any:
        cur = doc
        path = f.spec.path
        for i, token in enumerate(path):
            if isinstance(cur, dict):
                cur = cur.get(token, _MISSING)
            elif isinstance(cur, list):
                if isinstance(token, int):
                    idx = token
                elif token.isascii() and token.isdigit() and (token == "0" or token[0] != "0"):
                    idx = int(token)
                else:
                    raise f.fail("wrong_type", f"{strictjson.pointer_text(path[:i])} is an array")
                cur = cur[idx] if 0 <= idx < len(cur) else _MISSING
            else:
                raise f.fail(
                    "wrong_type",
                    f"{strictjson.pointer_text(path[:i]) or 'the document'} is "
                    f"{_type_name(cur)}, not a container",
                )
            if cur is _MISSING:
                return _MISSING
        return cur

    def _fields_from_doc(self, doc: Any) -> dict[str, Any]:
        key = self._pseudonym_key
        out: dict[str, Any] = {}
        for f in self._fields:
            raw = self._lookup(doc, f)
            if raw is _MISSING:
                if f.spec.required:
                    raise f.fail("missing_field", "required but missing")
                continue
            out[f.spec.name] = (
                self._sequence(f, raw) if f.spec.name == self._seq else f.value(raw, key)
            )
        return out

    @staticmethod
    def _sequence(f: _Field, raw: Any) -> int:
        # Not stored as a field, so not bound by JSON's 2**53: the spool and the
        # Transaction take any sequence number up to 2**63-1.
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise f.fail("wrong_type", f"sequence number must be int, got {_type_name(raw)}")
        spec = f.spec
        if not 0 <= raw <= MAX_SEQ:
            raise f.fail("out_of_range", f"sequence number {raw} is outside 0..2**63-1")
        if (spec.minimum is not None and raw < spec.minimum) or (
            spec.maximum is not None and raw > spec.maximum
        ):
            raise f.fail("out_of_range", f"sequence number {raw} is outside the profile's range")
        return raw

    def _fields_from_record(self, record: bytes) -> dict[str, Any]:
        key = self._pseudonym_key
        out: dict[str, Any] = {}
        for f in self._fields:
            spec = f.spec
            off = spec.offset
            assert off is not None
            if f.struct is None:
                raw_bytes = record[off : off + (spec.length or 0)]
                if spec.type == "bytes":
                    out[spec.name] = f.value(raw_bytes, key)
                    continue
                text_bytes = raw_bytes.rstrip(b"\x00")
                if any(b < 0x20 or b > 0x7E for b in text_bytes):
                    raise f.fail(
                        "bad_encoding", "not printable ASCII (NUL padding at the end only)"
                    )
                out[spec.name] = f.value(text_bytes.decode("ascii"), key)
                continue
            raw = f.struct.unpack_from(record, off)[0]
            if spec.absent is not None and raw == spec.absent:
                if spec.required:
                    raise f.fail("missing_field", f"holds the absent marker {spec.absent}")
                continue
            if spec.kind == "bool":
                if raw not in (0, 1):
                    raise f.fail("out_of_range", f"{raw} is not a boolean (0 or 1)")
                raw = bool(raw)
            elif spec.kind == "number" and not math.isfinite(raw):
                raise f.fail("out_of_range", f"{raw} is not a finite number")
            out[spec.name] = self._sequence(f, raw) if spec.name == self._seq else f.value(raw, key)
        return out

    # ---- time ------------------------------------------------------------------

    def _device_time(self, raw: Any, received_ms: int) -> int:
        t = self._time
        assert t is not None
        label = f"field {t.field}"
        if t.unit == "rfc3339":
            m = _RFC3339.match(raw)
            if m is None:
                raise Rejected("out_of_range", f"{label}: {raw!r:.40} is not an RFC 3339 time")
            try:
                dt = datetime.fromisoformat(raw.upper().replace(" ", "T").replace("Z", "+00:00"))
            except ValueError:
                raise Rejected(
                    "out_of_range", f"{label}: {raw!r:.40} is not a valid date"
                ) from None
            ms = (dt - _EPOCH) // _MS
        elif t.unit == "s":
            ms = math.floor(raw * 1000) if isinstance(raw, float) else raw * 1000
        elif t.unit == "ms":
            ms = raw
        else:
            ms = raw // 1000
        if not 0 <= ms <= MAX_TIME_MS:
            raise Rejected("out_of_range", f"{label}: {raw!r:.40} is not a plausible time")
        ahead = ms - received_ms
        if ahead > t.max_ahead_ms:
            raise Rejected(
                "clock_skew",
                f"device time is {ahead // 1000} s ahead of the gateway's "
                f"(at most {t.max_ahead_ms // 1000} s allowed)",
            )
        if t.replay_window_ms is not None and received_ms - ms > t.replay_window_ms:
            raise Rejected(
                "replay",
                f"device time is {(received_ms - ms) // 1000} s old, beyond the "
                f"{t.replay_window_ms // 1000} s replay window",
            )
        return ms

    # ---- the whole payload -------------------------------------------------------

    def decode(self, device_id: str, payload: bytes, received_ms: int, channel: str) -> Decoded:
        """Decode one payload from `device_id`; raise Rejected with a reason otherwise."""
        profile = self.profile
        if len(payload) > profile.max_payload_bytes:
            raise Rejected(
                "too_large", f"{len(payload)} bytes, {self.id} allows {profile.max_payload_bytes}"
            )
        auth = profile.auth
        body = payload
        if auth is not None and auth.location == "trailer":
            n = auth.trailer_bytes
            if len(payload) <= n:
                raise Rejected(
                    "bad_device_auth", f"{len(payload)} bytes cannot hold the {n}-byte tag"
                )
            body = payload[:-n]
            # Authenticate before parsing: an unauthenticated sender reaches no parser.
            self._verify(device_id, body, payload[-n:])
        if profile.encoding == "binary":
            want = profile.record_length
            if len(body) != want:
                raise Rejected(
                    "not_decodable", f"record is {len(body)} bytes; {self.id}'s layout is {want}"
                )
            values = self._fields_from_record(body)
        else:
            doc = strictjson.parse(body) if profile.encoding == "json" else cbor.decode(body)
            if not isinstance(doc, dict):
                what = "a JSON object" if profile.encoding == "json" else "a CBOR map"
                raise Rejected("wrong_type", f"payload is {_type_name(doc)}, not {what}")
            if auth is not None and auth.location == "field":
                self._field_tag(device_id, doc)
            if self._trie is not None:
                self._unknown(doc, self._trie, "")
            values = self._fields_from_doc(doc)
        seq: int = values.pop(self._seq)
        device_time = 0
        if self._time is not None:
            raw_time = values.pop(self._time.field, None)
            if raw_time is not None:
                device_time = self._device_time(raw_time, received_ms)
        try:
            fields = fields_json(values)
        except CanonicalError as e:
            raise Rejected("out_of_range", str(e)) from None
        if len(fields) > MAX_FIELDS_BYTES:
            raise Rejected("too_large", f"normalised fields are {len(fields)} bytes")
        incoming = make_incoming(
            device_id=device_id,
            seq=seq,
            device_time_ms=device_time,
            received_ms=received_ms,
            profile=self.id,
            kind=profile.kind,
            fields=fields,
            payload=payload,
            gateway_id=self.gateway_id,
            channel=channel,
        )
        return Decoded(incoming=incoming, device_time_ms=device_time)
