"""The spool: the gateway's only shared state, SQLite in WAL mode on disk.

Promise 1 lives here: an append's Future resolves only after its group commit
is durable (WAL, synchronous=FULL, fsync at commit), so an MQTT PUBACK or a
gRPC answer sent from that Future never acknowledges what a kill -9 could
lose. Every write runs on one writer thread (no lock contention, group commit
for free); reads run on a small pool with their own connections.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import fcntl
import functools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from gateway.common.errors import SpoolError, SpoolIntegrityError, SpoolInUse
from gateway.edge import metrics, tlog
from gateway.edge.config import SpoolConfig

log = logging.getLogger("gateway.edge.spool")
T = TypeVar("T")

SCHEMA_VERSION = 4
# Schema 3 (the unique index on tx (device_id, device_seq)) is converted when opened.
CONVERTIBLE_SCHEMA = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
-- AUTOINCREMENT keeps rowids monotonic, so "pending" is simply rowid > the last batch's last_rowid.
CREATE TABLE IF NOT EXISTS tx (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    device_seq INTEGER NOT NULL,
    payload_sha256 BLOB NOT NULL,
    tx_id BLOB NOT NULL,
    leaf BLOB NOT NULL,
    size INTEGER NOT NULL,
    received_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS device (
    device_id TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reject (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    device_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    message BLOB NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
-- Per device, the highest seq whose transaction retention has pruned.
CREATE TABLE IF NOT EXISTS pruned (
    device_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reject_unpublished ON reject (published) WHERE published = 0;
-- A seq at or below what retention pruned for its device is never stored again, whichever
-- process writes it (the intake processes do not share the pruning process's memory).
CREATE TRIGGER IF NOT EXISTS tx_beyond_retention BEFORE INSERT ON tx
WHEN NEW.device_seq <= (SELECT seq FROM pruned WHERE device_id = NEW.device_id)
BEGIN SELECT RAISE(IGNORE); END;
-- The gateway's log (gateway.edge.tlog), written by the main process when a batch is cut.
-- Tiles of the RFC 9162 tree over every transaction in spool order (c2sp.org/tlog-tiles).
CREATE TABLE IF NOT EXISTS log_tile (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
-- The batches: one row each, the log's leaves [first_index, size) (spool rowids
-- first_rowid..last_rowid) and the signed checkpoint of the tree after them, the batch's
-- only signature. committed_ms: when the forwarder's quorum cosigned this checkpoint; a
-- batch is committed once any checkpoint at or beyond its size is.
CREATE TABLE IF NOT EXISTS log_checkpoint (
    size INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    first_index INTEGER NOT NULL,
    first_rowid INTEGER NOT NULL,
    last_rowid INTEGER NOT NULL,
    root BLOB NOT NULL,
    note BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    committed_ms INTEGER
);
CREATE INDEX IF NOT EXISTS log_checkpoint_by_last_rowid ON log_checkpoint (last_rowid);
-- The batches as readers (status, the lab's tools) count them: when each was committed,
-- that is when the first checkpoint at or beyond it was cosigned by the quorum.
CREATE VIEW IF NOT EXISTS batch AS
SELECT seq, size, first_index, first_rowid, last_rowid, size - first_index AS tx_count,
    created_ms,
    (SELECT c.committed_ms FROM log_checkpoint AS c
        WHERE c.size >= b.size AND c.committed_ms IS NOT NULL ORDER BY c.size LIMIT 1)
        AS committed_ms
FROM log_checkpoint AS b;
-- Witness cosignatures of a checkpoint: the signature line a ledger node returned.
CREATE TABLE IF NOT EXISTS log_cosignature (
    size INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    line TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (size, node_id)
) WITHOUT ROWID;
"""

# ---- the tx_id lookup key (issue 14) -------------------------------------------------
# GetTransaction finds a transaction by tx_id. An index on tx (tx_id) cost the intake's
# group commit about 20 us per row (a random 32-byte key: nearly every row dirties its
# own index page, written to the WAL and copied again at checkpoint). Instead the main
# process keys batched rows in a compact table, in the transaction that stores the batch
# that brings the unkeyed batched rows to TX_KEY_CHUNK_ROWS, sorted by key (a chunk of n
# sorted keys dirties each page it touches once, not once per key): the first 8 bytes of
# tx_id as a signed INTEGER (tx_key_of) and the row's rowid, both in the key, so two
# tx_ids sharing 8 bytes are two entries; a lookup compares the full tx_id. meta
# 'tx_keyed_upto' is the last rowid keyed: a row above it is found by scanning the tail
# (rowid > tx_keyed_upto), at most TX_KEY_CHUNK_ROWS + batch.max_tx batched rows and
# the unbatched ones (which the batcher keeps near batch.max_tx; spool.max_depth bounds
# them). A spool written before this change (index tx_by_id, no tx_key) is converted
# when it is opened: its rows are keyed and the index dropped.
TX_KEY_SCHEMA = """
CREATE TABLE IF NOT EXISTS tx_key (
    k INTEGER NOT NULL,
    tx_rowid INTEGER NOT NULL,
    PRIMARY KEY (k, tx_rowid)
) WITHOUT ROWID;
"""
TX_KEY_CHUNK_ROWS = 8192
_KEYED_UPTO = (
    "(SELECT coalesce(max(CAST(value AS INTEGER)), 0) FROM meta WHERE key = 'tx_keyed_upto')"
)


def tx_key_of(tx_id: bytes) -> int:
    """The tx_key table's key of a tx_id: its first 8 bytes as a signed 64-bit integer."""
    return int.from_bytes(tx_id[:8], "big", signed=True)


def _key_rows(conn: sqlite3.Connection, upto: int, force: bool = False) -> None:
    """Key the rows after meta 'tx_keyed_upto' up to rowid `upto`, in key order, if
    they are TX_KEY_CHUNK_ROWS or more (or `force`); runs in the caller's transaction."""
    after = conn.execute(f"SELECT {_KEYED_UPTO}").fetchone()[0]
    if upto <= after or (upto - after < TX_KEY_CHUNK_ROWS and not force):
        return
    insert_rows(
        conn,
        "INSERT INTO tx_key (k, tx_rowid) VALUES ",
        " ON CONFLICT DO NOTHING",
        sorted(
            (tx_key_of(r[1]), r[0])
            for r in conn.execute(
                "SELECT rowid, tx_id FROM tx WHERE rowid > ? AND rowid <= ?", (after, upto)
            )
        ),
    )
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('tx_keyed_upto', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(upto),),
    )


def _upgrade_tx_key(conn: sqlite3.Connection) -> None:
    """Convert a spool that still has the index tx_by_id: key its rows, drop the index.
    Runs at open, inside the writers' turn, once."""
    if (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'tx_by_id'"
        ).fetchone()
        is None
    ):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        _key_rows(conn, conn.execute("SELECT coalesce(max(rowid), 0) FROM tx").fetchone()[0], True)
        conn.execute("DROP INDEX tx_by_id")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# ---- exactly once per (device, seq), keyed in chunks (issue 14) -----------------------
# A redelivered or replayed (device_id, device_seq) must be found before it is stored a
# second time. A unique index on tx (device_id, device_seq) did that at a cost of about
# 18 us per row of the intake's group commit: 1,000 devices each appending to their own
# key range put nearly every row on its own index page, written to the WAL and copied again
# at checkpoint. Instead:
# - tx_dev holds (device_id, device_seq) -> tx rowid for the rows up to meta
#   'dev_keyed_upto', filled in chunks of DEV_KEY_CHUNK_ROWS sorted by key (a device's
#   several new keys share a page);
# - each writer keeps the rows above it (the tail) in memory, by key, and per device the
#   highest seq stored (from the device table, which every group commit maintains in the
#   same transaction as its rows). Inside its write transaction it first reads what other
#   writers committed since its last one (rows above the highest rowid it knew).
# A seq above its device's highest is new: the common case costs no read. Anything else
# is looked up in the tail, then in tx_dev. Keying a chunk checks the promise again: a
# (device_id, device_seq) twice would violate tx_dev's key and fail the group commit.
DEV_KEY_SCHEMA = """
CREATE TABLE IF NOT EXISTS tx_dev (
    device_id TEXT NOT NULL,
    device_seq INTEGER NOT NULL,
    tx_rowid INTEGER NOT NULL,
    PRIMARY KEY (device_id, device_seq)
) WITHOUT ROWID;
"""
DEV_KEY_CHUNK_ROWS = 8192
# Devices whose highest seq a writer keeps in memory; past this it starts again empty
# (and reads each device's from the device table when next seen).
DEV_LAST_SEQ_CACHE = 200_000


def _set_meta(conn: sqlite3.Connection, key: str, value: int) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, str(value)),
    )


def _meta_int(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return 0 if row is None else int(row[0])


def _key_devices(conn: sqlite3.Connection, after: int, upto: int) -> None:
    """Key the rows after rowid `after` up to `upto` in tx_dev, in key order, and move
    meta 'dev_keyed_upto' to `upto`; in the caller's transaction."""
    insert_rows(
        conn,
        "INSERT INTO tx_dev (device_id, device_seq, tx_rowid) VALUES ",
        "",
        sorted(
            conn.execute(
                "SELECT device_id, device_seq, rowid FROM tx WHERE rowid > ? AND rowid <= ?",
                (after, upto),
            )
        ),
    )
    _set_meta(conn, "dev_keyed_upto", upto)


class _DeviceSeqs:
    """One writer's view of which (device_id, device_seq) the spool holds: the unkeyed
    tail by key, each device's highest seq. Used on the writer thread only, inside its
    write transaction; what a transaction adds is applied once it committed."""

    def __init__(self) -> None:
        self.loaded = False  # read at a writer's first group commit, not at open
        self.upto = 0  # rows up to here are in tx_dev
        self.seen = 0  # every row up to here is reflected below
        self.tail: dict[tuple[str, int], int] = {}
        self.last: dict[str, int] = {}

    def load(self, conn: sqlite3.Connection) -> None:
        self.loaded = True
        self.upto = _meta_int(conn, "dev_keyed_upto")
        self.seen = self.upto
        self.tail.clear()
        self.last.clear()
        self.sync(conn)

    def sync(self, conn: sqlite3.Connection) -> None:
        """Take in what other writers committed (in the caller's write transaction)."""
        top = conn.execute("SELECT coalesce(max(rowid), 0) FROM tx").fetchone()[0]
        if top > self.seen:
            last = self.last
            for rowid, device, seq in conn.execute(
                "SELECT rowid, device_id, device_seq FROM tx WHERE rowid > ?", (self.seen,)
            ):
                self.tail[(device, seq)] = rowid
                if device in last and seq > last[device]:
                    last[device] = seq
            self.seen = top
        upto = _meta_int(conn, "dev_keyed_upto")
        if upto != self.upto:
            self.upto = upto
            self.tail = {k: r for k, r in self.tail.items() if r > upto}

    def highest(self, conn: sqlite3.Connection, devices: Iterable[str]) -> dict[str, int]:
        """Each device's highest seq stored (-1 for a device never seen)."""
        last = self.last
        missing = [d for d in set(devices) if d not in last]
        if missing:
            if len(last) + len(missing) > DEV_LAST_SEQ_CACHE:
                last.clear()
            for d in missing:
                last[d] = -1
            for i in range(0, len(missing), 500):
                part = missing[i : i + 500]
                last.update(
                    conn.execute(
                        "SELECT device_id, last_seq FROM device WHERE device_id IN"
                        f" ({', '.join('?' * len(part))})",
                        part,
                    ).fetchall()
                )
        return last

    def find(self, conn: sqlite3.Connection, device: str, seq: int) -> tuple[bytes, bytes] | None:
        """(payload_sha256, tx_id) of the stored (device, seq), or None."""
        rowid = self.tail.get((device, seq))
        if rowid is None:
            row = conn.execute(
                "SELECT tx_rowid FROM tx_dev WHERE device_id = ? AND device_seq = ?",
                (device, seq),
            ).fetchone()
            if row is None:
                return None
            rowid = row[0]
        found = conn.execute(
            "SELECT payload_sha256, tx_id FROM tx WHERE rowid = ?", (rowid,)
        ).fetchone()
        return None if found is None else (found[0], found[1])

    def committed(self, new: list[tuple[tuple[str, int], int]], top: int, upto: int) -> None:
        """The transaction that stored `new` ((device, seq), rowid) committed; rows up to
        `top` exist, those up to `upto` are keyed."""
        last = self.last
        tail = self.tail
        for key, rowid in new:
            if rowid > upto:
                tail[key] = rowid
            device, seq = key
            # A device not in memory (never, or forgotten) is read when next seen.
            cur = last.get(device)
            if cur is not None and seq > cur:
                last[device] = seq
        self.seen = max(self.seen, top)
        if upto != self.upto:
            self.upto = upto
            self.tail = {k: r for k, r in self.tail.items() if r > upto}


def _upgrade_device_key(conn: sqlite3.Connection) -> None:
    """Convert a spool of schema 3 (a unique index on tx (device_id, device_seq)): the tx
    table is rebuilt without it, its rows keyed in tx_dev. Runs at open, inside the
    writers' turn, once; a spool of 1,000,000 rows takes some seconds."""
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if version is None or version[0] != str(CONVERTIBLE_SCHEMA):
        return
    log.info("spool: converting schema %d to %d", CONVERTIBLE_SCHEMA, SCHEMA_VERSION)
    conn.execute("BEGIN IMMEDIATE")
    try:
        cols = "device_id, device_seq, payload_sha256, tx_id, leaf, size, received_ms"
        ddl = SCHEMA.split("CREATE TABLE IF NOT EXISTS tx (", 1)[1].split(");", 1)[0]
        conn.execute(f"CREATE TABLE tx_next ({ddl})")
        conn.execute(f"INSERT INTO tx_next (rowid, {cols}) SELECT rowid, {cols} FROM tx")
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'tx'").fetchone()
        conn.execute("DROP TABLE tx")
        conn.execute("ALTER TABLE tx_next RENAME TO tx")
        if row is not None:
            conn.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'tx'", row)
        trigger = SCHEMA.split("CREATE TRIGGER", 1)[1].split("END;", 1)[0]
        conn.execute(f"CREATE TRIGGER{trigger}END;")
        conn.execute(
            "INSERT INTO device (device_id, last_seq, last_seen_ms)"
            " SELECT device_id, max(device_seq), max(received_ms) FROM tx WHERE true"
            " GROUP BY device_id ON CONFLICT (device_id) DO UPDATE SET"
            " last_seq = max(last_seq, excluded.last_seq)"
        )
        conn.execute("DELETE FROM tx_dev")
        top = conn.execute("SELECT coalesce(max(rowid), 0) FROM tx").fetchone()[0]
        _key_devices(conn, 0, top)
        _set_meta(conn, "schema_version", SCHEMA_VERSION)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Incoming(NamedTuple):
    """A decoded transaction on its way into the spool. A NamedTuple, not a frozen
    dataclass: one is built per transaction on the intake's hot path, and a frozen
    dataclass's __init__ (object.__setattr__ per field) took 1.1 µs where this takes 0.4."""

    device_id: str
    device_seq: int
    payload_sha256: bytes
    tx_id: bytes  # leaf hash
    leaf: bytes
    received_ms: int


@dataclass(frozen=True, slots=True)
class RejectRecord:
    """A refused payload; `message` is the dead-letter JSON to publish. `count` is how many
    rejected payloads the row stands for (0 for a summary of rejects not stored)."""

    reason: str
    device_id: str
    topic: str
    message: bytes
    received_ms: int
    count: int = 1


@dataclass(frozen=True, slots=True)
class NotStored:
    """A reject over its device's budget: counted and acknowledged, nothing stored. It
    goes through the writer so its acknowledgement leaves with its group, in order."""


NOT_STORED = NotStored()


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same (device, seq), same content: acknowledged again
    CONFLICT = "conflict"  # same (device, seq), other content: recorded as a reject
    REJECT_RECORDED = "reject_recorded"
    # The seq is at or below what retention already pruned for this device: the
    # spool can no longer tell a redelivery from a replay, so it is refused.
    BEYOND_RETENTION = "beyond_retention"
    NOT_STORED = "not_stored"  # a NotStored append: nothing written


class AppendResult(NamedTuple):
    """One per append, on the writer thread (a NamedTuple for the reason Incoming is)."""

    outcome: Outcome
    tx_id: bytes = b""
    reject_id: int = 0


class PendingTx(NamedTuple):
    """A spooled transaction the batcher has yet to cut (one per transaction: a NamedTuple
    for the reason Incoming is)."""

    rowid: int
    tx_id: bytes
    size: int
    received_ms: int


@dataclass(frozen=True, slots=True)
class TxRecord:
    rowid: int
    tx_id: bytes
    leaf: bytes
    device_id: str
    device_seq: int
    received_ms: int


@dataclass(frozen=True, slots=True)
class NewlyCommitted:
    """Batches a cosignature committed: how many, the last seq, their transactions'
    received times (for the commit latency)."""

    batches: int = 0
    last_seq: int = -1
    received_ms: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """Batch `seq`: the log's leaves [first_index, size) are its transactions (spool rowids
    first_rowid..last_rowid); `note` is the signed checkpoint of the log after them, the
    batch's one signature; `committed_ms` is set once the quorum cosigned this checkpoint."""

    size: int
    seq: int
    first_index: int
    first_rowid: int
    last_rowid: int
    root: bytes
    note: bytes
    created_ms: int
    committed_ms: int | None

    @property
    def tx_count(self) -> int:
        return self.size - self.first_index


_CHECKPOINT_COLS = (
    "size, seq, first_index, first_rowid, last_rowid, root, note, created_ms, committed_ms"
)


# Page cache per connection (KiB, as a negative cache_size). SQLite's default of
# 2 MiB makes inserts into the random-keyed tx_id index miss the cache once the
# spool passes a few hundred thousand rows: 16 MiB took an insert from about 10 to
# 6 us per row. The writer also checkpoints less often (WAL pages), which halves
# the commit cost; the WAL stays below about 16 MiB. That is the gateway's writer (batches,
# tx_key chunks, tiles). An intake process's writer appends to tx and keys tx_dev in sorted
# chunks, whose pages it finds in the OS's cache when its own is smaller: 4 MiB each keeps
# a 1,000,000-transaction gateway's RSS under its 200 MB budget. The two reader
# connections (GetTransaction, GetBatch, the forwarder's leaves, receipts) read a few
# pages each, at random or once in order: 2 MiB each (8 before) took the 1,000,000
# spool's peak from 192 to 180 MB with GetTransaction's p99 unchanged (2.46 / 2.38 ms).
WRITER_CACHE_KIB = 16 * 1024
INTAKE_WRITER_CACHE_KIB = 4 * 1024
READER_CACHE_KIB = 2 * 1024
WAL_AUTOCHECKPOINT_PAGES = 4000


def _connect(path: Path, cache_kib: int = WRITER_CACHE_KIB) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA cache_size=-{cache_kib}")
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    return conn


# Rows per INSERT statement, largest first (7 columns x 128 rows stays under SQLite's
# oldest default of 999 variables).
_ROWS_PER_STATEMENT = (128, 64, 32, 16, 8, 4, 2, 1)


@functools.lru_cache(maxsize=64)
def _multi_row_sql(head: str, tail: str, width: int, rows: int) -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return head + ", ".join([one] * rows) + tail


def insert_rows(
    conn: sqlite3.Connection, head: str, tail: str, rows: list[tuple[Any, ...]]
) -> None:
    """INSERT `rows` with a few multi-row statements. executemany steps SQLite once per
    row, and Python's sqlite3 releases and retakes the GIL around every step: in the
    intake process, behind a paho thread that is parsing, each retake can wait for a
    switch interval, which made a 700-row group commit take 100 ms instead of 5."""
    if not rows:
        return
    width = len(rows[0])
    i, n = 0, len(rows)
    while i < n:
        k = next(c for c in _ROWS_PER_STATEMENT if c <= n - i)
        conn.execute(
            _multi_row_sql(head, tail, width, k), [v for row in rows[i : i + k] for v in row]
        )
        i += k


AppendCallback = Callable[["AppendResult | BaseException"], None]
AppendItem = Incoming | RejectRecord | NotStored
# Called with an unexpected exception (a bug) on the writer thread, where it happened, and
# the append callback it concerns, if one: the process's failure path (gateway.edge.poison).
FatalHook = Callable[[BaseException, str, object | None], None]


class _Op:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: Future[Any]) -> None:
        self.fn = fn
        self.future = future


_STOP = object()


def claim_instance(path: Path) -> int:
    """One gateway per spool: take an exclusive, non-blocking flock on `<spool>.instance`
    and return its descriptor, held until the process closes it or dies. A second
    gateway on the same spool would sign the same seqs (a split view at the ledger), so it
    must stop before it touches anything. `<spool>.lock` is not this lock: the writers
    of one gateway take turns on it.

    The descriptor is close-on-exec (O_CLOEXEC, and os.open's default): the intake
    processes, spawned by fork and exec, never hold it, so the lock dies with the
    process that took it."""
    lock = Path(f"{path}.instance")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise SpoolError(f"spool.path {path}: cannot open {lock}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            holder = ""
        finally:
            os.close(fd)
        who = f"pid {holder}" if holder.isdigit() else "pid unknown"
        raise SpoolInUse(
            f"spool {path} is in use by another gateway ({who}, lock {lock}): "
            "stop that one first, or give this one its own spool.path"
        ) from None
    # The holder's pid, for the second one's message; only informative, so a full
    # disk does not stop the start here (the spool's own checks say so next).
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


class Spool:
    def __init__(self, cfg: SpoolConfig, gateway_id: str, write_priority: bool = False) -> None:
        """`write_priority`: this process's writes (a batch, its cosignatures: few and short)
        go ahead of the intake processes' group commits waiting for the same turn."""
        self._priority = write_priority
        self.cfg = cfg
        self.gateway_id = gateway_id
        self.path = cfg.path
        self._queue: queue.Queue[Any] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._wconn: sqlite3.Connection | None = None
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="spool-read")
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock_fd: int | None = None
        self._next_fd: int | None = None
        self._commit_listeners: list[Callable[[int], None]] = []
        self._group_listeners: list[Callable[[], None]] = []
        self.max_rowid = 0
        self.stored = 0
        self.duplicates = 0
        self.rejects = 0
        self.commits = 0
        # Group commits by size, for the intake process to hand to the main process's
        # edge_gateway_group_commit_size (each process has its own registry).
        self.group_sizes: collections.Counter[int] = collections.Counter()
        self.last_error: str | None = None
        self._pruned: dict[str, int] = {}
        self._seqs = _DeviceSeqs()
        self._fatal: FatalHook | None = None

    # ---- lifecycle -------------------------------------------------------

    def open(self, check_integrity: bool = True) -> None:
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(
                f"spool.path directory {directory} cannot be created: {e.strerror}"
            ) from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise SpoolError(
                f"spool.path directory {directory} is not writable by this user: "
                "fix its owner or mode (the unit's StateDirectory= does this)"
            )
        if self.path.exists() and check_integrity:
            self._check_integrity()
        if self.path.exists():
            self._refuse_other_schema()
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._lock_fd = os.open(f"{self.path}.lock", flags, 0o600)
        self._next_fd = os.open(f"{self.path}.lock-next", flags, 0o600)
        try:
            conn = _connect(
                self.path, WRITER_CACHE_KIB if self._priority else INTAKE_WRITER_CACHE_KIB
            )
        except sqlite3.DatabaseError as e:
            raise SpoolIntegrityError(
                f"spool {self.path} cannot be opened as SQLite ({e}); it was left untouched: "
                "move it aside to start with an empty spool"
            ) from None
        try:
            with self._write_lock():
                conn.executescript(SCHEMA + TX_KEY_SCHEMA + DEV_KEY_SCHEMA)
                self._check_meta(conn)
                _upgrade_tx_key(conn)
                _upgrade_device_key(conn)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise SpoolIntegrityError(f"spool {self.path} is not a gateway spool: {e}") from None
        self.max_rowid = conn.execute("SELECT coalesce(max(rowid), 0) FROM tx").fetchone()[0]
        # Totals over the spool's life, not this process's, so status survives restarts.
        self.stored = conn.execute("SELECT count(*) FROM tx").fetchone()[0]
        self.rejects = conn.execute("SELECT count(*) FROM reject").fetchone()[0]
        self._pruned = dict(conn.execute("SELECT device_id, seq FROM pruned").fetchall())
        self._wconn = conn
        self._writer = threading.Thread(target=self._write_loop, name="spool-writer", daemon=True)
        self._writer.start()

    def _check_integrity(self) -> None:
        """SQLite's quick_check through a read-only connection: a damaged spool is
        reported and never written to (no WAL checkpoint, no schema upgrade)."""
        problem: str | None = None
        try:
            ro = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0)
            try:
                rows = ro.execute("PRAGMA quick_check").fetchall()
            finally:
                ro.close()
            if [r[0] for r in rows] != ["ok"]:
                problem = "; ".join(str(r[0]) for r in rows[:3])
        except sqlite3.DatabaseError as e:
            problem = str(e)
        if problem is not None:
            # One line, bounded: a report row may hold many newline-separated findings.
            problem = " ".join(problem.split())
            if len(problem) > 240:
                problem = problem[:240] + " ..."
            raise SpoolIntegrityError(
                f"spool {self.path} failed SQLite's integrity check ({problem}); it was left "
                "untouched: keep it for analysis and move it aside to start with an empty spool"
            )

    def _refuse_other_schema(self) -> None:
        """A spool written by another schema (per-batch trees before the log, the header
        chain beside it, or a newer gateway) stops the start through a read-only
        connection, before anything is written to it: misreading it would sign a history
        it does not hold."""
        try:
            ro = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0)
            try:
                has_meta = ro.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
                ).fetchone()
                row = (
                    None
                    if has_meta is None
                    else ro.execute(
                        "SELECT value FROM meta WHERE key = 'schema_version'"
                    ).fetchone()
                )
            finally:
                ro.close()
        except sqlite3.DatabaseError:
            return  # the open below reports what SQLite makes of it
        if row is not None and row[0] not in (str(SCHEMA_VERSION), str(CONVERTIBLE_SCHEMA)):
            raise SpoolIntegrityError(
                f"spool {self.path} has schema {row[0]}, this gateway reads {CONVERTIBLE_SCHEMA} "
                f"(converted when opened) and {SCHEMA_VERSION} "
                "(batches are checkpoints of one append-only log, no header chain); it was "
                "left untouched: move it aside to "
                "start with an empty spool"
            )

    def _check_meta(self, conn: sqlite3.Connection) -> None:
        rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if not rows:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("schema_version", str(SCHEMA_VERSION)), ("gateway_id", self.gateway_id)],
            )
            conn.execute("COMMIT")
            return
        if rows.get("gateway_id") != self.gateway_id:
            raise SpoolError(
                f"spool {self.path} belongs to gateway {rows.get('gateway_id')!r}, not "
                f"{self.gateway_id!r}: a spool carries one gateway's log; point spool.path "
                "elsewhere or fix gateway.id"
            )
        if rows.get("schema_version") not in (str(SCHEMA_VERSION), str(CONVERTIBLE_SCHEMA)):
            raise SpoolError(
                f"spool {self.path} has schema {rows.get('schema_version')}, "
                f"this gateway reads {SCHEMA_VERSION}"
            )

    def close(self, checkpoint: bool = True) -> None:
        """Stop the writer and the readers. With `checkpoint` (the process that closes
        last), fold the WAL into the database file and truncate it: a spool at rest is
        one file, whole, that an integrity check or a backup sees entirely."""
        if self._writer is not None and self._writer.is_alive():
            self._queue.put(_STOP)
            self._writer.join(30)
        self._readers.shutdown(wait=True)
        for conn in self._reader_conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._reader_conns.clear()
        if self._wconn is not None:
            if checkpoint:
                try:
                    self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as e:
                    log.warning("spool checkpoint at close failed: %s", e)
            self._wconn.close()
            self._wconn = None
        for fd in (self._lock_fd, self._next_fd):
            if fd is not None:
                os.close(fd)
        self._lock_fd = self._next_fd = None

    def on_commit(self, listener: Callable[[int], None]) -> None:
        """Call `listener(max_rowid)` on the writer thread after each commit that stored rows."""
        self._commit_listeners.append(listener)

    def note_commit(self, max_rowid: int) -> None:
        """Rows another process (the intake child) committed up to `max_rowid`: tell
        the commit listeners as if this writer had stored them."""
        if max_rowid > self.max_rowid:
            self.max_rowid = max_rowid
        for listener in self._commit_listeners:
            listener(self.max_rowid)

    def on_fatal(self, hook: FatalHook) -> None:
        """Where an unexpected exception on the writer thread goes (a callback that raised,
        a group commit that failed other than in SQLite). The writer keeps serving, so the
        stop that follows can drain; without a hook it is logged with its traceback."""
        self._fatal = hook

    def _report(self, exc: BaseException, where: str, culprit: object | None = None) -> None:
        if self._fatal is not None:
            self._fatal(exc, where, culprit)
        else:
            log.error("spool writer: unexpected error in %s", where, exc_info=exc)

    def after_group(self, listener: Callable[[], None]) -> None:
        """Call `listener()` on the writer thread once every append callback of a
        group commit has run: where intake sends that group's PUBACKs in one write."""
        self._group_listeners.append(listener)

    # ---- writer ----------------------------------------------------------

    def append(self, item: AppendItem) -> Future[AppendResult]:
        fut: Future[AppendResult] = Future()

        def resolve(res: AppendResult | BaseException) -> None:
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

        self._queue.put((item, resolve))
        return fut

    def append_cb(self, item: AppendItem, callback: AppendCallback) -> None:
        """Append; `callback(result or error)` runs on the writer thread once the group
        commit is durable. No Future per message: the intake hot path."""
        self._queue.put((item, callback))

    def append_many(self, appends: list[tuple[AppendItem, AppendCallback]]) -> None:
        """append_cb for each (item, callback), in order, as one hand-off to the writer
        (one queue operation for all of them: intake passes what one socket read
        brought). They join the same group commit, which may then exceed
        group_commit_max by up to their number."""
        if appends:
            self._queue.put(appends)

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Run fn(conn) on the writer thread inside its own transaction."""
        fut: Future[T] = Future()
        self._queue.put(_Op(fn, fut))
        return fut

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def _write_loop(self) -> None:
        conn = self._wconn
        assert conn is not None
        limit = self.cfg.group_commit_max
        linger = self.cfg.group_commit_wait_ms / 1000.0
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            group: list[Any] = list(first) if type(first) is list else [first]
            ops: list[_Op] = []
            stop = False
            deadline = time.monotonic() + linger
            while len(group) < limit:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    if linger <= 0 or time.monotonic() >= deadline:
                        break
                    try:
                        item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                if item is _STOP:
                    stop = True
                    break
                if type(item) is list:  # append_many
                    group.extend(item)
                else:
                    group.append(item)
            appends = [g for g in group if not isinstance(g, _Op)]
            ops = [g for g in group if isinstance(g, _Op)]
            # Only the database work holds the writers' turn; answering the callers
            # (PUBACKs, futures) comes after it is released.
            with self._write_lock():
                deliver = [self._commit_guarded(conn, appends)] if appends else []
                deliver += [self._run_op(conn, op) for op in ops]
            for d in deliver:
                try:
                    d()
                except Exception as e:  # a bug in a caller's callback: reported, never lost
                    self._report(e, "spool writer callback")
            if stop:
                return

    def _commit_guarded(self, conn: sqlite3.Connection, appends: list[Any]) -> Callable[[], None]:
        """_commit_appends, and if it fails other than in SQLite (a bug, e.g. a value SQLite
        cannot take), the group again one append at a time: the others are committed and
        the one that fails is reported as the culprit and answered with an error."""
        try:
            return self._commit_appends(conn, appends)
        except Exception as e:
            self._rollback(conn)
            if len(appends) == 1:
                first: BaseException | None = e
                culprits = [appends[0]]
                answers: list[Callable[[], None]] = []
            else:
                first, culprits, answers = None, [], []
                for a in appends:
                    try:
                        answers.append(self._commit_appends(conn, [a]))
                    except Exception as e2:
                        self._rollback(conn)
                        first = first or e2
                        culprits.append(a)
            for _item, callback in culprits:
                assert first is not None
                self._report(first, "spool group commit", callback)
            if not culprits:
                self._report(e, "spool group commit")
            err = SpoolError(f"spool write failed: internal error: {type(e).__name__}")

            def answer() -> None:
                for _item, callback in culprits:
                    self._call(callback, err)
                for a in answers:
                    a()
                if not answers:
                    self._groups_done()

            return answer

    def _call(self, callback: AppendCallback, res: AppendResult | BaseException) -> None:
        """Answer one append; a callback that raises is reported with itself as culprit,
        and the rest of its group is still answered."""
        try:
            callback(res)
        except Exception as e:
            self._report(e, "spool append callback", callback)

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """One writer at a time across processes (the gateway and its intake processes):
        an exclusive flock on <spool>.lock around each write transaction. SQLite would
        serialise them too, but its busy handler retries after sleeping 1, 2, 5 ... 100 ms,
        so a writer committing back to back starves the others; a waiter on the flock is
        woken the moment it is free. A second lock, <spool>.lock-next, is the queue's
        head: the priority writer holds it while it waits, and the others pass through it
        before they queue, so batches and cosignatures are never stuck behind group commits."""
        fd, nxt = self._lock_fd, self._next_fd
        if fd is None or nxt is None:
            yield
            return
        if self._priority:
            fcntl.flock(nxt, fcntl.LOCK_EX)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            finally:
                fcntl.flock(nxt, fcntl.LOCK_UN)
        else:
            fcntl.flock(nxt, fcntl.LOCK_SH)
            fcntl.flock(nxt, fcntl.LOCK_UN)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _commit_appends(self, conn: sqlite3.Connection, appends: list[Any]) -> Callable[[], None]:
        """Commit a group; returns what answers its callers once the turn is released."""
        skipped = [cb for item, cb in appends if item is NOT_STORED]
        if skipped:
            rest = [a for a in appends if a[0] is not NOT_STORED]
            inner = self._commit_appends(conn, rest) if rest else self._groups_done
            self.rejects += len(skipped)

            def answer_skipped() -> None:
                for cb in skipped:
                    self._call(cb, AppendResult(Outcome.NOT_STORED))
                inner()

            return answer_skipped
        results: list[AppendResult | None] = [None] * len(appends)
        devices: dict[str, tuple[int, int]] = {}
        stored = dup = rej = 0
        seqs = self._seqs
        fresh: list[tuple[int, Incoming]] = []  # (position, item) to store
        try:
            conn.execute("BEGIN IMMEDIATE")
            if seqs.loaded:
                seqs.sync(conn)
            else:  # a process that never appends (the gateway without gRPC) keeps no tail
                seqs.load(conn)
            highest = seqs.highest(conn, [i.device_id for i, _cb in appends if type(i) is Incoming])
            in_group: dict[tuple[str, int], Incoming] = {}
            pruned = self._pruned
            for pos, (item, _cb) in enumerate(appends):
                if type(item) is Incoming:
                    device, seq = item.device_id, item.device_seq
                    if seq <= pruned.get(device, -1):
                        results[pos] = AppendResult(Outcome.BEYOND_RETENTION)
                        continue
                    key = (device, seq)
                    held: tuple[bytes, bytes] | None = None
                    earlier = in_group.get(key)
                    if earlier is not None:
                        held = (earlier.payload_sha256, earlier.tx_id)
                    elif seq <= highest[device]:
                        held = seqs.find(conn, device, seq)
                    if held is None:
                        in_group[key] = item
                        fresh.append((pos, item))
                    elif held[0] == item.payload_sha256:
                        results[pos] = AppendResult(Outcome.DUPLICATE, held[1])
                        dup += 1
                    else:
                        results[pos] = AppendResult(Outcome.CONFLICT, held[1])
                else:
                    assert isinstance(item, RejectRecord)
                    cur = conn.execute(
                        "INSERT INTO reject (received_ms, reason, device_id, topic, message)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (item.received_ms, item.reason, item.device_id, item.topic, item.message),
                    )
                    rej += item.count
                    results[pos] = AppendResult(
                        Outcome.REJECT_RECORDED, reject_id=int(cur.lastrowid or 0)
                    )
            new_rows = self._insert_fresh(conn, fresh, results)
            for item, _rowid in new_rows:
                stored += 1
                prev = devices.get(item.device_id)
                if prev is None or item.device_seq > prev[0]:
                    devices[item.device_id] = (item.device_seq, item.received_ms)
            if devices:
                insert_rows(
                    conn,
                    "INSERT INTO device (device_id, last_seq, last_seen_ms) VALUES ",
                    " ON CONFLICT (device_id) DO UPDATE SET"
                    " last_seq = max(last_seq, excluded.last_seq),"
                    " last_seen_ms = excluded.last_seen_ms",
                    [(d, s, t) for d, (s, t) in devices.items()],
                )
            top = new_rows[-1][1] if new_rows else seqs.seen
            upto = seqs.upto
            if top - upto >= DEV_KEY_CHUNK_ROWS:
                _key_devices(conn, upto, top)
                upto = top
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._rollback(conn)
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("spool group commit of %d failed: %s", len(appends), e)
            err = SpoolError(f"spool write failed: {e}")

            def fail() -> None:
                for _item, callback in appends:
                    self._call(callback, err)
                self._groups_done()

            return fail
        self.commits += 1
        self.group_sizes[len(appends)] += 1
        metrics.group_commit_size.observe(len(appends))
        self.stored += stored
        self.duplicates += dup
        self.rejects += rej
        self.last_error = None
        seqs.committed(
            [((item.device_id, item.device_seq), rowid) for item, rowid in new_rows], top, upto
        )
        if stored:
            self.max_rowid = max(self.max_rowid, top)

        def answer() -> None:
            # Callbacks in order, one try for the group: a callback that raises is
            # reported with itself as culprit and the rest are still answered.
            i, n = 0, len(appends)
            while i < n:
                try:
                    while i < n:
                        appends[i][1](results[i])
                        i += 1
                except Exception as e:
                    self._report(e, "spool append callback", appends[i][1])
                    i += 1
            self._groups_done()
            if stored:
                for listener in self._commit_listeners:
                    try:
                        listener(self.max_rowid)
                    except Exception as e:
                        self._report(e, "spool commit listener")

        return answer

    def _groups_done(self) -> None:
        for listener in self._group_listeners:
            try:
                listener()
            except Exception as e:
                self._report(e, "spool group listener")

    @staticmethod
    def _insert_fresh(
        conn: sqlite3.Connection,
        fresh: list[tuple[int, Incoming]],
        results: list[AppendResult | None],
    ) -> list[tuple[Incoming, int]]:
        """Store the group's new transactions, in order; set their results. Returns each
        stored one with its rowid. In the common case a few multi-row statements; if the
        retention trigger refused some (a seq another process pruned), one at a time."""
        if not fresh:
            return []
        cols = (
            "INSERT INTO tx (device_id, device_seq, payload_sha256, tx_id, leaf, size, received_ms)"
        )
        rows = [
            (
                i.device_id,
                i.device_seq,
                i.payload_sha256,
                i.tx_id,
                i.leaf,
                len(i.leaf),
                i.received_ms,
            )
            for _pos, i in fresh
        ]
        conn.execute("SAVEPOINT bulk")
        before = conn.total_changes
        insert_rows(conn, cols + " VALUES ", "", rows)
        stored: list[tuple[Incoming, int]] = []
        if conn.total_changes - before == len(rows):
            conn.execute("RELEASE bulk")
            # One writer at a time, AUTOINCREMENT: the rows took consecutive rowids.
            top = conn.execute("SELECT max(rowid) FROM tx").fetchone()[0]
            first = top - len(rows) + 1
            check = conn.execute(
                "SELECT device_id, device_seq FROM tx WHERE rowid = ?", (first,)
            ).fetchone()
            if check != (fresh[0][1].device_id, fresh[0][1].device_seq):
                raise RuntimeError(f"spool rows did not take consecutive rowids from {first}")
            for n, (pos, item) in enumerate(fresh):
                results[pos] = AppendResult(Outcome.STORED, item.tx_id)
                stored.append((item, first + n))
            return stored
        conn.execute("ROLLBACK TO bulk")
        conn.execute("RELEASE bulk")
        for (pos, item), row in zip(fresh, rows, strict=True):
            cur = conn.execute(cols + " VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            if cur.rowcount == 1:
                results[pos] = AppendResult(Outcome.STORED, item.tx_id)
                stored.append((item, int(cur.lastrowid or 0)))
            else:  # the retention trigger refused it
                results[pos] = AppendResult(Outcome.BEYOND_RETENTION)
        return stored

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")

    def _run_op(self, conn: sqlite3.Connection, op: _Op) -> Callable[[], None]:
        """Run an op in its own transaction; returns what resolves its future."""
        fut = op.future
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = op.fn(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._rollback(conn)
            self.last_error = f"{type(e).__name__}: {e}"
            err: BaseException = SpoolError(f"spool write failed: {e}")
            return lambda: fut.set_exception(err)
        except BaseException as e:  # the op's own error travels to its caller unchanged
            self._rollback(conn)
            own = e
            return lambda: fut.set_exception(own)
        return lambda: fut.set_result(result)

    # ---- readers ---------------------------------------------------------

    def _reader_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                f"file:{self.path}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=30.0,
            )
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute(f"PRAGMA cache_size=-{READER_CACHE_KIB}")
            self._local.conn = conn
            self._reader_conns.append(conn)
        return conn

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        return self._readers.submit(lambda: fn(self._reader_conn()))

    # ---- queries (run them through read() or write()) ---------------------

    @staticmethod
    def q_pending(conn: sqlite3.Connection, after_rowid: int, limit: int) -> list[PendingTx]:
        return [
            PendingTx(*r)
            for r in conn.execute(
                "SELECT rowid, tx_id, size, received_ms FROM tx"
                " WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after_rowid, limit),
            )
        ]

    @staticmethod
    def q_leaves(conn: sqlite3.Connection, first_rowid: int, last_rowid: int) -> list[bytes]:
        return [
            r[0]
            for r in conn.execute(
                "SELECT leaf FROM tx WHERE rowid BETWEEN ? AND ? ORDER BY rowid",
                (first_rowid, last_rowid),
            )
        ]

    @staticmethod
    def q_tx_ids(conn: sqlite3.Connection, first_rowid: int, last_rowid: int) -> list[bytes]:
        return [
            r[0]
            for r in conn.execute(
                "SELECT tx_id FROM tx WHERE rowid BETWEEN ? AND ? ORDER BY rowid",
                (first_rowid, last_rowid),
            )
        ]

    @staticmethod
    def q_device_rowids(conn: sqlite3.Connection, device_id: str) -> list[int]:
        """The rowids of a device's transactions, in spool order: keyed ones from tx_dev,
        the tail by a scan of it (the keyed mark is read first, so a chunk keyed between
        the statements is found by one or both)."""
        upto = _meta_int(conn, "dev_keyed_upto")
        found = {
            int(r[0])
            for r in conn.execute("SELECT tx_rowid FROM tx_dev WHERE device_id = ?", (device_id,))
        }
        found.update(
            int(r[0])
            for r in conn.execute(
                "SELECT rowid FROM tx WHERE rowid > ? AND device_id = ?", (upto, device_id)
            )
        )
        return sorted(found)

    @staticmethod
    def q_tx(conn: sqlite3.Connection, tx_id: bytes) -> TxRecord | None:
        """A transaction by tx_id: through tx_key, or if not keyed yet by a scan of the
        tail after the last keyed row. One statement, so one snapshot: keys stored in
        between cannot hide a row from both halves."""
        row = conn.execute(
            "SELECT rowid, tx_id, leaf, device_id, device_seq, received_ms FROM tx"
            " WHERE rowid IN (SELECT tx_rowid FROM tx_key WHERE k = ?) AND tx_id = ?"
            " UNION ALL"
            " SELECT rowid, tx_id, leaf, device_id, device_seq, received_ms FROM tx"
            f" WHERE rowid > {_KEYED_UPTO} AND tx_id = ?"
            " LIMIT 1",
            (tx_key_of(tx_id), tx_id, tx_id),
        ).fetchone()
        return TxRecord(*row) if row else None

    @staticmethod
    def q_last_committed_seq(conn: sqlite3.Connection) -> int:
        """The last committed batch: that of the largest checkpoint the quorum cosigned."""
        cp = Spool.q_last_committed_checkpoint(conn)
        return -1 if cp is None else cp.seq

    @staticmethod
    def q_committed(conn: sqlite3.Connection, size: int) -> bool:
        """Whether the batch whose checkpoint has `size` is committed: a checkpoint at or
        beyond it was cosigned by the quorum (its tree holds the batch's)."""
        row = conn.execute(
            "SELECT 1 FROM log_checkpoint WHERE size >= ? AND committed_ms IS NOT NULL LIMIT 1",
            (size,),
        ).fetchone()
        return row is not None

    # ---- the log (gateway.edge.tlog) --------------------------------------

    @staticmethod
    def q_last_checkpoint(conn: sqlite3.Connection) -> StoredCheckpoint | None:
        row = conn.execute(
            f"SELECT {_CHECKPOINT_COLS} FROM log_checkpoint ORDER BY size DESC LIMIT 1"
        ).fetchone()
        return StoredCheckpoint(*row) if row else None

    @staticmethod
    def q_checkpoint_of_seq(conn: sqlite3.Connection, seq: int) -> StoredCheckpoint | None:
        row = conn.execute(
            f"SELECT {_CHECKPOINT_COLS} FROM log_checkpoint WHERE seq = ?", (seq,)
        ).fetchone()
        return StoredCheckpoint(*row) if row else None

    @staticmethod
    def q_checkpoint(conn: sqlite3.Connection, size: int) -> StoredCheckpoint | None:
        row = conn.execute(
            f"SELECT {_CHECKPOINT_COLS} FROM log_checkpoint WHERE size = ?", (size,)
        ).fetchone()
        return StoredCheckpoint(*row) if row else None

    @staticmethod
    def q_last_committed_checkpoint(conn: sqlite3.Connection) -> StoredCheckpoint | None:
        row = conn.execute(
            f"SELECT {_CHECKPOINT_COLS} FROM log_checkpoint WHERE committed_ms IS NOT NULL"
            " ORDER BY size DESC LIMIT 1"
        ).fetchone()
        return StoredCheckpoint(*row) if row else None

    @staticmethod
    def q_checkpoint_covering_index(
        conn: sqlite3.Connection, index: int
    ) -> StoredCheckpoint | None:
        """The checkpoint whose batch holds leaf `index`."""
        row = conn.execute(
            f"SELECT {_CHECKPOINT_COLS} FROM log_checkpoint WHERE size > ? ORDER BY size LIMIT 1",
            (index,),
        ).fetchone()
        if row is None:
            return None
        cp = StoredCheckpoint(*row)
        return cp if cp.first_index <= index else None

    @staticmethod
    def q_leaf_index(conn: sqlite3.Connection, rowid: int) -> tuple[int, StoredCheckpoint] | None:
        """The log index of the transaction at `rowid` and the checkpoint of its batch;
        None while it is in no batch yet."""
        row = conn.execute(
            f"SELECT {_CHECKPOINT_COLS} FROM log_checkpoint WHERE last_rowid >= ?"
            " ORDER BY last_rowid LIMIT 1",
            (rowid,),
        ).fetchone()
        if row is None:
            return None
        cp = StoredCheckpoint(*row)
        if rowid < cp.first_rowid:
            return None
        if cp.last_rowid - cp.first_rowid + 1 == cp.size - cp.first_index:
            return cp.first_index + rowid - cp.first_rowid, cp  # rowids without gaps
        before = conn.execute(
            "SELECT count(*) FROM tx WHERE rowid >= ? AND rowid < ?", (cp.first_rowid, rowid)
        ).fetchone()[0]
        return cp.first_index + int(before), cp

    @staticmethod
    def q_cosignatures(conn: sqlite3.Connection, size: int) -> list[tuple[str, str]]:
        """(node id, cosignature line) of a checkpoint, by node id."""
        return [
            (r[0], r[1])
            for r in conn.execute(
                "SELECT node_id, line FROM log_cosignature WHERE size = ? ORDER BY node_id",
                (size,),
            )
        ]

    @staticmethod
    def q_unpublished_rejects(conn: sqlite3.Connection, limit: int) -> list[tuple[int, str, bytes]]:
        return [
            (r[0], r[1], r[2])
            for r in conn.execute(
                "SELECT id, topic, message FROM reject WHERE published = 0 ORDER BY id LIMIT ?",
                (limit,),
            )
        ]

    # ---- writes ----------------------------------------------------------

    @staticmethod
    def w_store_checkpoint(
        conn: sqlite3.Connection, cp: StoredCheckpoint, tiles: Sequence[Any]
    ) -> None:
        """A batch: its checkpoint, its tx-to-batch assignment (a rowid range) and the log
        tiles it adds (gateway.edge.tlog.TileWrite), in one spool transaction; the log only
        grows by whole batches, in seq order."""
        prev = conn.execute(
            "SELECT max(size), max(seq), max(last_rowid) FROM log_checkpoint"
        ).fetchone()
        size = 0 if prev[0] is None else int(prev[0])
        if cp.first_index != size or cp.size <= size:
            raise SpoolError(
                f"checkpoint of batch {cp.seq} starts the log at {cp.first_index}, "
                f"the spool's log has {size} leaves"
            )
        expected = 0 if prev[1] is None else prev[1] + 1
        if cp.seq != expected:
            raise SpoolError(f"batch seq {cp.seq} out of order: the spool expects {expected}")
        if prev[2] is not None and cp.first_rowid <= prev[2]:
            raise SpoolError(f"batch {cp.seq} overlaps the previous batch's transactions")
        tlog.write_tiles(conn, tiles)
        conn.execute(
            f"INSERT INTO log_checkpoint ({_CHECKPOINT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                cp.size,
                cp.seq,
                cp.first_index,
                cp.first_rowid,
                cp.last_rowid,
                cp.root,
                cp.note,
                cp.created_ms,
                cp.committed_ms,
            ),
        )
        _key_rows(conn, cp.last_rowid)

    @staticmethod
    def w_store_cosignature(
        conn: sqlite3.Connection, size: int, node_id: str, line: str, quorum: int
    ) -> NewlyCommitted:
        """Store a witness's cosignature of checkpoint `size`. At `quorum` distinct nodes
        the checkpoint is committed, and with it every batch it covers (its tree holds
        theirs): what that newly commits is returned."""
        conn.execute(
            "INSERT INTO log_cosignature (size, node_id, line, received_ms) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (size, node_id) DO NOTHING",
            (size, node_id, line, now_ms()),
        )
        n = conn.execute("SELECT count(*) FROM log_cosignature WHERE size = ?", (size,)).fetchone()[
            0
        ]
        if n < quorum:
            return NewlyCommitted()
        before = conn.execute(
            "SELECT coalesce(max(size), 0) FROM log_checkpoint WHERE committed_ms IS NOT NULL"
        ).fetchone()[0]
        conn.execute(
            "UPDATE log_checkpoint SET committed_ms = ? WHERE size = ? AND committed_ms IS NULL",
            (now_ms(), size),
        )
        if size <= before:
            return NewlyCommitted()
        rows = conn.execute(
            "SELECT seq, first_rowid, last_rowid FROM log_checkpoint WHERE size > ? AND size <= ?"
            " ORDER BY size",
            (before, size),
        ).fetchall()
        if not rows:
            return NewlyCommitted()
        received = [
            r[0]
            for r in conn.execute(
                "SELECT received_ms FROM tx WHERE rowid BETWEEN ? AND ?",
                (rows[0][1], rows[-1][2]),
            )
        ]
        return NewlyCommitted(len(rows), int(rows[-1][0]), received)

    @staticmethod
    def w_mark_published(conn: sqlite3.Connection, ids: Iterable[int]) -> None:
        conn.executemany("UPDATE reject SET published = 1 WHERE id = ?", [(i,) for i in ids])


def _pruned_below(conn: sqlite3.Connection) -> int:
    """The first batch whose transactions retention has not deleted."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'pruned_below_seq'").fetchone()
    return 0 if row is None else int(row[0])


def prune(spool: Spool, keep_from_seq: int, max_batches: int = 200) -> int:
    """Delete the transactions of batches below `keep_from_seq` (their checkpoints,
    cosignatures and the log's tiles stay: the log's history and proofs outlive them), a
    bounded number per call so the writer is never held for long. Returns batches pruned.
    Runs on the writer thread through Spool.write()."""

    def op(conn: sqlite3.Connection) -> tuple[int, dict[str, int]]:
        row = conn.execute(
            "SELECT min(seq), max(seq), max(last_rowid) FROM"
            " (SELECT seq, last_rowid FROM log_checkpoint WHERE seq >= ? AND seq < ?"
            " ORDER BY seq LIMIT ?)",
            (_pruned_below(conn), keep_from_seq, max_batches),
        ).fetchone()
        if row[0] is None:
            return 0, {}
        first, last, last_rowid = row
        marks = dict(
            conn.execute(
                "SELECT device_id, max(device_seq) FROM tx WHERE rowid <= ? GROUP BY device_id",
                (last_rowid,),
            ).fetchall()
        )
        conn.executemany(
            "INSERT INTO pruned (device_id, seq) VALUES (?, ?) ON CONFLICT (device_id)"
            " DO UPDATE SET seq = max(seq, excluded.seq)",
            list(marks.items()),
        )
        gone = sorted(
            (tx_key_of(r[1]), r[0])
            for r in conn.execute("SELECT rowid, tx_id FROM tx WHERE rowid <= ?", (last_rowid,))
        )
        conn.executemany("DELETE FROM tx_key WHERE k = ? AND tx_rowid = ?", gone)
        conn.executemany(
            "DELETE FROM tx_dev WHERE device_id = ? AND device_seq <= ? AND tx_rowid <= ?",
            [(d, seq, last_rowid) for d, seq in marks.items()],
        )
        conn.execute("DELETE FROM tx WHERE rowid <= ?", (last_rowid,))
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('pruned_below_seq', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(last + 1),),
        )
        # Updated here, on the writer thread, so no append slips between.
        for device, seq in marks.items():
            if seq > spool._pruned.get(device, -1):
                spool._pruned[device] = seq
        return last - first + 1, marks

    n, _marks = spool.write(op).result()
    return int(n)


def prune_rejects(spool: Spool, older_than_ms: int, keep: int, max_rows: int = 10_000) -> int:
    """Delete recorded rejects received before `older_than_ms`, and the oldest beyond the
    newest `keep`; at most `max_rows` per call, looking only at the oldest rows (ids grow
    with time), so the writer is never held for long. Returns rows deleted."""

    def op(conn: sqlite3.Connection) -> int:
        old = conn.execute(
            "DELETE FROM reject WHERE id IN (SELECT id FROM reject ORDER BY id LIMIT ?)"
            " AND received_ms < ?",
            (max_rows, older_than_ms),
        ).rowcount
        n = conn.execute("SELECT count(*) FROM reject").fetchone()[0]
        over = min(max(0, n - keep), max_rows - old)
        if over > 0:
            conn.execute(
                "DELETE FROM reject WHERE id IN (SELECT id FROM reject ORDER BY id LIMIT ?)",
                (over,),
            )
        return int(old + max(0, over))

    return spool.write(op).result()


def stored_batches(
    conn: sqlite3.Connection, from_seq: int, limit: int
) -> Sequence[StoredCheckpoint]:
    return [
        StoredCheckpoint(*r)
        for r in conn.execute(
            f"SELECT {_CHECKPOINT_COLS} FROM log_checkpoint WHERE seq >= ? ORDER BY seq LIMIT ?",
            (from_seq, limit),
        )
    ]
