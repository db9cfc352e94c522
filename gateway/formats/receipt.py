"""Device receipts: what a device keeps to prove, offline and later, that its transaction is
in its gateway's log. A compact binary form of a c2sp.org/tlog-proof@v1 bundle.

    version      1 byte   0x01
    tx_id       32 bytes  the leaf hash, SHA-256(0x00 || leaf)
    index        8 bytes  big-endian leaf index
    tree size    8 bytes  big-endian size of the checkpoint
    n            1 byte   inclusion proof hashes (at most 64)
    proof     32*n bytes  RFC 9162 inclusion proof, from the leaf's sibling up
    m            1 byte   signatures on the checkpoint (at most 16)
    m times:     4 bytes  key ID, 1 byte length L (1..255), L bytes signature

The checkpoint's root is not carried: the inclusion proof implies it, and the log's
signature over the body rebuilt with it (origin, size, that root) verifies only if it is
the root the log signed. The origin is not carried either: a device knows its gateway's.
Signatures are note signatures without their key names (the log's ECDSA signature, type
0x02, and witnesses' cosignatures, type 0x04); a verifier selects them by key ID and
ignores the rest. Size: 359 + 32 * proof hashes bytes with one log key and three
witnesses, at most 999 bytes at 10^6 leaves and 1,319 at 10^9 (`max_size`).
gateway/formats/device_verifier.py reads it with nothing but the standard library and
one ECDSA verify. Pure: no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.formats import merkle
from gateway.formats.checkpoint import Checkpoint, checkpoint_of
from gateway.formats.note import Note, NoteError, NoteSignature, parse_note
from gateway.formats.tlogproof import MAX_PROOF_HASHES, TlogProof, parse_tlog_proof

VERSION = 1
MAX_SIGNATURES = 16
MAX_SIGNATURE_BYTES = 255
_HEAD = struct.Struct(">B32sQQ")
MAX_RECEIPT_BYTES = (
    _HEAD.size + 1 + 32 * MAX_PROOF_HASHES + 1 + MAX_SIGNATURES * (5 + MAX_SIGNATURE_BYTES)
)
# A DER ECDSA P-256 signature is at most 72 bytes; a cosignature is 8 + 64.
_ECDSA_P256_MAX = 72
_COSIGNATURE = 72


class ReceiptError(NoteError):
    reason = "bad_receipt"


@dataclass(frozen=True, slots=True)
class Receipt:
    tx_id: bytes
    index: int
    size: int
    proof: tuple[bytes, ...]
    signatures: tuple[tuple[bytes, bytes], ...]  # (4-byte key ID, signature)

    def __post_init__(self) -> None:
        if len(self.tx_id) != merkle.HASH_SIZE:
            raise ReceiptError(f"tx_id is {len(self.tx_id)} bytes, expected 32")
        if not 0 <= self.index < self.size <= 2**64 - 1:
            raise ReceiptError(f"index {self.index} outside a tree of {self.size}")
        if len(self.proof) > MAX_PROOF_HASHES or any(len(h) != 32 for h in self.proof):
            raise ReceiptError("the inclusion proof is at most 64 hashes of 32 bytes")
        if not 0 < len(self.signatures) <= MAX_SIGNATURES:
            raise ReceiptError(f"{len(self.signatures)} signatures, 1 to {MAX_SIGNATURES}")
        for kid, sig in self.signatures:
            if len(kid) != 4 or not 0 < len(sig) <= MAX_SIGNATURE_BYTES:
                raise ReceiptError("a signature is a 4-byte key ID and 1 to 255 bytes")

    def encode(self) -> bytes:
        out = [_HEAD.pack(VERSION, self.tx_id, self.index, self.size), bytes([len(self.proof)])]
        out.extend(self.proof)
        out.append(bytes([len(self.signatures)]))
        for kid, sig in self.signatures:
            out.append(kid + bytes([len(sig)]) + sig)
        return b"".join(out)

    def root(self) -> bytes:
        """The root the inclusion proof implies; ReceiptError if the proof is malformed."""
        r = merkle.root_from_inclusion_proof(self.tx_id, self.index, self.size, self.proof)
        if r is None:
            raise ReceiptError("the inclusion proof does not fit the index and tree size")
        return r

    def checkpoint(self, origin: str) -> Checkpoint:
        return Checkpoint(origin, self.size, self.root())

    def to_tlog_proof(self, origin: str, names: Mapping[bytes, str]) -> TlogProof:
        """The c2sp.org/tlog-proof@v1 bundle again, with the signatures whose key IDs
        `names` maps to a key name (the log's key and the witnesses the caller knows)."""
        lines = tuple(
            NoteSignature(names[kid], kid, sig) for kid, sig in self.signatures if kid in names
        )
        if not lines:
            raise ReceiptError("no signature by a key the caller named")
        note = Note(self.checkpoint(origin).body(), lines)
        return TlogProof(self.index, self.proof, note.serialise())


def decode(data: bytes) -> Receipt:
    """Strict decode: exact lengths, nothing after the last signature."""
    if len(data) > MAX_RECEIPT_BYTES:
        raise ReceiptError(f"receipt is {len(data)} bytes, at most {MAX_RECEIPT_BYTES}")
    if len(data) < _HEAD.size + 2:
        raise ReceiptError(f"receipt is {len(data)} bytes, too short")
    version, tx_id, index, size = _HEAD.unpack_from(data)
    if version != VERSION:
        raise ReceiptError(f"receipt version {version}, expected {VERSION}")
    pos = _HEAD.size
    n = data[pos]
    pos += 1
    if n > MAX_PROOF_HASHES or len(data) < pos + 32 * n + 1:
        raise ReceiptError("receipt is truncated in its inclusion proof")
    proof = tuple(data[pos + 32 * i : pos + 32 * (i + 1)] for i in range(n))
    pos += 32 * n
    m = data[pos]
    pos += 1
    sigs: list[tuple[bytes, bytes]] = []
    for _ in range(m):
        if len(data) < pos + 5:
            raise ReceiptError("receipt is truncated in its signatures")
        kid, length = data[pos : pos + 4], data[pos + 4]
        pos += 5
        if len(data) < pos + length:
            raise ReceiptError("receipt is truncated in a signature")
        sigs.append((kid, data[pos : pos + length]))
        pos += length
    if pos != len(data):
        raise ReceiptError(f"{len(data) - pos} bytes after the last signature")
    return Receipt(tx_id, index, size, proof, tuple(sigs))


def from_tlog_proof(tx_id: bytes, bundle: TlogProof | bytes) -> Receipt:
    """A receipt from a proof bundle of the gateway (not verified here: the gateway built
    the bundle; a device verifies the receipt). Every signature on the checkpoint is kept."""
    if isinstance(bundle, bytes):
        bundle = parse_tlog_proof(bundle)
    note = parse_note(bundle.checkpoint)
    cp = checkpoint_of(note)
    if cp.extensions:
        raise ReceiptError("a receipt cannot carry checkpoint extension lines")
    sigs = tuple((s.key_id, s.signature) for s in note.signatures)
    receipt = Receipt(tx_id, bundle.index, cp.size, bundle.hashes, sigs)
    if receipt.root() != cp.root_hash:
        raise ReceiptError("the bundle's inclusion proof does not lead to its checkpoint root")
    return receipt


def proof_length(index: int, size: int) -> int:
    """Hashes in the RFC 9162 inclusion proof of `index` in a tree of `size`."""
    if not 0 <= index < size:
        raise ValueError(f"index {index} outside a tree of {size}")
    n, start, end = 0, 0, size
    while end - start > 1:
        k = 1 << ((end - start - 1).bit_length() - 1)
        if index < start + k:
            end = start + k
        else:
            start += k
        n += 1
    return n


def max_size(tree_size: int, witnesses: int, log_keys: int = 1) -> int:
    """The largest receipt for a leaf of a tree of `tree_size`, with `log_keys` ECDSA P-256
    signatures (2 during a key rotation overlap) and `witnesses` cosignatures."""
    hashes = (tree_size - 1).bit_length()  # the longest inclusion proof in that tree
    return (
        _HEAD.size
        + 1
        + 32 * hashes
        + 1
        + log_keys * (5 + _ECDSA_P256_MAX)
        + witnesses * (5 + _COSIGNATURE)
    )
