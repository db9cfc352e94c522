"""Payloads made from a profile: valid ones, and ones each rejected for a known reason.

The simulator publishes them, the benchmark decodes them, the tests mutate
them, and firmware_profiles/samples/generate.py writes the shipped samples
with them. Any profile works, including ones an operator adds.

Device keys for simulated devices are derived from a seed (DemoKeys), so the
simulator and a demo gateway agree on them without exchanging files; those
keys are for demos and tests only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import random
import struct
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gateway.edge.profiles import cbor
from gateway.edge.profiles.spec import BINARY_TYPES, MAX_SEQ, FieldSpec, Profile
from gateway.formats.canonical import MAX_SAFE_INTEGER, canonical_json

DEMO_SEED = "edge-gateway-demo"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
YEAR_MS = 365 * 86400 * 1000


class DemoKeys:
    """Per-device demo keys derived from a seed: HMAC keys and ECDSA P-256 key pairs."""

    def __init__(self, seed: str = DEMO_SEED) -> None:
        self._seed = seed.encode("utf-8")
        self._ecdsa: dict[tuple[str, str], ec.EllipticCurvePrivateKey] = {}

    def _derive(self, label: str, profile_name: str, device_id: str) -> bytes:
        msg = f"{label}\x00{profile_name}\x00{device_id}".encode()
        return hmac.new(self._seed, msg, hashlib.sha256).digest()

    def hmac_key(self, profile_name: str, device_id: str) -> bytes:
        return self._derive("hmac", profile_name, device_id)

    def ecdsa_key(self, profile_name: str, device_id: str) -> ec.EllipticCurvePrivateKey:
        k = (profile_name, device_id)
        key = self._ecdsa.get(k)
        if key is None:
            d = int.from_bytes(self._derive("ecdsa", profile_name, device_id), "big")
            key = ec.derive_private_key(d % (_P256_ORDER - 1) + 1, ec.SECP256R1())
            self._ecdsa[k] = key
        return key

    def sign(self, profile: Profile, device_id: str, data: bytes) -> bytes:
        """The tag a device of `profile` puts on `data`, in the profile's form."""
        auth = profile.auth
        assert auth is not None
        if auth.scheme == "hmac-sha256":
            return hmac.new(self.hmac_key(profile.name, device_id), data, hashlib.sha256).digest()
        der = self.ecdsa_key(profile.name, device_id).sign(data, ec.ECDSA(hashes.SHA256()))
        if auth.signature_format == "der":
            return der
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def write_keys_files(
        self, profiles: Iterable[Profile], device_ids: Sequence[str], keys_dir: Path
    ) -> list[Path]:
        """Write, for each authenticating profile, the keys file it names (HMAC ones 0600)."""
        written = []
        for p in profiles:
            if p.auth is None:
                continue
            path = Path(p.auth.keys_file)
            path = path if path.is_absolute() else keys_dir / path
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = [
                f"# Demo {p.auth.scheme} keys for {p.id}, derived from a seed: not for production.",
                "[devices]",
            ]
            for dev in device_ids:
                if p.auth.scheme == "hmac-sha256":
                    lines.append(f'"{dev}" = "{self.hmac_key(p.name, dev).hex()}"')
                else:
                    pem = (
                        self.ecdsa_key(p.name, dev)
                        .public_key()
                        .public_bytes(
                            serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo,
                        )
                        .decode("ascii")
                    )
                    lines.append(f'"{dev}" = """\n{pem}"""')
            data = ("\n".join(lines) + "\n").encode("utf-8")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600)
            written.append(path)
        return written


# ---- values -------------------------------------------------------------------


def _luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def fake_identity(cls: str, rng: random.Random) -> str:
    """A well-formed, made-up subscriber identity (test MCC/MNC ranges)."""

    def digits(n: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(n))

    if cls == "imsi":
        return "00101" + digits(10)  # MCC 001 / MNC 01: the ITU test network
    if cls == "msisdn":
        return "+99" + digits(11)
    if cls == "iccid":
        body = "8900101" + digits(11)
        return body + _luhn_digit(body)
    base = "89001012" + digits(22)
    check = 98 - int(base + "00") % 97
    return f"{base}{check:02d}"


def _wire_range(f: FieldSpec) -> tuple[int, int]:
    if f.type in BINARY_TYPES and BINARY_TYPES[f.type][2] == "int":
        code, size, _ = BINARY_TYPES[f.type]
        bits = size * 8
        if code.islower():
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return 0, 2**bits - 1
    return -MAX_SAFE_INTEGER, MAX_SAFE_INTEGER


def _raw_bounds(f: FieldSpec, default_lo: float, default_hi: float) -> tuple[Decimal, Decimal]:
    lo = Decimal(repr(f.minimum)) if f.minimum is not None else Decimal(repr(default_lo))
    hi = Decimal(repr(f.maximum)) if f.maximum is not None else Decimal(repr(default_hi))
    scale = Decimal(repr(f.scale)) if f.scale is not None else Decimal(1)
    bias = Decimal(repr(f.bias)) if f.bias is not None else Decimal(0)
    a, b = (lo - bias) / scale, (hi - bias) / scale
    return (a, b) if a <= b else (b, a)


def _text(rng: random.Random, f: FieldSpec, limit: int | None) -> str:
    lo = f.min_length if f.min_length is not None else 1
    hi = f.max_length if f.max_length is not None else max(lo, 12)
    if limit is not None:
        hi = min(hi, limit)
    n = rng.randint(lo, max(lo, min(hi, lo + 12)))
    alphabet = {"digits": "0123456789", "hex": "0123456789abcdef"}.get(
        f.format or "", "abcdefghijklmnopqrstuvwxyz0123456789"
    )
    return "".join(rng.choice(alphabet) for _ in range(n))


def raw_value(f: FieldSpec, rng: random.Random) -> Any:
    """A raw (wire) value that the decoder accepts for field `f`."""
    kind = f.kind
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "bytes":
        n = f.length or rng.randint(f.min_length or 1, max(f.min_length or 1, f.max_length or 8))
        return rng.randbytes(n)
    if kind == "string":
        if f.enum is not None:
            return rng.choice(f.enum)
        if f.pseudonymise:
            return fake_identity(f.pseudonymise, rng)
        return _text(rng, f, f.length if f.type == "ascii" else None)
    if f.flags is not None:
        named = [i for i, n in enumerate(f.flags) if n]
        return sum(1 << i for i in named if rng.random() < 0.2)
    if f.enum is not None:
        return rng.choice(f.enum)
    wlo, whi = _wire_range(f)
    if kind == "int":
        lo, hi = _raw_bounds(f, max(wlo, 0), min(whi, 1000))
        a = max(math.ceil(lo), wlo)
        b = min(math.floor(hi), whi)
        for _ in range(8):
            v = rng.randint(a, b)
            if v != f.absent:
                return v
        return a if a != f.absent else b
    lo, hi = _raw_bounds(f, 0.0, 1000.0)
    # Inside the bounds by a margin, so single-precision rounding cannot cross them.
    span = hi - lo
    x = float(lo + span * Decimal("0.01") + span * Decimal("0.98") * Decimal(repr(rng.random())))
    if f.type == "f32":
        return float(struct.unpack(">f", struct.pack(">f", x))[0])
    return round(x, 6)


def _time_value(profile: Profile, time_ms: int) -> Any:
    t = profile.time
    assert t is not None
    if t.unit == "s":
        return time_ms // 1000
    if t.unit == "ms":
        return time_ms
    if t.unit == "us":
        return time_ms * 1000
    dt = datetime.fromtimestamp(time_ms / 1000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{time_ms % 1000:03d}Z"


def seq_limit(profile: Profile) -> int:
    """The largest sequence number a profile's sequence field can carry."""
    f = profile.field(profile.sequence_field)
    hi = min(_wire_range(f)[1], MAX_SEQ)
    if f.maximum is not None:
        hi = min(hi, int(f.maximum))
    return hi


def values(
    profile: Profile, seq: int, time_ms: int, rng: random.Random, optional: float = 0.8
) -> dict[str, Any]:
    """Raw values by field name: seq and device time as given, the rest made up."""
    out: dict[str, Any] = {}
    time_field = profile.time.field if profile.time else None
    for f in profile.fields:
        if f.name == profile.sequence_field:
            out[f.name] = seq
        elif f.name == time_field:
            out[f.name] = _time_value(profile, time_ms)
        elif f.required or rng.random() < optional:
            out[f.name] = raw_value(f, rng)
    return out


# ---- encoding -------------------------------------------------------------------


def _nest(doc: dict[Any, Any], path: tuple[str | int, ...], value: Any) -> None:
    node = doc
    for token in path[:-1]:
        node = node.setdefault(token, {})
    node[path[-1]] = value


def document(profile: Profile, vals: dict[str, Any]) -> dict[Any, Any]:
    """The JSON object or CBOR map holding `vals` where the profile's fields sit."""
    doc: dict[Any, Any] = {}
    for f in profile.fields:
        if f.name in vals:
            _nest(doc, f.path, vals[f.name])
    return doc


def record(profile: Profile, vals: dict[str, Any]) -> bytes:
    """The binary record holding `vals`; absent optional fields get their absent marker."""
    assert profile.record_length is not None
    out = bytearray(profile.record_length)
    order = "<" if profile.byte_order == "little" else ">"
    for f in profile.fields:
        assert f.offset is not None
        v = vals.get(f.name, f.absent)
        if v is None:
            continue
        if f.type == "ascii":
            raw = v.encode("ascii") if isinstance(v, str) else bytes(v)
            out[f.offset : f.offset + len(raw)] = raw
        elif f.type == "bytes":
            out[f.offset : f.offset + len(v)] = v
        else:
            struct.pack_into(order + BINARY_TYPES[f.type][0], out, f.offset, v)
    return bytes(out)


def encode_doc(profile: Profile, doc: Any) -> bytes:
    if profile.encoding == "json":
        return canonical_json(doc)
    return cbor.encode(doc)


def seal(profile: Profile, device_id: str, body: bytes, keys: DemoKeys) -> bytes:
    """Add a trailer tag when the profile wants one."""
    auth = profile.auth
    if auth is None or auth.location != "trailer":
        return body
    return body + keys.sign(profile, device_id, body)


def encode(profile: Profile, device_id: str, vals: dict[str, Any], keys: DemoKeys) -> bytes:
    """A payload carrying `vals`, authenticated as `device_id` would."""
    if profile.encoding == "binary":
        return seal(profile, device_id, record(profile, vals), keys)
    doc = document(profile, vals)
    return encode_doc_signed(profile, device_id, doc, keys)


def encode_doc_signed(
    profile: Profile, device_id: str, doc: dict[Any, Any], keys: DemoKeys
) -> bytes:
    auth = profile.auth
    if auth is not None and auth.location == "field":
        assert auth.field is not None
        tag = keys.sign(profile, device_id, canonical_json(doc))
        doc = {**doc, auth.field: _tag_text(tag, auth.tag_encoding)}
    return seal(profile, device_id, encode_doc(profile, doc), keys)


def _tag_text(tag: bytes, encoding: str) -> str:
    if encoding == "hex":
        return tag.hex()
    return base64.urlsafe_b64encode(tag).rstrip(b"=").decode("ascii")


def valid(
    profile: Profile,
    device_id: str,
    seq: int,
    time_ms: int,
    rng: random.Random,
    keys: DemoKeys,
) -> bytes:
    """A payload of `profile` that decodes (received at about `time_ms`)."""
    return encode(profile, device_id, values(profile, seq, time_ms, rng), keys)


def invalid(
    profile: Profile,
    device_id: str,
    seq: int,
    time_ms: int,
    rng: random.Random,
    keys: DemoKeys,
) -> tuple[str, bytes]:
    """(reason, payload): a payload of `profile` that is certainly refused for `reason`."""
    choices = ["not_decodable", "missing_field"]
    if profile.max_payload_bytes < 65536:
        choices.append("too_large")
    if profile.encoding != "binary":
        choices.append("wrong_type")
    if profile.encoding == "json":
        choices.append("bad_encoding")
    if profile.time is not None and profile.time.max_ahead_ms < YEAR_MS:
        choices.append("clock_skew")
    if profile.auth is not None:
        choices.append("bad_device_auth")
    bounded = [
        f
        for f in profile.fields
        if f.maximum is not None
        and f.kind == "int"
        and f.required
        and f.name != profile.sequence_field
        and _raw_bounds(f, 0, 0)[1] + 1 <= _wire_range(f)[1]
    ]
    if bounded:
        choices.append("out_of_range")
    reason = rng.choice(choices)
    vals = values(profile, seq, time_ms, rng)
    if reason == "too_large":
        return reason, b"\x00" * (profile.max_payload_bytes + 1)
    if reason == "bad_encoding":
        return reason, b'{"seq": "\xff\xfe"}'
    if reason == "clock_skew":
        good = values(profile, seq, time_ms + YEAR_MS, rng)
        return reason, encode(profile, device_id, good, keys)
    if reason == "bad_device_auth":
        payload = bytearray(encode(profile, device_id, vals, keys))
        assert profile.auth is not None
        if profile.auth.location == "trailer":
            payload[-1] ^= 0x01
            return reason, bytes(payload)
        return reason, encode_doc(profile, {**document(profile, vals), profile.auth.field: "AA"})
    if reason == "out_of_range":
        f = rng.choice(bounded)
        vals[f.name] = math.floor(_raw_bounds(f, 0, 0)[1]) + 1
        return reason, encode(profile, device_id, vals, keys)
    if profile.encoding == "binary":
        body = record(profile, vals)
        if reason == "not_decodable":
            body = body[:-1] if rng.random() < 0.5 else body + b"\x00"
        else:
            reason = "not_decodable"
            body = body[:-1]
        return reason, seal(profile, device_id, body, keys)
    doc = document(profile, vals)
    if reason == "missing_field":
        seq_path = profile.field(profile.sequence_field).path
        _drop(doc, seq_path)
        return reason, encode_doc_signed(profile, device_id, doc, keys)
    if reason == "wrong_type":
        _nest(doc, profile.field(profile.sequence_field).path, "seven")
        return reason, encode_doc_signed(profile, device_id, doc, keys)
    # not_decodable: a document cut short, still authenticated where a trailer is used.
    body = encode_doc(profile, doc)
    return reason, seal(profile, device_id, body[: len(body) // 2], keys)


def _drop(doc: dict[Any, Any], path: tuple[str | int, ...]) -> None:
    node = doc
    for token in path[:-1]:
        node = node[token]
    del node[path[-1]]
