"""Audit a gateway's log from its spool, as an auditor with the gateway's public key would.

Every checkpoint must verify under the log key (the origin as key name), the checkpoints
must follow each other batch by batch (each starts where the previous ended), the leaves
of each batch in spool order must give its root, and each checkpoint must be consistent
with the one before it (an RFC 9162 consistency proof served from the stored tiles).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.edge import tlog
from gateway.edge.spool import Spool, StoredCheckpoint
from gateway.formats import batchformat, checkpoint, cosignature, merkle, note


@dataclass
class LogAudit:
    checkpoints: int = 0
    leaves: int = 0
    committed: int = 0  # checkpoints at quorum
    consistency_checked: int = 0
    notes: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.checkpoints > 0


def log_verifier(origin: str, public_pem: bytes) -> note.EcdsaVerifier:
    key = serialization.load_pem_public_key(public_pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("the gateway's public key is not an EC key")
    return note.EcdsaVerifier.from_public_key(origin, key)


def log_verifiers(origin: str, public_pem: bytes) -> list[note.EcdsaVerifier]:
    """One verifier per PEM block: a log's keys before and after a key rotation."""
    return [
        note.EcdsaVerifier.from_public_key(origin, k)
        for k in batchformat.load_public_keys(public_pem)
    ]


def audit_spool(spool: Path, origin: str, public_pem: bytes, max_errors: int = 20) -> LogAudit:
    """Check the whole log kept in a spool (read-only)."""
    verifiers = log_verifiers(origin, public_pem)
    out = LogAudit()
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")  # one snapshot of a spool the gateway may still be writing
        rows = conn.execute(
            "SELECT size, seq, first_index, first_rowid, last_rowid, root, note, created_ms,"
            " committed_ms FROM log_checkpoint ORDER BY size"
        ).fetchall()
        fetch = tlog.sqlite_fetch(conn)
        prev: StoredCheckpoint | None = None
        for row in rows:
            cp = StoredCheckpoint(*row)
            problem = _check_one(conn, fetch, verifiers, origin, cp, prev)
            if problem:
                out.errors.append(problem)
                if len(out.errors) >= max_errors:
                    break
            elif prev is not None:
                out.consistency_checked += 1
            out.checkpoints += 1
            out.committed += cp.committed_ms is not None
            out.leaves = cp.size
            out.notes.append(cp.note)
            prev = cp
    finally:
        conn.close()
    return out


def _check_one(
    conn: sqlite3.Connection,
    fetch: tlog.TileFetch,
    verifiers: list[note.EcdsaVerifier],
    origin: str,
    cp: StoredCheckpoint,
    prev: StoredCheckpoint | None,
) -> str | None:
    try:
        body = checkpoint.open_checkpoint(cp.note, verifiers, origin).checkpoint
    except note.NoteError as e:
        return f"checkpoint {cp.size}: {e}"
    if body.size != cp.size or body.root_hash != cp.root:
        return f"checkpoint {cp.size}: the signed note says size {body.size}"
    expected_first = 0 if prev is None else prev.size
    if cp.first_index != expected_first:
        return f"checkpoint {cp.size} starts at leaf {cp.first_index}, expected {expected_first}"
    if prev is not None and cp.seq != prev.seq + 1:
        return f"checkpoint {cp.size} is of batch {cp.seq}, after batch {prev.seq}"
    reader = tlog.TileReader(cp.size, fetch)
    try:
        if reader.root() != cp.root:
            return f"checkpoint {cp.size}: the stored tiles give another root"
        ids = Spool.q_tx_ids(conn, cp.first_rowid, cp.last_rowid)
        if len(ids) == cp.size - cp.first_index:
            # Not pruned: the batch's transactions are the leaves, in spool order.
            for i, tx_id in enumerate(ids):
                if reader(0, cp.first_index + i) != tx_id:
                    return f"checkpoint {cp.size}: leaf {cp.first_index + i} is not its tx_id"
        elif ids:
            return f"checkpoint {cp.size}: {len(ids)} transactions for {cp.size - cp.first_index}"
        if prev is not None:
            proof = reader.consistency_proof(prev.size)
            if not merkle.verify_consistency(prev.size, cp.size, proof, prev.root, cp.root):
                return f"checkpoints {prev.size} and {cp.size} are not consistent"
    except (tlog.LogStateError, ValueError, IndexError) as e:
        return f"checkpoint {cp.size}: {e}"
    return None


@dataclass
class WitnessAudit:
    """One ledger node's cosigned checkpoints of one log."""

    node_id: str
    cosigned: int = 0
    consistent_pairs: int = 0
    roots: dict[int, bytes] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def audit_witness(
    node_id: str,
    ledger_db: Path,
    origin: str,
    public_pem: bytes,
    witness_vkey: str,
    spool: Path,
    max_errors: int = 20,
) -> WitnessAudit:
    """Every checkpoint the node cosigned carries the log key's signature and the node's
    cosignature, and each is consistent with the one it cosigned before: an RFC 9162
    consistency proof from the gateway's own tiles (not the node's) must join their
    roots. Both databases are opened read-only."""
    out = WitnessAudit(node_id)
    log_keys = log_verifiers(origin, public_pem)
    witness = cosignature.parse_cosigner_vkey(witness_vkey)
    node = sqlite3.connect(f"file:{ledger_db}?mode=ro", uri=True, isolation_level=None)
    gw = sqlite3.connect(f"file:{spool}?mode=ro", uri=True, isolation_level=None)
    try:
        # Snapshots, the node's first: the gateway stores a checkpoint before any node
        # sees it, so its spool then holds every tile the node's checkpoints need.
        node.execute("BEGIN")
        gw.execute("BEGIN")
        rows = node.execute(
            "SELECT size, root_hash, note, cosignature FROM witness_cosigned"
            " WHERE origin = ? ORDER BY size",
            (origin,),
        ).fetchall()
        fetch = tlog.sqlite_fetch(gw)
        prev: tuple[int, bytes] | None = None
        for size, root, signed, line in rows:
            size, root = int(size), bytes(root)
            problem = None
            try:
                opened = checkpoint.open_checkpoint(
                    bytes(signed) + bytes(line), [*log_keys, witness], origin
                )
                names = {s.name for s in opened.note.verified}
                if names != {origin, witness.name}:
                    problem = f"checkpoint {size}: signed by {sorted(names)}"
                elif opened.checkpoint.size != size or opened.checkpoint.root_hash != root:
                    problem = f"checkpoint {size}: the stored note says otherwise"
                elif prev is not None:
                    reader = tlog.TileReader(size, fetch)
                    proof = reader.consistency_proof(prev[0])
                    if not merkle.verify_consistency(prev[0], size, proof, prev[1], root):
                        problem = f"cosigned checkpoints {prev[0]} and {size} are not consistent"
            except (note.NoteError, tlog.LogStateError, ValueError, IndexError) as e:
                problem = f"checkpoint {size}: {e}"
            if problem is not None:
                out.errors.append(f"{node_id}: {problem}")
                if len(out.errors) >= max_errors:
                    break
            elif prev is not None:
                out.consistent_pairs += 1
            out.cosigned += 1
            out.roots[size] = root
            prev = (size, root)
    finally:
        node.close()
        gw.close()
    return out


def same_roots(audits: list[WitnessAudit], spool: Path) -> list[str]:
    """Checkpoints of one size must have one root, at every node and in the spool."""
    seen: dict[int, tuple[str, bytes]] = {}
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        for size, root in conn.execute("SELECT size, root FROM log_checkpoint"):
            seen[int(size)] = ("the gateway", bytes(root))
    finally:
        conn.close()
    errors = []
    for a in audits:
        for size, root in a.roots.items():
            if size in seen and seen[size][1] != root:
                errors.append(f"{a.node_id} and {seen[size][0]} hold two roots at size {size}")
            seen.setdefault(size, (a.node_id, root))
    return errors
