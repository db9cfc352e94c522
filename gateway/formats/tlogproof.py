"""Offline proofs of logging (c2sp.org/tlog-proof@v1): index, inclusion proof, checkpoint.

    c2sp.org/tlog-proof@v1
    [extra <base64>]
    index <decimal>
    <base64 hash>            zero or more, from the leaf's sibling up
    <empty line>
    <signed checkpoint, verbatim, cosignatures included>

Verification follows the spec's steps: the caller computes the leaf hash; the checkpoint
must carry the expected origin and verify under the log's key; every cosignature by a
known witness must verify and at least `threshold` distinct witnesses must have cosigned;
the inclusion proof must bind the leaf hash to the checkpoint's root. Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.formats import merkle
from gateway.formats.checkpoint import Checkpoint, WrongOrigin, checkpoint_of
from gateway.formats.cosignature import CosignatureVerifier, timestamp_of
from gateway.formats.note import (
    MAX_NOTE_BYTES,
    BadKey,
    NoteError,
    NoteVerifier,
    b64decode_strict,
    b64encode,
    parse_note,
    verifier_index,
    verify_note,
)

HEADER = "c2sp.org/tlog-proof@v1"
# An inclusion proof in a tree of at most 2^64 - 1 leaves has at most 64 hashes.
MAX_PROOF_HASHES = 64
MAX_EXTRA_BYTES = 64 * 1024
MAX_PROOF_BYTES = MAX_NOTE_BYTES + 2 * MAX_EXTRA_BYTES + 64 * 48
MAX_INDEX = 2**64 - 2  # the last leaf of the largest tree a checkpoint can state
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}", re.ASCII)


class ProofError(NoteError):
    reason = "bad_proof"


class QuorumNotMet(ProofError):
    reason = "witness_quorum"


class NotIncluded(ProofError):
    reason = "not_included"


@dataclass(frozen=True, slots=True)
class TlogProof:
    index: int
    hashes: tuple[bytes, ...]
    checkpoint: bytes  # the signed checkpoint note, exactly as the log and witnesses signed it
    extra: bytes | None = None  # opaque, unauthenticated

    def __post_init__(self) -> None:
        if not 0 <= self.index <= MAX_INDEX:
            raise ProofError(f"index {self.index} outside 0..2^64-2")
        if len(self.hashes) > MAX_PROOF_HASHES:
            raise ProofError(f"{len(self.hashes)} proof hashes, at most {MAX_PROOF_HASHES}")
        if any(len(h) != merkle.HASH_SIZE for h in self.hashes):
            raise ProofError("every inclusion proof hash must be 32 bytes")
        if not self.checkpoint.endswith(b"\n"):
            raise ProofError("the checkpoint must end with a newline")
        if self.extra is not None and len(self.extra) > MAX_EXTRA_BYTES:
            raise ProofError(f"extra data is {len(self.extra)} bytes, at most {MAX_EXTRA_BYTES}")

    def serialise(self) -> bytes:
        lines = [HEADER]
        if self.extra is not None:
            lines.append(f"extra {b64encode(self.extra)}")
        lines.append(f"index {self.index}")
        lines.extend(b64encode(h) for h in self.hashes)
        return ("\n".join(lines) + "\n\n").encode() + self.checkpoint


def parse_tlog_proof(data: bytes) -> TlogProof:
    """Strict parse: every line in its one spelling; the checkpoint kept byte for byte."""
    if len(data) > MAX_PROOF_BYTES:
        raise ProofError(f"proof is {len(data)} bytes, at most {MAX_PROOF_BYTES}")
    head, sep, checkpoint = data.partition(b"\n\n")
    if not sep:
        raise ProofError("no empty line before the checkpoint")
    try:
        lines = head.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise ProofError("proof header is not ASCII") from None
    if lines[0] != HEADER:
        raise ProofError(f"first line is not {HEADER}")
    pos = 1
    extra: bytes | None = None
    if pos < len(lines) and lines[pos].startswith("extra "):
        try:
            extra = b64decode_strict(lines[pos][len("extra ") :])
        except ValueError as e:
            raise ProofError(f"extra data: {e}") from None
        pos += 1
    if pos >= len(lines) or not lines[pos].startswith("index "):
        raise ProofError("missing index line")
    index_text = lines[pos][len("index ") :]
    if not _DECIMAL.fullmatch(index_text) or int(index_text) > MAX_INDEX:
        raise ProofError(f"index {index_text[:30]!r} is not a decimal in 0..2^64-2")
    hashes: list[bytes] = []
    for line in lines[pos + 1 :]:
        try:
            h = b64decode_strict(line)
        except ValueError as e:
            raise ProofError(f"inclusion proof hash: {e}") from None
        if len(h) != merkle.HASH_SIZE:
            raise ProofError(f"inclusion proof hash is {len(h)} bytes, expected 32")
        hashes.append(h)
    if len(hashes) > MAX_PROOF_HASHES:
        raise ProofError(f"{len(hashes)} proof hashes, at most {MAX_PROOF_HASHES}")
    if not checkpoint:
        raise ProofError("no checkpoint after the empty line")
    return TlogProof(int(index_text), tuple(hashes), checkpoint, extra)


@dataclass(frozen=True, slots=True)
class WitnessPolicy:
    """At least `threshold` of `witnesses` must have cosigned (M of N)."""

    witnesses: tuple[CosignatureVerifier, ...]
    threshold: int

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= len(self.witnesses):
            raise BadKey(
                f"witness threshold {self.threshold} outside 0..{len(self.witnesses)} witnesses"
            )
        names = [(w.name, w.key_id) for w in self.witnesses]
        if len(set(names)) != len(names):
            raise BadKey("a witness is listed twice")
        keys = [w.public_key for w in self.witnesses]
        if len(set(keys)) != len(keys):
            # One key under two names would let one witness count twice.
            raise BadKey("two witnesses share one public key")


@dataclass(frozen=True, slots=True)
class VerifiedProof:
    checkpoint: Checkpoint
    index: int
    leaf_hash: bytes
    cosigned_by: tuple[tuple[str, int], ...]  # (witness name, cosignature timestamp)
    extra: bytes | None


def verify_tlog_proof(
    proof: TlogProof | bytes,
    leaf_hash: bytes,
    log_keys: Sequence[NoteVerifier],
    policy: WitnessPolicy,
    origin: str | None = None,
) -> VerifiedProof:
    """Check a proof offline; raise a NoteError subclass naming the first step that fails.

    `log_keys` are the log's keys (more than one during a rotation); `origin` defaults to
    their common name, which by our rule is the checkpoint origin.
    """
    if isinstance(proof, bytes):
        proof = parse_tlog_proof(proof)
    if len(leaf_hash) != merkle.HASH_SIZE:
        raise ProofError(f"leaf hash is {len(leaf_hash)} bytes, expected 32")
    if not log_keys:
        raise BadKey("no log key to verify the checkpoint with")
    if origin is None:
        names = {k.name for k in log_keys}
        if len(names) != 1:
            raise BadKey("log keys carry different names: pass the origin explicitly")
        origin = names.pop()
    note = parse_note(proof.checkpoint)
    cp = checkpoint_of(note)
    if cp.origin != origin:
        raise WrongOrigin(f"checkpoint origin {cp.origin!r}, expected {origin!r}")
    log_index = verifier_index(log_keys)
    witness_index = verifier_index(policy.witnesses)
    shared = set(log_index) & set(witness_index)
    if shared:
        raise BadKey(f"{sorted(n for n, _ in shared)} listed as both log and witness")
    # One pass over every known key: a bad signature by any of them rejects the note.
    verified = verify_note(note, [*log_keys, *policy.witnesses])
    if not any((s.name, s.key_id) in log_index for s in verified.verified):
        raise ProofError(f"checkpoint is not signed by the log key of {origin}")
    cosigned = tuple(
        (s.name, timestamp_of(s.signature))
        for s in verified.verified
        if (s.name, s.key_id) in witness_index
    )
    if len(cosigned) < policy.threshold:
        raise QuorumNotMet(
            f"{len(cosigned)} of {len(policy.witnesses)} witnesses cosigned, "
            f"{policy.threshold} required"
        )
    if proof.index >= cp.size:
        raise NotIncluded(f"index {proof.index} is outside the tree of size {cp.size}")
    root = merkle.root_from_inclusion_proof(leaf_hash, proof.index, cp.size, proof.hashes)
    if root is None or root != cp.root_hash:
        raise NotIncluded(f"inclusion proof does not lead to the root of tree size {cp.size}")
    return VerifiedProof(cp, proof.index, leaf_hash, cosigned, proof.extra)


@functools.lru_cache(maxsize=16)
def _checkpoint_of_note(signed_checkpoint: bytes) -> Checkpoint:
    """The checkpoint of a signed note: a proof server answers many lookups against the
    same latest checkpoint, and parsing the note is most of a proof's cost without this."""
    return checkpoint_of(parse_note(signed_checkpoint))


def make_tlog_proof(
    index: int,
    provider: merkle.SubtreeHash,
    signed_checkpoint: bytes,
    extra: bytes | None = None,
) -> TlogProof:
    """A proof for leaf `index` against an already signed (and cosigned) checkpoint.

    The provider may hold a larger tree than the checkpoint (a log grows past its last
    checkpoint); its first `size` leaves must be the checkpoint's tree.
    """
    cp = _checkpoint_of_note(signed_checkpoint)
    try:
        root = merkle.root_from_provider(cp.size, provider)
    except IndexError:
        raise ProofError(f"the tree holds fewer than the checkpoint's {cp.size} leaves") from None
    if root != cp.root_hash:
        raise ProofError("the tree's root is not the checkpoint's: wrong tree or checkpoint")
    hashes = merkle.inclusion_proof_from_provider(index, cp.size, provider)
    return TlogProof(index, tuple(hashes), signed_checkpoint, extra)
