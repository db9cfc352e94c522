"""The built-in `json@1` profile: the gateway's original payload format.

Pure logic, no I/O. It reads a JSON object with a device sequence number
`seq`, an optional device time `time` (ms since the epoch) and `kind`; every
other member is a normalised field. Firmware profiles (gateway.edge.profiles.spec)
describe every other format.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway._pb.edgegateway.v1 import transaction_pb2
from gateway.common.errors import Rejected
from gateway.edge.spool import Incoming
from gateway.formats.canonical import CanonicalError, canonical_json, transaction_bytes
from gateway.formats.merkle import leaf_hash

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_SEQ = 2**63 - 1
MAX_FIELDS_BYTES = 256 * 1024
# A device clock more than this far ahead of the gateway's is refused.
MAX_CLOCK_AHEAD_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a payload was refused, as carried on the dead-letter topic."""

    reason: str
    detail: str


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _pairs_unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # the C-speed common case; find the culprit only on failure
        seen: set[str] = set()
        for k, _v in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


# Built once: json.loads with hooks would construct a new decoder per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs_unique, parse_constant=_no_constants)


_MS_DECODE = msgspec.json.decode
_MS_ENCODE = msgspec.json.encode
_MS_FORMAT = msgspec.json.format
_FLAT = frozenset((int, str, float, bool, type(None)))


def _flat_object(payload: bytes) -> dict[str, Any] | None:
    """The common payload, a flat JSON object, through the compiled parser (msgspec),
    or None for the strict path. It is taken only when encoding what was parsed gives
    the payload's own bytes back, whitespace aside: the compiled parser keeps the last
    of duplicate member names and reads some spellings (escapes, exponents, -0) the
    strict parser might read otherwise, and each of those changes the bytes. Nested
    values go to the strict path too, which bounds their depth. So what is taken here
    is what the strict path would have returned; anything else, refusals included, is
    answered by the strict path, word for word."""
    try:
        doc = _MS_DECODE(payload)
    except (msgspec.DecodeError, RecursionError):
        return None
    if type(doc) is not dict:
        return None
    for v in doc.values():
        if type(v) not in _FLAT:
            return None
    encoded = _MS_ENCODE(doc)
    if encoded != payload and encoded != _MS_FORMAT(payload, indent=-1):
        return None
    return doc


def parse_json(payload: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, no duplicate keys, bounded depth."""
    doc = _flat_object(payload)
    if doc is not None:
        return doc
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected("bad_encoding", f"payload is not UTF-8 (byte {e.start})") from None
    # Deep nesting ends in RecursionError inside the parser (a rejection, not a
    # crash); canonical_json then bounds the accepted depth at 64.
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as e:
        raise Rejected("not_decodable", f"payload is not JSON: {e}") from None


def make_incoming(
    *,
    device_id: str,
    seq: int,
    device_time_ms: int,
    received_ms: int,
    profile: str,
    kind: str,
    fields: bytes,
    payload: bytes,
    gateway_id: str,
    channel: str,
) -> Incoming:
    """The canonical Transaction every profile produces, as its leaf on the way to the spool."""
    payload_sha = hashlib.sha256(payload).digest()
    tx = transaction_pb2.Transaction(
        device_id=device_id,
        device_seq=seq,
        device_time_ms=device_time_ms,
        received_time_ms=received_ms,
        profile=profile,
        kind=kind,
        fields=fields,
        payload_sha256=payload_sha,
        gateway_id=gateway_id,
        channel=channel,
    )
    leaf = transaction_bytes(tx)
    return Incoming(
        device_id=device_id,
        device_seq=seq,
        payload_sha256=payload_sha,
        tx_id=leaf_hash(leaf),
        leaf=leaf,
        received_ms=received_ms,
    )


class JsonDecoder:
    """The built-in `json@1` profile."""

    profile = "json@1"

    def __init__(self, gateway_id: str, max_payload_bytes: int) -> None:
        self.gateway_id = gateway_id
        self.max_payload_bytes = max_payload_bytes

    def decode(
        self, device_id: str | None, topic: str, payload: bytes, received_ms: int, channel: str
    ) -> Incoming:
        if device_id is None:
            raise Rejected("unknown_topic", f"no device id in topic {topic[:200]!r}")
        if len(payload) > self.max_payload_bytes:
            raise Rejected("too_large", f"{len(payload)} bytes, limit {self.max_payload_bytes}")
        if not DEVICE_ID_RE.fullmatch(device_id):
            raise Rejected("bad_device_id", f"device id {device_id[:64]!r} is not allowed")
        doc = parse_json(payload)
        if not isinstance(doc, dict):
            raise Rejected("wrong_type", "payload must be a JSON object")
        if "seq" not in doc:
            raise Rejected("missing_field", "seq (the device sequence number) is required")
        seq = doc.pop("seq")
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise Rejected("wrong_type", "seq must be an integer")
        if not 0 <= seq <= MAX_SEQ:
            raise Rejected("out_of_range", f"seq {seq} outside 0..2**63-1")
        device_time = doc.pop("time", 0)
        if isinstance(device_time, bool) or not isinstance(device_time, int):
            raise Rejected("wrong_type", "time must be integer milliseconds since the epoch")
        if not 0 <= device_time <= 2**62:
            raise Rejected("out_of_range", f"time {device_time} is not a plausible epoch ms")
        if device_time > received_ms + MAX_CLOCK_AHEAD_MS:
            raise Rejected(
                "clock_skew", f"device time is {(device_time - received_ms) // 1000} s ahead"
            )
        kind = doc.pop("kind", "telemetry")
        if not isinstance(kind, str) or not 0 < len(kind) <= 64:
            raise Rejected("wrong_type", "kind must be a string of 1-64 characters")
        try:
            fields = canonical_json(doc)
        except CanonicalError as e:
            raise Rejected("out_of_range", str(e)) from None
        if len(fields) > MAX_FIELDS_BYTES:
            raise Rejected("too_large", f"normalised fields are {len(fields)} bytes")
        return make_incoming(
            device_id=device_id,
            seq=seq,
            device_time_ms=device_time,
            received_ms=received_ms,
            profile=self.profile,
            kind=kind,
            fields=fields,
            payload=payload,
            gateway_id=self.gateway_id,
            channel=channel,
        )
