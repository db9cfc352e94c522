"""The gateway's signing keys as verifiers see them: P-256 public keys, their key ids,
and the HSM's raw ECDSA signatures made DER and low-S.

A batch has no format of its own any more: it is the range of the gateway's log
between two checkpoints (gateway.formats.checkpoint), and its one signature is the
checkpoint's. Everything here uses pyca/cryptography and never signs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from google.protobuf.message import DecodeError

from gateway._pb.edgegateway.v1 import batch_pb2
from gateway.formats import merkle

# Order of the P-256 group, for the low-S rule.
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def der_low_s(raw: bytes) -> bytes:
    """PKCS#11 CKM_ECDSA returns r || s; make it DER with s in the lower half (low-S)."""
    if len(raw) != 64:
        raise ValueError(f"expected 64-byte r||s from the HSM, got {len(raw)}")
    r = int.from_bytes(raw[:32], "big")
    s = int.from_bytes(raw[32:], "big")
    if s > P256_N // 2:
        s = P256_N - s
    return encode_dss_signature(r, s)


def key_id_of(public_key: ec.EllipticCurvePublicKey) -> bytes:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("expected a P-256 public key")
    return key


def load_public_keys(pem: bytes) -> list[ec.EllipticCurvePublicKey]:
    """Every PEM public key block of a file: a gateway's keys after a key rotation."""
    blocks = re.findall(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", pem, re.S)
    if not blocks:
        raise ValueError("no PEM public key in it")
    return [load_public_key(b) for b in blocks]


# ---- the retired batch header chain ---------------------------------------------------
# Only the reference ledger node's SubmitBatch still reads signed batch headers; nothing
# of the gateway writes them. This section, and protos/edgegateway/v1/batch.proto, go
# when SubmitBatch leaves the node.

DOMAIN_TAG = b"edge-ledger-gateway/batch/v1\x00"
HEADER_VERSION = 1
SIGNATURE_ALGORITHM = "ecdsa-p256-sha256"
ZERO_HASH = b"\x00" * 32


class BatchInvalid(ValueError):
    """A signed batch fails verification; `reason` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class HeaderFields:
    """What the batcher knows when it cuts a batch."""

    gateway_id: str
    seq: int
    prev_header_hash: bytes
    merkle_root: bytes
    tx_count: int
    byte_count: int
    first_received_ms: int
    last_received_ms: int
    created_ms: int
    key_id: bytes


def encode_header(f: HeaderFields) -> bytes:
    """The header bytes that are signed and travel; encoded once, never re-serialised."""
    if len(f.prev_header_hash) != 32 or len(f.merkle_root) != 32 or len(f.key_id) != 32:
        raise ValueError("prev_header_hash, merkle_root and key_id must be 32 bytes")
    h = batch_pb2.BatchHeader(
        version=HEADER_VERSION,
        gateway_id=f.gateway_id,
        seq=f.seq,
        prev_header_hash=f.prev_header_hash,
        merkle_root=f.merkle_root,
        tx_count=f.tx_count,
        byte_count=f.byte_count,
        first_received_ms=f.first_received_ms,
        last_received_ms=f.last_received_ms,
        created_ms=f.created_ms,
        key_id=f.key_id,
        signature_algorithm=SIGNATURE_ALGORITHM,
    )
    return h.SerializeToString(deterministic=True)


def header_hash(header: bytes) -> bytes:
    """SHA-256 of the header bytes: what the next header's prev_header_hash carries."""
    return hashlib.sha256(header).digest()


def signing_input(header: bytes) -> bytes:
    return DOMAIN_TAG + header


def signing_digest(header: bytes) -> bytes:
    """SHA-256 of the domain-tagged header: what the HSM signs with CKM_ECDSA."""
    return hashlib.sha256(DOMAIN_TAG + header).digest()


def parse_header(header: bytes) -> batch_pb2.BatchHeader:
    h = batch_pb2.BatchHeader()
    try:
        h.ParseFromString(header)
    except DecodeError as e:
        raise BatchInvalid("bad_header", f"header does not parse: {e}") from None
    # Deterministic serialisation keeps unknown fields; drop them so that a header
    # carrying fields v1 does not define fails the canonical-form check.
    h.DiscardUnknownFields()
    if h.SerializeToString(deterministic=True) != header:
        raise BatchInvalid("bad_header", "header bytes are not in canonical form")
    return h


def verify_signature(header: bytes, signature: bytes, key: ec.EllipticCurvePublicKey) -> None:
    """Raise BatchInvalid unless `signature` is a low-S DER ECDSA over the tagged header."""
    try:
        _, s = decode_dss_signature(signature)
    except ValueError:
        raise BatchInvalid("bad_signature", "signature is not DER") from None
    if s > P256_N // 2:
        raise BatchInvalid("bad_signature", "signature is not low-S")
    try:
        key.verify(signature, signing_input(header), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BatchInvalid("bad_signature", "signature does not verify") from None


def verify_batch(
    batch: batch_pb2.SignedBatch, key: ec.EllipticCurvePublicKey
) -> batch_pb2.BatchHeader:
    """Everything a ledger node checks that does not depend on its stored chain."""
    h = parse_header(batch.header)
    if h.version != HEADER_VERSION:
        raise BatchInvalid("bad_header", f"header version {h.version}, expected {HEADER_VERSION}")
    if h.signature_algorithm != SIGNATURE_ALGORITHM:
        raise BatchInvalid("bad_header", f"signature algorithm {h.signature_algorithm!r}")
    if h.key_id != key_id_of(key):
        raise BatchInvalid("unknown_key", f"key_id {h.key_id.hex()} is not the registered key")
    verify_signature(batch.header, batch.signature, key)
    check_contents(h, batch.transactions)
    return h


def check_contents(h: batch_pb2.BatchHeader, transactions: Sequence[bytes]) -> None:
    if h.tx_count != len(transactions):
        raise BatchInvalid(
            "bad_count", f"header says {h.tx_count} txs, batch has {len(transactions)}"
        )
    size = sum(len(t) for t in transactions)
    if h.byte_count != size:
        raise BatchInvalid("bad_count", f"header says {h.byte_count} bytes, batch has {size}")
    if merkle.root(transactions) != h.merkle_root:
        raise BatchInvalid("bad_merkle_root", "Merkle root does not match the transactions")
