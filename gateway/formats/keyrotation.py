"""The log's key rotation entry: a leaf of the gateway's log that introduces a new log key.

The entry is a canonical Transaction (gateway.formats.canonical) under a reserved device
id that no device can have (device ids start with a letter or digit; this one starts with
"_"), so the spool, the batches, the ledger nodes' copy of the log and every proof tool
carry it like any other leaf, and its tx_id is its leaf hash. Its fields, RFC 8785 JSON,
name the log's origin, the new key (DER SubjectPublicKeyInfo, P-256) and the terms of the
overlap during which checkpoints carry both signatures.

Promise: a ledger node trusts the new key only after a checkpoint signed by a key it
already trusts covers this entry (gateway.ledger.node); this module only encodes and
parses, and refuses anything that is not exactly an entry it would write.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError

from gateway._pb.edgegateway.v1 import transaction_pb2
from gateway.formats import canonical
from gateway.formats.note import EcdsaVerifier, NoteError, ecdsa_key_id

T = TypeVar("T")

RESERVED_DEVICE = "_log"
PROFILE = "_log/key-rotation@1"
KIND = "log.key-rotation"
CHANNEL = "log"
# Field 1 (device_id, length-delimited) comes first in a deterministic encoding.
LEAF_PREFIX = b"\x0a" + bytes([len(RESERVED_DEVICE)]) + RESERVED_DEVICE.encode()
# An entry is a few hundred bytes; anything much larger is not one of ours.
MAX_ENTRY_BYTES = 4096


class RotationEntryError(ValueError):
    """A leaf under the reserved device id that is not a valid key rotation entry."""


@dataclass(frozen=True, slots=True)
class RotationEntry:
    """Rotation number `rotation` (1, 2, ...) of log `origin` to the key `new_spki`;
    checkpoints carry the old and the new signature for at least `overlap_checkpoints`
    checkpoints and `overlap_seconds` seconds after the one that covers this entry."""

    origin: str
    gateway_id: str
    rotation: int
    old_key_id: bytes  # SHA-256 of the old key's DER SPKI
    new_spki: bytes
    overlap_checkpoints: int
    overlap_seconds: int
    created_ms: int

    def __post_init__(self) -> None:
        if self.rotation < 1 or self.overlap_checkpoints < 0 or self.overlap_seconds < 0:
            raise RotationEntryError("rotation number >= 1 and overlap terms >= 0 expected")
        if len(self.old_key_id) != 32:
            raise RotationEntryError("old key id must be 32 bytes (SHA-256 of its SPKI)")
        try:
            EcdsaVerifier(self.origin, self.new_spki)
        except NoteError as e:
            raise RotationEntryError(f"new key: {e.detail}") from None

    @property
    def new_key_id(self) -> bytes:
        """SHA-256 of the new key's SPKI: the gateway's key_id for it."""
        return hashlib.sha256(self.new_spki).digest()

    def verifier(self) -> EcdsaVerifier:
        """The new key as a checkpoint verifier (type 0x02, named by the origin)."""
        return EcdsaVerifier(self.origin, self.new_spki)

    def fields(self) -> bytes:
        return canonical.canonical_json(
            {
                "origin": self.origin,
                "rotation": self.rotation,
                "old_key_id": self.old_key_id.hex(),
                "new_key": base64.b64encode(self.new_spki).decode("ascii"),
                "new_note_key_id": ecdsa_key_id(self.new_spki).hex(),
                "overlap_checkpoints": self.overlap_checkpoints,
                "overlap_seconds": self.overlap_seconds,
            }
        )

    def leaf(self) -> bytes:
        fields = self.fields()
        tx = transaction_pb2.Transaction(
            device_id=RESERVED_DEVICE,
            device_seq=self.rotation,
            device_time_ms=0,
            received_time_ms=self.created_ms,
            profile=PROFILE,
            kind=KIND,
            fields=fields,
            payload_sha256=hashlib.sha256(fields).digest(),
            gateway_id=self.gateway_id,
            channel=CHANNEL,
        )
        return canonical.transaction_bytes(tx)


def is_rotation_leaf(leaf: bytes) -> bool:
    """Cheap test on a leaf's first bytes: under the reserved device id or not."""
    return leaf.startswith(LEAF_PREFIX)


_FIELD_NAMES = {
    "origin",
    "rotation",
    "old_key_id",
    "new_key",
    "new_note_key_id",
    "overlap_checkpoints",
    "overlap_seconds",
}


def parse_entry(leaf: bytes) -> RotationEntry:
    """The entry a leaf under the reserved device id holds; RotationEntryError unless the
    leaf is exactly what RotationEntry.leaf() writes for it."""
    if len(leaf) > MAX_ENTRY_BYTES:
        raise RotationEntryError(f"{len(leaf)} bytes, at most {MAX_ENTRY_BYTES}")
    tx = transaction_pb2.Transaction()
    try:
        tx.ParseFromString(leaf)
    except DecodeError:
        raise RotationEntryError("not a canonical transaction") from None
    if tx.device_id != RESERVED_DEVICE or tx.profile != PROFILE or tx.kind != KIND:
        raise RotationEntryError("not a key rotation entry (device, profile or kind)")
    try:
        f = json.loads(tx.fields)
    except (ValueError, UnicodeDecodeError):
        raise RotationEntryError("fields are not JSON") from None
    if not isinstance(f, dict) or set(f) != _FIELD_NAMES:
        raise RotationEntryError(f"fields must be exactly {sorted(_FIELD_NAMES)}")
    try:
        entry = RotationEntry(
            origin=_typed(f["origin"], str),
            gateway_id=tx.gateway_id,
            rotation=_typed(f["rotation"], int),
            old_key_id=bytes.fromhex(_typed(f["old_key_id"], str)),
            new_spki=base64.b64decode(_typed(f["new_key"], str), validate=True),
            overlap_checkpoints=_typed(f["overlap_checkpoints"], int),
            overlap_seconds=_typed(f["overlap_seconds"], int),
            created_ms=tx.received_time_ms,
        )
    except ValueError as e:  # bad hex or base64; RotationEntryError is one too
        raise RotationEntryError(str(e)) from None
    if entry.rotation != tx.device_seq:
        raise RotationEntryError("the rotation number is not the device seq")
    if entry.leaf() != leaf:
        raise RotationEntryError("not in the canonical encoding")
    return entry


def _typed(value: object, kind: type[T]) -> T:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RotationEntryError(f"{value!r} is not a {kind.__name__}")
    return value
