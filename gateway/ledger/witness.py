"""A ledger node as a transparency-log witness (c2sp.org/tlog-witness, tlog-cosignature).

Promise: a checkpoint is cosigned only after its log's key verified it and a consistency
proof from the last checkpoint this witness cosigned for that origin verified, and only
once the node's own checks and writes succeeded in the same SQLite transaction; the new
checkpoint is stored before the cosignature is returned. Two checkpoints of one log that
cannot both be true (one size, two roots; or a proof showing the log's new tree grew from
another tree than the one cosigned) are kept side by side as evidence and logged once.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.common.errors import ConfigError, GatewayError, OutputFileError
from gateway.formats import merkle
from gateway.formats.checkpoint import Checkpoint, CheckpointError, checkpoint_of
from gateway.formats.cosignature import Cosigner
from gateway.formats.note import (
    TYPE_ED25519,
    InvalidNoteSignature,
    Note,
    NoteError,
    NoteSignature,
    NoteVerifier,
    UnverifiedNote,
    check_key_name,
    ed25519_public_bytes,
    ed25519_signer_from_skey,
    key_id,
    parse_note,
    parse_vkey,
    verifier_index,
    verify_note,
)

log = logging.getLogger(__name__)

# c2sp.org/tlog-witness: a client MUST NOT send more than 63 consistency proof lines.
MAX_PROOF_LINES = 63
# SQLite integers stop at 2^63 - 1; a checkpoint may state up to 2^64 - 1.
MAX_SIZE = 2**63 - 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS witness_cosigned (
    origin       TEXT    NOT NULL,
    size         INTEGER NOT NULL,
    root_hash    BLOB    NOT NULL,
    note         BLOB    NOT NULL,   -- checkpoint body and the log signatures that verified
    cosignature  BLOB    NOT NULL,   -- this witness's cosignature line, as returned
    cosigned_ms  INTEGER NOT NULL,
    PRIMARY KEY (origin, size)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS witness_log_keys (
    origin       TEXT    NOT NULL,
    vkey         TEXT    NOT NULL,   -- a key added by a rotation (add_log), kept across restarts
    added_ms     INTEGER NOT NULL,
    PRIMARY KEY (origin, vkey)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS witness_evidence (
    id               INTEGER PRIMARY KEY,
    origin           TEXT    NOT NULL,
    kind             TEXT    NOT NULL,  -- same_size | inconsistent
    cosigned_size    INTEGER NOT NULL,
    cosigned_note    BLOB    NOT NULL,  -- what this witness cosigned, its cosignature included
    presented_note   BLOB    NOT NULL,  -- the contradicting note, exactly as received
    old_size         INTEGER NOT NULL,
    proof            TEXT    NOT NULL,  -- the consistency proof received, base64 lines
    pair_hash        BLOB    NOT NULL UNIQUE,
    recorded_ms      INTEGER NOT NULL
);
"""


# --- errors -------------------------------------------------------------------------------


class WitnessError(GatewayError):
    """A checkpoint this witness will not cosign; str() is one line, safe to show a client.

    `http_status` is the answer c2sp.org/tlog-witness gives for it."""

    http_status = 400


class BadRequest(WitnessError):
    """Malformed note or checkpoint, old size above the checkpoint's, too many proof lines."""

    http_status = 400


class UnknownLog(WitnessError):
    http_status = 404


class BadSignature(WitnessError):
    http_status = 403


class OldSizeMismatch(WitnessError):
    http_status = 409

    def __init__(self, origin: str, old_size: int, known_size: int) -> None:
        super().__init__(
            f"old size {old_size} is not {known_size}, the size this witness last cosigned "
            f"for {origin}"
        )
        self.known_size = known_size


class BadConsistencyProof(WitnessError):
    http_status = 422


class SplitView(WitnessError):
    """The log showed this witness two views; `evidence` is the witness_evidence row id."""

    def __init__(self, message: str, evidence: int, http_status: int) -> None:
        super().__init__(message)
        self.evidence = evidence
        self.http_status = http_status


# --- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class LogKey:
    """A log this witness follows: its origin and the keys that may sign its checkpoints
    (more than one during a key rotation overlap)."""

    origin: str
    verifiers: tuple[NoteVerifier, ...]

    def __post_init__(self) -> None:
        if not self.origin or any(ord(c) < 0x20 for c in self.origin):
            raise ConfigError(f"log origin {self.origin[:80]!r} is empty or not one line")
        if not self.verifiers:
            raise ConfigError(f"log {self.origin}: no key to verify its checkpoints with")
        try:
            verifier_index(self.verifiers)
        except NoteError as e:
            raise ConfigError(f"log {self.origin}: {e.detail}") from None


@dataclass(frozen=True)
class Evidence:
    id: int
    origin: str
    kind: str
    cosigned_size: int
    cosigned_note: bytes
    presented_note: bytes
    old_size: int
    proof: tuple[bytes, ...]
    recorded_ms: int


# --- the witness --------------------------------------------------------------------------


class Witness:
    """Cosigns checkpoints of the configured logs; state in the node's SQLite database.

    One lock serialises every use of the connection, so the check of the old size and the
    write of the new checkpoint are atomic (the race c2sp.org/tlog-witness describes) and
    the connection is never used by two threads at once (open it with
    check_same_thread=False when several threads call; isolation_level=None or the default,
    never inside a transaction of the caller's: the witness runs BEGIN IMMEDIATE itself).
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        name: str,
        key: Ed25519PrivateKey,
        logs: Iterable[LogKey],
        clock: Callable[[], float] = time.time,
    ) -> None:
        try:
            self._cosigner = Cosigner(check_key_name(name), key)
        except NoteError as e:
            raise ConfigError(f"witness name: {e.detail}") from None
        self._db = db
        self._clock = clock
        self._lock = threading.RLock()
        self._logs: dict[str, tuple[NoteVerifier, ...]] = {}
        for lk in logs:
            if lk.origin in self._logs:
                raise ConfigError(f"log {lk.origin} is configured twice")
            self._logs[lk.origin] = lk.verifiers
        self._pending: list[LogKey] | None = None  # add_log calls inside a transaction
        with self._lock, self._transaction():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
        for origin, vkey in db.execute("SELECT origin, vkey FROM witness_log_keys ORDER BY 1, 2"):
            if origin in self._logs:  # a log no longer configured stays forgotten
                try:
                    self._merge(LogKey(origin, (parse_vkey(vkey),)))
                except (NoteError, ConfigError) as e:
                    raise ConfigError(f"witness_log_keys: key for {origin}: {e}") from None

    @property
    def name(self) -> str:
        return self._cosigner.name

    @property
    def vkey(self) -> str:
        """The cosignature (type 0x04) vkey that verifiers of this witness configure."""
        return self._cosigner.verifier().vkey()

    def origins(self) -> list[str]:
        with self._lock:
            return sorted(self._logs)

    def verifiers(self, origin: str) -> tuple[NoteVerifier, ...]:
        with self._lock:
            return self._verifiers_of(origin)

    def _verifiers_of(self, origin: str) -> tuple[NoteVerifier, ...]:
        try:
            return self._logs[origin]
        except KeyError:
            raise UnknownLog(f"unknown log origin {origin[:200]!r}") from None

    # --- reads ----------------------------------------------------------------------------

    def known_size(self, origin: str) -> int:
        """The size this witness last cosigned for `origin`; 0 before the first checkpoint."""
        with self._lock:
            self._verifiers_of(origin)
            row = self._latest_row(origin)
            return 0 if row is None else row[0]

    def latest(self, origin: str) -> bytes | None:
        """The last checkpoint cosigned for `origin`, with this witness's cosignature line."""
        with self._lock:
            self._verifiers_of(origin)
            row = self._latest_row(origin)
            return None if row is None else row[2] + row[3]

    def cosigned(self, origin: str) -> list[bytes]:
        """Every checkpoint cosigned for `origin`, by size, each with its cosignature line:
        what an auditor checks pairwise for consistency."""
        with self._lock:
            rows = self._db.execute(
                "SELECT note, cosignature FROM witness_cosigned WHERE origin = ? ORDER BY size",
                (origin,),
            ).fetchall()
        return [bytes(n) + bytes(c) for n, c in rows]

    def evidence(self, origin: str | None = None) -> list[Evidence]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, origin, kind, cosigned_size, cosigned_note, presented_note,"
                " old_size, proof, recorded_ms FROM witness_evidence"
                + (" WHERE origin = ?" if origin is not None else "")
                + " ORDER BY id",
                (origin,) if origin is not None else (),
            ).fetchall()
        return [
            Evidence(
                id=r[0],
                origin=r[1],
                kind=r[2],
                cosigned_size=int(r[3]),
                cosigned_note=bytes(r[4]),
                presented_note=bytes(r[5]),
                old_size=int(r[6]),
                proof=tuple(base64.b64decode(x) for x in str(r[7]).split()),
                recorded_ms=r[8],
            )
            for r in rows
        ]

    def _latest_row(self, origin: str) -> tuple[int, bytes, bytes, bytes] | None:
        row = self._db.execute(
            "SELECT size, root_hash, note, cosignature FROM witness_cosigned WHERE origin = ?"
            " ORDER BY size DESC LIMIT 1",
            (origin,),
        ).fetchone()
        if row is None:
            return None
        return int(row[0]), bytes(row[1]), bytes(row[2]), bytes(row[3])

    def _row_at(self, origin: str, size: int) -> tuple[bytes, bytes, bytes] | None:
        row = self._db.execute(
            "SELECT root_hash, note, cosignature FROM witness_cosigned"
            " WHERE origin = ? AND size = ?",
            (origin, (size)),
        ).fetchone()
        return None if row is None else (bytes(row[0]), bytes(row[1]), bytes(row[2]))

    # --- add-checkpoint -------------------------------------------------------------------

    def add_checkpoint(
        self,
        note: bytes,
        old_size: int,
        proof: Sequence[bytes],
        check: Callable[[Checkpoint], None] | None = None,
    ) -> NoteSignature:
        """Verify `note` and cosign it, in the order of c2sp.org/tlog-witness.

        The checkpoint's origin must be configured (UnknownLog) and a key of that log must
        have signed it (BadSignature); the old size may not exceed the checkpoint's
        (BadRequest) and must be the size last cosigned (OldSizeMismatch, carrying it); the
        consistency proof from that checkpoint must verify (BadConsistencyProof; empty
        when the old size is 0); at equal sizes the roots must match. A checkpoint that
        contradicts one already cosigned raises SplitView after storing both as evidence.
        Then `check(checkpoint)` runs inside the same SQLite transaction: it may read and
        write the node's tables (it must not commit), and any exception it raises aborts
        the transaction, so nothing is stored and nothing cosigned.
        """
        parsed, cp = _parse(note)
        with self._lock:
            verifiers = self._verifiers_of(cp.origin)
            try:
                verified = verify_note(parsed, verifiers)
            except (UnverifiedNote, InvalidNoteSignature) as e:
                raise BadSignature(f"checkpoint of {cp.origin}: {e.detail}") from None
            log_sigs = tuple(verified.verified)
            if not 0 <= old_size <= cp.size:
                raise BadRequest(f"old size {old_size} exceeds the checkpoint size {cp.size}")
            if cp.size > MAX_SIZE:
                raise BadRequest(f"tree size {cp.size} is beyond what this witness stores (2^63-1)")
            if len(proof) > MAX_PROOF_LINES:
                raise BadRequest(f"{len(proof)} consistency proof hashes, at most 63")
            if any(len(h) != merkle.HASH_SIZE for h in proof):
                raise BadConsistencyProof("every consistency proof hash must be 32 bytes")
            # Strict parsing makes the text and cp.body() the same bytes; the text is what
            # the log signed, so it is what is stored and cosigned.
            stored = Note(parsed.text, log_sigs).serialise()
            with self._transaction():
                self._check_against(cp, note, old_size, proof)
                if check is not None:
                    check(cp)
                line = self._cosigner.signature(parsed.text, self._timestamp())
                self._db.execute(
                    "INSERT OR REPLACE INTO witness_cosigned (origin, size, root_hash, note,"
                    " cosignature, cosigned_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        cp.origin,
                        (cp.size),
                        cp.root_hash,
                        stored,
                        line.line().encode(),
                        _now_ms(self._clock),
                    ),
                )
            return line

    def _check_against(
        self, cp: Checkpoint, note: bytes, old_size: int, proof: Sequence[bytes]
    ) -> None:
        latest = self._latest_row(cp.origin)
        known = 0 if latest is None else latest[0]
        if cp.size <= known:
            same = self._row_at(cp.origin, cp.size)
            if same is not None and same[0] != cp.root_hash:
                ev = self._keep_evidence(
                    cp, "same_size", cp.size, same[1] + same[2], note, old_size, proof
                )
                raise SplitView(
                    f"split view of {cp.origin}: tree size {cp.size} has root "
                    f"{_b64(cp.root_hash)} here and {_b64(same[0])} in the checkpoint this "
                    f"witness cosigned (evidence {ev})",
                    ev,
                    409,
                )
        if old_size != known:
            raise OldSizeMismatch(cp.origin, old_size, known)
        if old_size == 0:
            if proof:
                raise BadConsistencyProof("old size 0 takes an empty consistency proof")
            return
        assert latest is not None
        old_root = latest[1]
        if old_size == cp.size:
            # Roots differ only in a split view, caught above.
            if proof:
                raise BadConsistencyProof("equal sizes take an empty consistency proof")
            return
        roots = merkle.roots_from_consistency_proof(old_size, cp.size, proof, old_root)
        if roots is not None and roots[1] == cp.root_hash:
            if roots[0] == old_root:
                return
            # The proof opens the new root (so its hashes are the new tree's), and the new
            # tree's first old_size leaves are not the tree this witness cosigned: a fork.
            ev = self._keep_evidence(
                cp, "inconsistent", old_size, latest[2] + latest[3], note, old_size, proof
            )
            raise SplitView(
                f"split view of {cp.origin}: the tree of size {cp.size} grew from a tree of "
                f"size {old_size} with root {_b64(roots[0])}, not {_b64(old_root)} that this "
                f"witness cosigned (evidence {ev})",
                ev,
                422,
            )
        log.warning(
            "refused checkpoint %s/%d: consistency proof from size %d does not verify",
            cp.origin,
            cp.size,
            old_size,
        )
        raise BadConsistencyProof(
            f"consistency proof from size {old_size} to {cp.size} does not verify"
        )

    def _keep_evidence(
        self,
        cp: Checkpoint,
        kind: str,
        cosigned_size: int,
        cosigned_note: bytes,
        presented: bytes,
        old_size: int,
        proof: Sequence[bytes],
    ) -> int:
        """Store both notes (committed even though the checkpoint is refused); ERROR once
        per pair of checkpoints."""
        pair = hashlib.sha256(
            parse_note(cosigned_note).text.encode() + b"\x00" + cp.body().encode()
        ).digest()
        cur = self._db.execute(
            "INSERT OR IGNORE INTO witness_evidence (origin, kind, cosigned_size, cosigned_note,"
            " presented_note, old_size, proof, pair_hash, recorded_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                cp.origin,
                kind,
                (cosigned_size),
                cosigned_note,
                presented,
                (old_size),
                "\n".join(_b64(h) for h in proof),
                pair,
                _now_ms(self._clock),
            ),
        )
        row = self._db.execute(
            "SELECT id FROM witness_evidence WHERE pair_hash = ?", (pair,)
        ).fetchone()
        evidence_id = int(row[0])
        self._db.execute("COMMIT")
        self._db.execute("BEGIN IMMEDIATE")
        if cur.rowcount == 1:
            log.error(
                "SPLIT VIEW: log %s presented a checkpoint of size %d (root %s) that "
                "contradicts the checkpoint of size %d this witness cosigned; both kept as "
                "witness_evidence %d",
                cp.origin,
                cp.size,
                _b64(cp.root_hash),
                cosigned_size,
                evidence_id,
            )
        return evidence_id

    # --- keys -----------------------------------------------------------------------------

    def add_log(self, key: LogKey) -> None:
        """Trust more keys for a log (a rotation adds the new key beside the old one) or
        follow a new log. Keys are kept in witness_log_keys across restarts; called from a
        `check` hook they are stored, and used, only if that checkpoint is committed."""
        with self._lock, self._transaction() if self._pending is None else _nothing():
            now = _now_ms(self._clock)
            for v in key.verifiers:
                self._db.execute(
                    "INSERT OR IGNORE INTO witness_log_keys (origin, vkey, added_ms)"
                    " VALUES (?, ?, ?)",
                    (key.origin, v.vkey(), now),
                )
            assert self._pending is not None
            self._pending.append(key)

    def _merge(self, key: LogKey) -> None:
        merged = LogKey(key.origin, self._logs.get(key.origin, ()) + key.verifiers)
        index = verifier_index(merged.verifiers)  # refuses two keys under one name and ID
        self._logs[key.origin] = tuple(index.values())

    # --- plumbing -------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._db.in_transaction:
            raise GatewayError("witness: the node's database connection is inside a transaction")
        self._db.execute("BEGIN IMMEDIATE")
        self._pending = []
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            # Also after a failed COMMIT: leave no transaction open behind.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._pending = None
            raise
        pending, self._pending = self._pending, None
        for key in pending:
            self._merge(key)

    def _timestamp(self) -> int:
        return int(self._clock())


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _parse(note: bytes) -> tuple[Note, Checkpoint]:
    try:
        parsed = parse_note(note)
        return parsed, checkpoint_of(parsed)
    except CheckpointError as e:
        raise BadRequest(f"not a checkpoint: {e.detail}") from None
    except NoteError as e:
        raise BadRequest(f"not a signed note: {e.detail}") from None


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode("ascii")


def _now_ms(clock: Callable[[], float]) -> int:
    return int(clock() * 1000)


# --- the node's key -----------------------------------------------------------------------


def keygen(name: str, out: Path) -> str:
    """Write a new Ed25519 witness key for `name` to `out` (mode 0600, never overwriting)
    as a C2SP note signer key, `PRIVATE+KEY+<name>+<hex id>+<base64(0x01 || seed)>`, and
    return the cosignature vkey that verifiers of this witness configure."""
    try:
        check_key_name(name)
    except NoteError as e:
        raise ConfigError(f"--name: {e.detail}") from None
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes_raw()
    pub = ed25519_public_bytes(key)
    skey = (
        f"PRIVATE+KEY+{name}+{key_id(name, TYPE_ED25519, pub).hex()}+"
        f"{_b64(bytes([TYPE_ED25519]) + seed)}\n"
    )
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise OutputFileError(f"--out {out} exists: a witness key is never overwritten") from None
    except OSError as e:
        raise OutputFileError(f"--out {out}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(skey)
        f.flush()
        os.fsync(f.fileno())
    return Cosigner(name, key).verifier().vkey()


def load_key(path: Path) -> tuple[str, Ed25519PrivateKey]:
    """The witness name and Ed25519 key from a file `keygen` wrote; refused if others can
    read it."""
    try:
        st = path.stat()
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"witness key {path}: cannot read it ({e})") from None
    if st.st_mode & 0o077:
        raise ConfigError(
            f"witness key {path} is readable by others (mode {st.st_mode & 0o777:04o}): "
            "chmod 600 it"
        )
    try:
        signer = ed25519_signer_from_skey(text)
    except NoteError as e:
        raise ConfigError(f"witness key {path}: {e.detail}") from None
    return signer.name, signer.private_key


def cmd_keygen(name: str, out: Path) -> int:
    """Write the key and print its vkey (stdout), the line verifiers configure."""
    print(keygen(name, out))
    return 0
