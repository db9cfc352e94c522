"""C2SP checkpoints (c2sp.org/tlog-checkpoint): a log's signed tree head as a note body.

Body: origin line, decimal tree size, base64 RFC 9162 root hash, optional extension
lines, each ending in a newline. Parsing is strict (one spelling per value); a
gateway's log is named by `gateway_origin` and signs with a key of that same name.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.formats import merkle
from gateway.formats.note import (
    BadKey,
    Note,
    NoteError,
    NoteSigner,
    NoteVerifier,
    VerifiedNote,
    b64decode_strict,
    b64encode,
    parse_note,
    sign_note,
    verify_note,
)

MAX_TREE_SIZE = 2**64 - 1
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}", re.ASCII)
# A DNS name of the operator: lower-case labels of letters, digits and hyphens.
_DOMAIN = re.compile(
    r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*",
    re.ASCII,
)
# The gateway id rule of the configuration ([gateway] id), restricted to ASCII here so
# that an origin never depends on Unicode normalisation.
_GATEWAY_ID = re.compile(r"[A-Za-z0-9._-]{1,128}", re.ASCII)


class CheckpointError(NoteError):
    reason = "bad_checkpoint"


class WrongOrigin(CheckpointError):
    reason = "wrong_origin"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head: origin, size, RFC 9162 root hash and opaque extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin or _has_control(self.origin):
            raise CheckpointError("origin must be one non-empty line without control characters")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise CheckpointError(f"tree size {self.size} outside 0..2^64-1")
        if len(self.root_hash) != merkle.HASH_SIZE:
            raise CheckpointError(f"root hash is {len(self.root_hash)} bytes, expected 32")
        if self.size == 0 and self.root_hash != merkle.EMPTY_ROOT:
            raise CheckpointError("an empty tree's root hash must be SHA-256 of nothing")
        for line in self.extensions:
            if not line or "\n" in line or _has_control(line):
                raise CheckpointError("extension lines must be non-empty single lines")

    def body(self) -> str:
        """The note text: what the log signs and witnesses cosign."""
        lines = [self.origin, str(self.size), b64encode(self.root_hash), *self.extensions]
        return "".join(line + "\n" for line in lines)


def _has_control(s: str) -> bool:
    return any(ord(ch) < 0x20 for ch in s)


def parse_checkpoint(body: str) -> Checkpoint:
    """Strict parse of a checkpoint body (the note text, final newline included)."""
    if not body.endswith("\n"):
        raise CheckpointError("checkpoint body must end with a newline")
    lines = body[:-1].split("\n")
    if len(lines) < 3:
        raise CheckpointError(f"checkpoint body has {len(lines)} lines, at least 3 expected")
    origin, size_text, root_text, *extensions = lines
    if not _DECIMAL.fullmatch(size_text) or int(size_text) > MAX_TREE_SIZE:
        raise CheckpointError(f"tree size {size_text[:30]!r} is not a decimal in 0..2^64-1")
    try:
        root_hash = b64decode_strict(root_text)
    except ValueError as e:
        raise CheckpointError(f"root hash: {e}") from None
    return Checkpoint(origin, int(size_text), root_hash, tuple(extensions))


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    checkpoint: Checkpoint
    note: VerifiedNote


def sign_checkpoint(checkpoint: Checkpoint, signers: Sequence[NoteSigner]) -> bytes:
    """The signed note for `checkpoint`; the log's signer comes first."""
    return sign_note(checkpoint.body(), signers).serialise()


def checkpoint_of(note: Note) -> Checkpoint:
    return parse_checkpoint(note.text)


def open_checkpoint(
    data: bytes, verifiers: Iterable[NoteVerifier], origin: str | None = None
) -> SignedCheckpoint:
    """Parse, verify the signatures of the known keys, parse the body, check the origin."""
    note = parse_note(data)
    cp = checkpoint_of(note)
    if origin is not None and cp.origin != origin:
        raise WrongOrigin(f"checkpoint origin {cp.origin!r}, expected {origin!r}")
    return SignedCheckpoint(cp, verify_note(note, verifiers))


# --------------------------------------------------------------------------
# Names of our logs and witnesses.
# --------------------------------------------------------------------------


def _check_domain(domain: str) -> str:
    if not _DOMAIN.fullmatch(domain):
        raise BadKey(f"{domain!r} is not a lower-case DNS name (e.g. ledger.carrier.example)")
    return domain


def gateway_origin(domain: str, gateway_id: str) -> str:
    """`<domain>/edge-gateway/<gateway_id>`: the origin of one gateway's log.

    The domain is the operator's (a carrier owns its name), so two carriers' gateways
    with the same id never share an origin at a witness; the log's key has this same name.
    """
    if not _GATEWAY_ID.fullmatch(gateway_id):
        raise BadKey(f"gateway id {gateway_id!r}: expected 1-128 of A-Z a-z 0-9 . _ -")
    return f"{_check_domain(domain)}/edge-gateway/{gateway_id}"


def witness_name(domain: str, node_id: str) -> str:
    """`<domain>/ledger-witness/<node_id>`: the cosigner name of one ledger node."""
    if not _GATEWAY_ID.fullmatch(node_id):
        raise BadKey(f"ledger node id {node_id!r}: expected 1-128 of A-Z a-z 0-9 . _ -")
    return f"{_check_domain(domain)}/ledger-witness/{node_id}"
