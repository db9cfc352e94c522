"""Witness cosignatures (c2sp.org/tlog-cosignature, Ed25519, signature type 0x04).

A cosignature is a note signature on a checkpoint: 8-byte big-endian timestamp || Ed25519
signature over "cosignature/v1\\ntime <timestamp>\\n" followed by the checkpoint body. The
key ID commits to the type byte 0x04, so a witness key never verifies as a plain Ed25519
note key. The timestamp is an argument, never read from a clock here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.formats.checkpoint import CheckpointError, parse_checkpoint
from gateway.formats.note import (
    TYPE_COSIGNATURE_V1,
    TYPE_ED25519,
    BadKey,
    Note,
    NoteSignature,
    check_key_name,
    ed25519_public_bytes,
    format_vkey,
    key_id,
    split_skey,
    split_vkey,
)

HEADER = "cosignature/v1\n"
TIMESTAMP_SIZE = 8
SIGNATURE_SIZE = TIMESTAMP_SIZE + 64
MAX_TIMESTAMP = 2**63 - 1


def signed_message(timestamp: int, body: str) -> bytes:
    """What the witness's Ed25519 key signs for a checkpoint body at `timestamp`."""
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise ValueError(f"cosignature timestamp {timestamp} outside 0..2^63-1")
    return f"{HEADER}time {timestamp}\n{body}".encode()


def cosignature_key_id(name: str, public_key: bytes) -> bytes:
    """SHA-256(name || 0x0A || 0x04 || 32-byte Ed25519 public key)[:4]."""
    return key_id(name, TYPE_COSIGNATURE_V1, public_key)


def timestamp_of(signature: bytes) -> int:
    """The timestamp a cosignature (key ID excluded) carries; ValueError if not one."""
    if len(signature) != SIGNATURE_SIZE:
        raise ValueError(f"cosignature is {len(signature)} bytes, expected {SIGNATURE_SIZE}")
    ts = int.from_bytes(signature[:TIMESTAMP_SIZE], "big")
    if ts > MAX_TIMESTAMP:
        raise ValueError(f"cosignature timestamp {ts} exceeds 2^63-1")
    return ts


def _public(raw: bytes) -> ed25519.Ed25519PublicKey:
    if len(raw) != 32:
        raise BadKey(f"Ed25519 cosigner key is {len(raw)} bytes, expected 32")
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise BadKey("not an Ed25519 public key") from None


@dataclass(frozen=True, slots=True)
class CosignatureVerifier:
    """A witness's public key, as a note verifier of its cosignatures."""

    name: str
    public_key: bytes
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        check_key_name(self.name)
        _public(self.public_key)
        object.__setattr__(self, "key_id", cosignature_key_id(self.name, self.public_key))

    def verify(self, text: bytes, signature: bytes) -> bool:
        try:
            ts = timestamp_of(signature)
            body = text.decode("utf-8")
            # A cosignature is a statement about a checkpoint, and about nothing else.
            parse_checkpoint(body)
            _public(self.public_key).verify(signature[TIMESTAMP_SIZE:], signed_message(ts, body))
        except (ValueError, InvalidSignature):
            # CheckpointError and UnicodeDecodeError are ValueErrors too.
            return False
        return True

    def vkey(self) -> str:
        return format_vkey(self.name, self.key_id, TYPE_COSIGNATURE_V1, self.public_key)


def parse_cosigner_vkey(vkey: str) -> CosignatureVerifier:
    """A cosigner from its vkey: type 0x04 with its own key ID, or an Ed25519 vkey (type
    0x01) whose key is used for cosignatures, as transparency-dev/formats accepts; the
    key ID stated in the vkey must be the one its type implies."""
    name, stated, sig_type, material = split_vkey(vkey)
    verifier = CosignatureVerifier(name, material)
    if sig_type == TYPE_COSIGNATURE_V1:
        expected = verifier.key_id
    elif sig_type == TYPE_ED25519:
        expected = key_id(name, TYPE_ED25519, material)
    else:
        raise BadKey(f"vkey for {name}: type 0x{sig_type:02x} is not an Ed25519 cosigner")
    if stated != expected:
        raise BadKey(f"vkey for {name}: key ID {stated.hex()} is not {expected.hex()}")
    return verifier


@dataclass(frozen=True, slots=True)
class Cosigner:
    """A witness's Ed25519 key in software (a ledger node), cosigning checkpoints."""

    name: str
    private_key: ed25519.Ed25519PrivateKey = field(repr=False)
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        check_key_name(self.name)
        pub = ed25519_public_bytes(self.private_key)
        object.__setattr__(self, "key_id", cosignature_key_id(self.name, pub))

    @classmethod
    def from_skey(cls, skey: str) -> Cosigner:
        """From a Go-style signer key whose seed is Ed25519 (type 0x01 or 0x04)."""
        name, stated, sig_type, seed = split_skey(skey)
        if sig_type not in (TYPE_ED25519, TYPE_COSIGNATURE_V1) or len(seed) != 32:
            raise BadKey(f"signer key for {name} is not an Ed25519 seed")
        cosigner = cls(name, ed25519.Ed25519PrivateKey.from_private_bytes(seed))
        expected = key_id(name, sig_type, ed25519_public_bytes(cosigner.private_key))
        if stated != expected:
            raise BadKey(f"signer key for {name}: key ID {stated.hex()} does not match the key")
        return cosigner

    def verifier(self) -> CosignatureVerifier:
        return CosignatureVerifier(self.name, ed25519_public_bytes(self.private_key))

    def signature(self, body: str, timestamp: int) -> NoteSignature:
        """The cosignature line for a checkpoint body; refuses a body that is not one."""
        try:
            parse_checkpoint(body)
        except CheckpointError as e:
            raise CheckpointError(f"refusing to cosign: {e.detail}") from None
        sig = self.private_key.sign(signed_message(timestamp, body))
        return NoteSignature(self.name, self.key_id, timestamp.to_bytes(8, "big") + sig)

    def cosign(self, note: Note, timestamp: int) -> Note:
        """`note` with this witness's cosignature added (an older one of its own replaced).

        Verifying the log's signature and the consistency with what this witness cosigned
        before is the caller's job (c2sp.org/tlog-witness); this only signs.
        """
        return note.with_signatures([self.signature(note.text, timestamp)])
