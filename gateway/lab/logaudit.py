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
from gateway.formats import checkpoint, merkle, note


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


def audit_spool(spool: Path, origin: str, public_pem: bytes, max_errors: int = 20) -> LogAudit:
    """Check the whole log kept in a spool (read-only)."""
    verifier = log_verifier(origin, public_pem)
    out = LogAudit()
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT size, seq, first_index, first_rowid, last_rowid, root, note, created_ms,"
            " committed_ms FROM log_checkpoint ORDER BY size"
        ).fetchall()
        fetch = tlog.sqlite_fetch(conn)
        prev: StoredCheckpoint | None = None
        for row in rows:
            cp = StoredCheckpoint(*row)
            problem = _check_one(conn, fetch, verifier, origin, cp, prev)
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
        last = Spool.q_last_batch(conn)
        if last is not None and (prev is None or prev.seq != last.seq):
            out.errors.append(
                f"the spool's last batch is {last.seq}, its last checkpoint is of batch "
                f"{None if prev is None else prev.seq}"
            )
    finally:
        conn.close()
    return out


def _check_one(
    conn: sqlite3.Connection,
    fetch: tlog.TileFetch,
    verifier: note.EcdsaVerifier,
    origin: str,
    cp: StoredCheckpoint,
    prev: StoredCheckpoint | None,
) -> str | None:
    try:
        body = checkpoint.open_checkpoint(cp.note, [verifier], origin).checkpoint
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
