"""Offline audit of an export directory: everything an auditor needs to check a gateway's
log, with nothing but the directory.

    DIR/checkpoint                   the latest committed checkpoint: signed note, cosignatures
    DIR/gateway.pem                  the log's public key(s), PEM (two during a key rotation)
    DIR/witnesses/<any name>         one file per ledger node: its cosignature vkey, one line
                                     (`<name>+<hex key ID>+<base64(0x04 || key)>`)
    DIR/checkpoints/<tree size>      every committed checkpoint of the run, signed note text
    DIR/consistency/<old>-<new>.txt  consistency proof between successive checkpoints,
                                     one base64 hash per line
    DIR/proofs/<tx_id>.tlog-proof    c2sp.org/tlog-proof@v1 bundles for a sample of
    DIR/leaves/<tx_id>.bin           transactions, and their leaf bytes

`audit(DIR)` checks that every checkpoint is signed by the log key and cosigned by at least
M of the witnesses, that each checkpoint is consistent with the one before (RFC 9162
2.1.4), that DIR/checkpoint is the largest of them, and that each leaf hashes to its tx_id
and is included in a checkpoint of the directory; it returns counts and the failures, the
first one first. `python -m gateway.formats.auditdir DIR [--witness-quorum M]` prints one
line and exits 0, or 65 when something does not verify. Reads the directory and nothing
else; every file read is bounded in size first.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.formats import merkle
from gateway.formats.checkpoint import Checkpoint, checkpoint_of
from gateway.formats.cosignature import CosignatureVerifier, parse_cosigner_vkey
from gateway.formats.note import (
    MAX_NOTE_BYTES,
    EcdsaVerifier,
    NoteError,
    b64decode_strict,
    parse_note,
    verify_note,
)
from gateway.formats.tlogproof import (
    MAX_PROOF_BYTES,
    ProofError,
    QuorumNotMet,
    WitnessPolicy,
    parse_tlog_proof,
    verify_tlog_proof,
)

EXIT_OK = 0
EXIT_DATAERR = 65  # sysexits.h: the directory does not verify
EXIT_NOINPUT = 66  # sysexits.h: the directory or a required file is missing
MAX_LEAF_BYTES = 4 * 1024 * 1024
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_FAILURES = 100  # kept in the report; more are counted
_SIZE = re.compile(r"0|[1-9][0-9]{0,19}", re.ASCII)
_TX_ID = re.compile(r"[0-9a-f]{64}", re.ASCII)
_PEM = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


class AuditInputError(Exception):
    """The directory lacks what an audit starts from (keys, witnesses, DIR/checkpoint)."""


@dataclass
class AuditReport:
    directory: str
    origin: str = ""
    latest_size: int = 0
    checkpoints: int = 0
    consistency_proofs: int = 0
    proofs: int = 0
    witnesses: int = 0
    quorum: int = 0
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0

    @property
    def ok(self) -> bool:
        return self.failure_count == 0

    @property
    def first_failure(self) -> str | None:
        return self.failures[0] if self.failures else None

    def fail(self, message: str) -> None:
        self.failure_count += 1
        if len(self.failures) < MAX_FAILURES:
            self.failures.append(message)

    def summary(self) -> str:
        counts = (
            f"{self.checkpoints} checkpoints up to size {self.latest_size}, "
            f"{self.consistency_proofs} consistency proofs, {self.proofs} inclusion proofs, "
            f"{self.quorum} of {self.witnesses} witnesses required"
        )
        if self.ok:
            return f"{self.directory}: OK: {self.origin}: {counts}"
        return (
            f"{self.directory}: FAILED ({self.failure_count} problems, first: "
            f"{self.first_failure}); {counts}"
        )


def _read(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise AuditInputError(f"{path} is {size} bytes, at most {limit}")
        with path.open("rb") as f:
            return f.read(limit + 1)[:limit]
    except OSError as e:
        raise AuditInputError(f"{path}: {e.strerror}") from None


def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def load_log_keys(pem_file: Path, origin: str) -> list[EcdsaVerifier]:
    """The log's key(s) from DIR/gateway.pem, as note verifiers under the log's origin."""
    data = _read(pem_file, MAX_KEY_FILE_BYTES)
    keys: list[EcdsaVerifier] = []
    for block in _PEM.findall(data):
        try:
            key = serialization.load_pem_public_key(block)
        except ValueError:
            raise AuditInputError(f"{pem_file}: a PEM block is not a public key") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise AuditInputError(f"{pem_file}: the log key is not an EC key")
        try:
            keys.append(EcdsaVerifier.from_public_key(origin, key))
        except NoteError as e:
            raise AuditInputError(f"{pem_file}: {e.detail}") from None
    if not keys:
        raise AuditInputError(f"{pem_file}: no PEM public key in it")
    return keys


def load_witnesses(directory: Path) -> list[CosignatureVerifier]:
    out: list[CosignatureVerifier] = []
    for path in _files(directory):
        text = _read(path, MAX_KEY_FILE_BYTES).decode("utf-8", "replace").strip()
        try:
            out.append(parse_cosigner_vkey(text))
        except NoteError as e:
            raise AuditInputError(f"{path}: not a witness vkey ({e.detail})") from None
    return out


def audit(
    directory: Path,
    witness_quorum: int | None = None,
    origin: str | None = None,
    min_proofs: int = 1,
) -> AuditReport:
    """Verify everything in an export directory. `witness_quorum` defaults to a majority
    of the witnesses listed; `origin`, if given, must be the log's. Raises
    AuditInputError when the keys or DIR/checkpoint cannot be read at all."""
    report = AuditReport(str(directory))
    latest_data = _read(directory / "checkpoint", MAX_NOTE_BYTES)
    try:
        latest = checkpoint_of(parse_note(latest_data))
    except NoteError as e:
        raise AuditInputError(f"{directory / 'checkpoint'}: {e.detail}") from None
    if origin is not None and latest.origin != origin:
        raise AuditInputError(f"the log's origin is {latest.origin!r}, expected {origin!r}")
    report.origin = latest.origin
    log_keys = load_log_keys(directory / "gateway.pem", latest.origin)
    witnesses = load_witnesses(directory / "witnesses")
    quorum = len(witnesses) // 2 + 1 if witness_quorum is None else witness_quorum
    try:
        policy = WitnessPolicy(tuple(witnesses), quorum)
    except NoteError as e:
        raise AuditInputError(f"{directory / 'witnesses'}: {e.detail}") from None
    report.witnesses, report.quorum = len(witnesses), quorum

    def check_note(path: Path, what: str) -> Checkpoint | None:
        try:
            return _verify_checkpoint(_read(path, MAX_NOTE_BYTES), log_keys, policy, latest.origin)
        except NoteError as e:
            report.fail(f"{what}: {e.detail}")
        except AuditInputError as e:
            report.fail(f"{what}: {e}")
        return None

    # Every committed checkpoint, by size.
    by_size: dict[int, Checkpoint] = {}
    for path in _files(directory / "checkpoints"):
        if not _SIZE.fullmatch(path.name):
            report.fail(f"checkpoints/{path.name[:80]}: not a tree size")
            continue
        cp = check_note(path, f"checkpoints/{path.name}")
        if cp is None:
            continue
        if cp.size != int(path.name):
            report.fail(f"checkpoints/{path.name}: holds the checkpoint of size {cp.size}")
            continue
        by_size[cp.size] = cp
    report.checkpoints = len(by_size)
    if check_note(directory / "checkpoint", "checkpoint") is not None:
        report.latest_size = latest.size
        top = max(by_size) if by_size else None
        if top is None or by_size[top] != latest:
            report.fail(
                f"checkpoint: size {latest.size} is not the largest of checkpoints/ ({top})"
            )

    # Consistency between successive checkpoints, and any other proof offered.
    sizes = sorted(by_size)
    needed = {(a, b) for a, b in itertools.pairwise(sizes) if a > 0}
    offered: dict[tuple[int, int], Path] = {}
    for path in _files(directory / "consistency"):
        m = re.fullmatch(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})\.txt", path.name)
        if m is None:
            report.fail(f"consistency/{path.name[:80]}: not <old size>-<new size>.txt")
            continue
        offered[(int(m.group(1)), int(m.group(2)))] = path
    for pair in sorted(needed | set(offered)):
        old, new = pair
        name = f"consistency/{old}-{new}.txt"
        if pair not in offered:
            report.fail(f"{name}: missing (successive checkpoints {old} and {new})")
            continue
        if old not in by_size or new not in by_size:
            report.fail(
                f"{name}: no verified checkpoint of size {old if old not in by_size else new}"
            )
            continue
        try:
            proof = _proof_lines(_read(offered[pair], 64 * 45))
        except (ValueError, AuditInputError) as e:
            report.fail(f"{name}: {e}")
            continue
        if not merkle.verify_consistency(
            old, new, proof, by_size[old].root_hash, by_size[new].root_hash
        ):
            report.fail(f"{name}: the tree of size {new} does not extend the tree of size {old}")
            continue
        report.consistency_proofs += 1

    # Inclusion proofs of sampled transactions.
    leaves = {p.name for p in _files(directory / "leaves")}
    for path in _files(directory / "proofs"):
        tx = path.name.removesuffix(".tlog-proof")
        if not path.name.endswith(".tlog-proof") or not _TX_ID.fullmatch(tx):
            report.fail(f"proofs/{path.name[:80]}: not <tx_id>.tlog-proof")
            continue
        leaves.discard(f"{tx}.bin")
        leaf_path = directory / "leaves" / f"{tx}.bin"
        if not leaf_path.is_file():
            report.fail(f"proofs/{path.name}: leaves/{tx}.bin is missing")
            continue
        try:
            leaf_hash = merkle.leaf_hash(_read(leaf_path, MAX_LEAF_BYTES))
            if leaf_hash.hex() != tx:
                report.fail(f"leaves/{tx}.bin: its leaf hash is {leaf_hash.hex()}, not its tx_id")
                continue
            bundle = parse_tlog_proof(_read(path, MAX_PROOF_BYTES))
            verified = verify_tlog_proof(bundle, leaf_hash, log_keys, policy, latest.origin)
        except NoteError as e:
            report.fail(f"proofs/{path.name}: {e.detail}")
            continue
        except AuditInputError as e:
            report.fail(f"proofs/{path.name}: {e}")
            continue
        if by_size.get(verified.checkpoint.size) != verified.checkpoint:
            report.fail(
                f"proofs/{path.name}: its checkpoint of size {verified.checkpoint.size} is not "
                "among checkpoints/"
            )
            continue
        report.proofs += 1
    for name in sorted(leaves):
        report.fail(f"leaves/{name[:80]}: no proof for it")
    if report.proofs < min_proofs:
        report.fail(f"proofs/: {report.proofs} verified inclusion proofs, {min_proofs} required")
    return report


def _verify_checkpoint(
    data: bytes, log_keys: Sequence[EcdsaVerifier], policy: WitnessPolicy, origin: str
) -> Checkpoint:
    """Signed by a log key, cosigned by the policy's quorum, of the expected origin."""
    note = parse_note(data)
    cp = checkpoint_of(note)
    if cp.origin != origin:
        raise ProofError(f"origin {cp.origin!r}, expected {origin!r}")
    verified = verify_note(note, [*log_keys, *policy.witnesses])
    ids = {(k.name, k.key_id) for k in log_keys}
    if not any((s.name, s.key_id) in ids for s in verified.verified):
        raise ProofError(f"not signed by the log key of {origin}")
    wids = {(w.name, w.key_id) for w in policy.witnesses}
    n = sum((s.name, s.key_id) in wids for s in verified.verified)
    if n < policy.threshold:
        raise QuorumNotMet(
            f"{n} of {len(policy.witnesses)} witnesses cosigned, {policy.threshold} required"
        )
    return cp


def _proof_lines(data: bytes) -> list[bytes]:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("not ASCII") from None
    if text and not text.endswith("\n"):
        raise ValueError("the last line does not end with a newline")
    out = []
    for line in text.splitlines():
        h = b64decode_strict(line)
        if len(h) != merkle.HASH_SIZE:
            raise ValueError(f"a hash is {len(h)} bytes, expected 32")
        out.append(h)
    if len(out) > 64:
        raise ValueError(f"{len(out)} hashes, at most 64")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gateway.formats.auditdir",
        description="Verify an edge-gateway export directory offline.",
    )
    p.add_argument("directory", type=Path)
    p.add_argument(
        "--witness-quorum",
        type=int,
        default=None,
        help="witnesses that must have cosigned each checkpoint (default: a majority)",
    )
    p.add_argument("--origin", default=None, help="the log origin to expect")
    p.add_argument(
        "--min-proofs", type=int, default=1, help="inclusion proofs required (default 1)"
    )
    args = p.parse_args(argv)
    if not args.directory.is_dir():
        print(f"{args.directory}: not a directory", file=sys.stderr)
        return EXIT_NOINPUT
    try:
        report = audit(args.directory, args.witness_quorum, args.origin, args.min_proofs)
    except AuditInputError as e:
        print(f"{args.directory}: cannot audit: {e}", file=sys.stderr)
        return EXIT_NOINPUT
    print(report.summary())
    if not report.ok:
        for failure in report.failures[1:10]:
            print(f"  also: {failure}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_DATAERR


if __name__ == "__main__":
    sys.exit(main())
