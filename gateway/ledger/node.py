"""The reference ledger node: verifies gateways' signed batches and stores them durably.

Promise: a batch is answered with a Receipt only after it is committed to SQLite on disk
(WAL, synchronous=FULL); each gateway's chain is applied exactly once, in order, and a gap,
a fork or a broken link is refused with the status the LedgerService contract names.
Under mutual TLS a gateway's chain is written and its head read only with the client
certificate bound to that gateway, and its batches are read only with that certificate or
one listed in node.readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import signal
import sqlite3
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import grpc
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway._pb.edgegateway.v1 import batch_pb2, ledger_pb2, ledger_pb2_grpc
from gateway.common import grpcutil
from gateway.common.errors import (
    EXIT_DATAERR,
    EXIT_IOERR,
    EXIT_OK,
    ConfigError,
    GatewayError,
    LedgerError,
)
from gateway.common.identity import Identity, peer_certificate
from gateway.formats import batchformat, keyrotation, logtree, merkle
from gateway.formats.batchformat import BatchInvalid
from gateway.formats.checkpoint import Checkpoint, checkpoint_of
from gateway.formats.note import EcdsaVerifier, NoteError, parse_note, verifier_index
from gateway.ledger import witness as witness_mod
from gateway.ledger.config import LedgerNodeConfig
from gateway.ledger.config import check_certificates as check_ledger_certificates
from gateway.ledger.witness import LogKey, Witness

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

SERVICE_NAME: str = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name
# Seconds in-flight calls get to finish when the node stops.
SHUTDOWN_GRACE_S = 5.0
# Batches fetched from SQLite per round trip while streaming ListBatches.
LIST_PAGE = 32
# SQLite integers are signed 64-bit; a uint64 seq beyond this cannot be stored anyway.
_SQLITE_MAX_INT = 2**63 - 1
# A SignedBatch beyond its leaves' bytes: the header and signature, and a tag and a length
# per leaf, which is at most a quarter of the leaves (two bytes per leaf of eight or more).
BATCH_FIXED_OVERHEAD = 64 * 1024


def max_receive_bytes(max_batch_bytes: int) -> int:
    """The largest request the node accepts: a batch of node.max_batch_bytes leaf bytes and
    its framing. grpc refuses a bigger one before buffering it (RESOURCE_EXHAUSTED)."""
    return max_batch_bytes + max_batch_bytes // 4 + BATCH_FIXED_OVERHEAD


# The database's layout; a file of another one is refused before anything is written to it.
SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
-- Each gateway's log as this node holds it: the leaves and the tree's tiles
-- (gateway.formats.logtree), extended only by a checkpoint this node cosigned.
CREATE TABLE IF NOT EXISTS log_leaf (
    gateway_id TEXT    NOT NULL,
    idx        INTEGER NOT NULL,
    leaf       BLOB    NOT NULL,
    PRIMARY KEY (gateway_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_tile (
    gateway_id TEXT    NOT NULL,
    level      INTEGER NOT NULL,
    idx        INTEGER NOT NULL,
    data       BLOB    NOT NULL,
    PRIMARY KEY (gateway_id, level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    gateway_id   TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    header       BLOB    NOT NULL,
    header_hash  BLOB    NOT NULL,
    signature    BLOB    NOT NULL,
    batch        BLOB    NOT NULL,  -- serialised SignedBatch as received
    receipt      BLOB    NOT NULL,  -- serialised Receipt it was answered with
    committed_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway_id, seq)
) WITHOUT ROWID;
"""


# Builds the node's witness over the store's connection, on the store thread.
WitnessFactory = Callable[[sqlite3.Connection], Witness]
# Leaves one AddCheckpoint may carry (the receive limit bounds their bytes).
MAX_CHECKPOINT_LEAVES = 1_000_000


def _tile_fetch(conn: sqlite3.Connection, gateway_id: str) -> logtree.TileFetch:
    def fetch(level: int, index: int) -> bytes | None:
        row = conn.execute(
            "SELECT data FROM log_tile WHERE gateway_id = ? AND level = ? AND idx = ?",
            (gateway_id, level, index),
        ).fetchone()
        return None if row is None else bytes(row[0])

    return fetch


# --- errors -------------------------------------------------------------------------------


class LedgerStoreError(GatewayError):
    """The ledger's SQLite store cannot be opened or written."""

    exit_code = EXIT_IOERR


class LedgerStoreFormat(LedgerStoreError):
    """The database was written by another version of the node: left untouched."""

    exit_code = EXIT_DATAERR


class LeavesRejected(LedgerError):
    """The leaves sent with a checkpoint do not extend the node's log to its root."""


class NoCheckpoint(LedgerError):
    """The node cosigned no checkpoint of the log asked for."""


class ConsistencyRange(LedgerError):
    """A consistency proof asked from a size the node's latest checkpoint does not cover."""


class ChainRejected(LedgerError):
    """A verified batch does not continue the gateway's stored chain."""


class SeqGap(ChainRejected):
    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"gap: expected seq {expected}, got {got}")
        self.expected = expected
        self.got = got


class SeqFork(ChainRejected):
    def __init__(self, seq: int, stored: bytes, received: bytes) -> None:
        super().__init__(
            f"fork at seq {seq}: stored header hash {stored.hex()}, received {received.hex()}"
        )
        self.seq = seq
        self.stored = stored
        self.received = received


class BadChainLink(ChainRejected):
    def __init__(self, seq: int, expected: bytes, got: bytes) -> None:
        super().__init__(
            f"bad_chain_link: seq {seq} carries prev_header_hash {got.hex()}, "
            f"the stored head's header hash is {expected.hex()}"
        )
        self.seq = seq
        self.expected = expected
        self.got = got


# --- store --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredHead:
    """Where one gateway's chain stands in the store."""

    next_seq: int
    header_hash: bytes  # of the batch at next_seq - 1; b"" when next_seq == 0


@dataclass(frozen=True, slots=True)
class Appended:
    receipt: batch_pb2.Receipt
    duplicate: bool  # True: an identical batch was already stored, receipt is the original


@dataclass(frozen=True, slots=True)
class _NewBatch:
    gateway_id: str
    seq: int
    prev_header_hash: bytes
    header: bytes
    header_hash: bytes
    signature: bytes
    batch: bytes


@contextlib.contextmanager
def _sqlite_errors(what: str, path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise LedgerStoreError(f"ledger store {path}: {what} failed: {e}") from e


class LedgerStore:
    """Batches per gateway in one SQLite file, touched only by one dedicated thread."""

    def __init__(self, path: Path, make_witness: WitnessFactory | None = None) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-store")
        self._conn: sqlite3.Connection | None = None
        self._make_witness = make_witness
        self.witness: Witness | None = None

    @classmethod
    async def open(cls, path: Path, make_witness: WitnessFactory | None = None) -> LedgerStore:
        """`make_witness(conn)`: the node's witness over the store's connection, built on
        the store thread (every use of the connection stays on that thread)."""
        store = cls(path, make_witness)
        try:
            await store._run(store._open_sync)
        except LedgerStoreError:
            store._executor.shutdown(wait=False)
            raise
        return store

    async def close(self) -> None:
        try:
            await self._run(self._close_sync)
        finally:
            self._executor.shutdown(wait=False)

    async def head(self, gateway_id: str) -> StoredHead:
        return await self._run(self._head_sync, gateway_id)

    async def append(
        self,
        node_id: str,
        gateway_id: str,
        header: batch_pb2.BatchHeader,
        batch: batch_pb2.SignedBatch,
    ) -> Appended:
        """Apply a verified batch to the gateway's chain and commit it, or raise ChainRejected."""
        new = _NewBatch(
            gateway_id=gateway_id,
            seq=header.seq,
            prev_header_hash=header.prev_header_hash,
            header=batch.header,
            header_hash=batchformat.header_hash(batch.header),
            signature=batch.signature,
            batch=batch.SerializeToString(deterministic=True),
        )
        return await self._run(self._append_sync, node_id, new)

    async def log_size(self, origin: str) -> int:
        """The size of the last checkpoint of `origin` this node cosigned."""
        return await self._run(self._log_size_sync, origin)

    async def add_checkpoint(
        self, gateway_id: str, req: ledger_pb2.AddCheckpointRequest
    ) -> tuple[int, str]:
        """Witness a checkpoint (see LedgerService.AddCheckpoint): (size, cosignature line)."""
        return await self._run(self._add_checkpoint_sync, gateway_id, req)

    async def consistency(
        self, gateway_id: str, origin: str, old_size: int
    ) -> tuple[bytes, list[bytes]]:
        """The latest checkpoint of `origin` this node cosigned, its cosignature line
        appended, and the consistency proof to it from `old_size` (from the node's tiles).
        NoCheckpoint or ConsistencyRange otherwise."""
        return await self._run(self._consistency_sync, gateway_id, origin, old_size)

    async def batches(self, gateway_id: str, from_seq: int, limit: int) -> list[bytes]:
        """Serialised SignedBatches of `gateway_id` from `from_seq` on, at most `limit`."""
        if from_seq > _SQLITE_MAX_INT or limit <= 0:
            return []
        return await self._run(
            self._batches_sync, gateway_id, from_seq, min(limit, _SQLITE_MAX_INT)
        )

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    # Everything below runs on the store thread only.

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerStoreError(f"ledger store {self.path} is closed")
        return self._conn

    def _open_sync(self) -> None:
        with _sqlite_errors("open", self.path):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LedgerStoreError(
                    f"ledger store {self.path}: cannot create {self.path.parent}: {e.strerror}"
                ) from None
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                # Before anything writes to the file (the journal mode included).
                self._refuse_other_schema(conn)
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise LedgerStoreError(
                        f"ledger store {self.path}: WAL journal mode refused (got {mode!r}): "
                        "put the database on a local file system"
                    )
                # FULL: the WAL is fsynced at every commit, so a receipt survives power loss.
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA busy_timeout=5000")
                conn.executescript(_SCHEMA)
                conn.execute(
                    "INSERT OR IGNORE INTO ledger_meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                if self._make_witness is not None:
                    self.witness = self._make_witness(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    def _refuse_other_schema(self, conn: sqlite3.Connection) -> None:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return
        version = None
        if "ledger_meta" in tables:
            row = conn.execute(
                "SELECT value FROM ledger_meta WHERE key = 'schema_version'"
            ).fetchone()
            version = None if row is None else row[0]
        if version != str(SCHEMA_VERSION):
            found = "the per-batch chain format" if version is None else f"schema {version}"
            raise LedgerStoreFormat(
                f"ledger store {self.path} holds {found}, this node reads schema "
                f"{SCHEMA_VERSION} (a log per gateway, cosigned): it was left untouched; "
                "move it aside to start with an empty store"
            )

    def _close_sync(self) -> None:
        if self._conn is not None:
            with _sqlite_errors("close", self.path):
                self._conn.close()
            self._conn = None

    def _head_sync(self, gateway_id: str) -> StoredHead:
        with _sqlite_errors("head query", self.path):
            return self._head_of(self._db(), gateway_id)

    @staticmethod
    def _head_of(conn: sqlite3.Connection, gateway_id: str) -> StoredHead:
        row = conn.execute(
            "SELECT seq, header_hash FROM batches WHERE gateway_id = ? ORDER BY seq DESC LIMIT 1",
            (gateway_id,),
        ).fetchone()
        if row is None:
            return StoredHead(next_seq=0, header_hash=b"")
        return StoredHead(next_seq=int(row[0]) + 1, header_hash=bytes(row[1]))

    def _append_sync(self, node_id: str, new: _NewBatch) -> Appended:
        conn = self._db()
        with _sqlite_errors("append", self.path):
            # IMMEDIATE takes the write lock before reading the head, so the head cannot move
            # between the chain check and the insert, even with another process on the file.
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = self._apply(conn, node_id, new)
                conn.execute("ROLLBACK" if result.duplicate else "COMMIT")
            except BaseException:
                # Also after a failed COMMIT (disk full, I/O error): leave no transaction
                # open, or every later append would fail to BEGIN.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

    @staticmethod
    def _apply(conn: sqlite3.Connection, node_id: str, new: _NewBatch) -> Appended:
        head = LedgerStore._head_of(conn, new.gateway_id)
        if new.seq < head.next_seq:
            row = conn.execute(
                "SELECT header_hash, receipt FROM batches WHERE gateway_id = ? AND seq = ?",
                (new.gateway_id, new.seq),
            ).fetchone()
            if row is None:  # only if the table was edited by hand
                raise LedgerStoreError(
                    f"ledger store: gateway {new.gateway_id} has no batch at seq {new.seq} "
                    f"below its head {head.next_seq}: the store is damaged"
                )
            stored_hash = bytes(row[0])
            if stored_hash != new.header_hash:
                raise SeqFork(new.seq, stored_hash, new.header_hash)
            return Appended(receipt=batch_pb2.Receipt.FromString(bytes(row[1])), duplicate=True)
        if new.seq > head.next_seq:
            raise SeqGap(head.next_seq, new.seq)
        expected_prev = head.header_hash if head.next_seq else batchformat.ZERO_HASH
        if new.prev_header_hash != expected_prev:
            raise BadChainLink(new.seq, expected_prev, new.prev_header_hash)
        committed_ms = time.time_ns() // 1_000_000
        receipt = batch_pb2.Receipt(
            node_id=node_id,
            gateway_id=new.gateway_id,
            seq=new.seq,
            header_hash=new.header_hash,
            committed_ms=committed_ms,
        )
        conn.execute(
            "INSERT INTO batches (gateway_id, seq, header, header_hash, signature, batch,"
            " receipt, committed_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                new.gateway_id,
                new.seq,
                new.header,
                new.header_hash,
                new.signature,
                new.batch,
                receipt.SerializeToString(deterministic=True),
                committed_ms,
            ),
        )
        return Appended(receipt=receipt, duplicate=False)

    def _log_size_sync(self, origin: str) -> int:
        if self.witness is None:
            return 0
        with _sqlite_errors("log size query", self.path):
            return self.witness.known_size(origin)

    def _add_checkpoint_sync(
        self, gateway_id: str, req: ledger_pb2.AddCheckpointRequest
    ) -> tuple[int, str]:
        witness = self.witness
        if witness is None:
            raise LedgerError("this node has no witness key ([witness] key_file)")
        conn = self._db()
        with _sqlite_errors("checkpoint", self.path):
            again = self._cosigned_already(conn, req.checkpoint)
            if again is not None:
                return again
            leaves = list(req.leaves)
            old_size = req.old_size

            def check(cp: Checkpoint) -> None:
                # Inside the witness's transaction: the node's copy of the log grows by
                # exactly these leaves to exactly this root, or nothing is stored.
                if cp.size - old_size != len(leaves):
                    raise LeavesRejected(
                        f"checkpoint {cp.size} after {old_size} needs "
                        f"{cp.size - old_size} leaves, {len(leaves)} were sent"
                    )
                fetch = _tile_fetch(conn, gateway_id)
                try:
                    edge = logtree.load_edge(old_size, fetch)
                except logtree.LogStateError as e:
                    raise LedgerStoreError(
                        f"ledger store {self.path}: log of {gateway_id} at {old_size}: {e}"
                    ) from None
                grown, writes = edge.append([merkle.leaf_hash(leaf) for leaf in leaves])
                if grown.root() != cp.root_hash:
                    raise LeavesRejected(
                        f"the {len(leaves)} leaves sent do not give the root of checkpoint "
                        f"{cp.size}"
                    )
                conn.executemany(
                    "INSERT INTO log_tile (gateway_id, level, idx, data) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (gateway_id, level, idx) DO UPDATE SET data = excluded.data",
                    [(gateway_id, w.level, w.index, w.data) for w in writes],
                )
                conn.executemany(
                    "INSERT INTO log_leaf (gateway_id, idx, leaf) VALUES (?, ?, ?)",
                    [(gateway_id, old_size + i, leaf) for i, leaf in enumerate(leaves)],
                )
                self._take_rotations(witness, gateway_id, cp, old_size, leaves)

            line = witness.add_checkpoint(
                req.checkpoint, old_size, list(req.consistency_proof), check
            )
            size = checkpoint_of(parse_note(req.checkpoint)).size
            return size, line.line().rstrip("\n")

    @staticmethod
    def _take_rotations(
        witness: Witness, gateway_id: str, cp: Checkpoint, old_size: int, leaves: list[bytes]
    ) -> None:
        """Key rotation entries among the new leaves (gateway.formats.keyrotation): the new
        key is trusted from here on. Runs inside the witness's check, so the checkpoint
        covering the entry has verified under a key this node already trusted, and the
        key is stored only if that checkpoint is. An entry that does not parse, names
        another log or gateway, or rotates from a key this node does not trust refuses
        the checkpoint."""
        for i, leaf in enumerate(leaves):
            if not keyrotation.is_rotation_leaf(leaf):
                continue
            where = f"leaf {old_size + i} of {gateway_id}'s log"
            try:
                entry = keyrotation.parse_entry(leaf)
            except keyrotation.RotationEntryError as e:
                raise LeavesRejected(f"{where} is not a valid key rotation entry: {e}") from None
            if entry.origin != cp.origin or entry.gateway_id != gateway_id:
                raise LeavesRejected(
                    f"{where}: key rotation entry for {entry.origin!r} / {entry.gateway_id!r}"
                )
            trusted = witness.verifiers(cp.origin)
            if not any(
                isinstance(v, EcdsaVerifier)
                and hashlib.sha256(v.public_key_der).digest() == entry.old_key_id
                for v in trusted
            ):
                raise LeavesRejected(
                    f"{where}: key rotation from key {entry.old_key_id.hex()[:16]}, "
                    "which this node does not trust for that log"
                )
            new = entry.verifier()
            if any(v.vkey() == new.vkey() for v in trusted):
                continue  # already trusted (a node that replays its log)
            try:
                verifier_index((*trusted, new))
            except NoteError as e:
                raise LeavesRejected(f"{where}: new key: {e.detail}") from None
            witness.add_log(LogKey(cp.origin, (new,)))
            log.info(
                "key rotation %d of %s at leaf %d: new log key %s trusted",
                entry.rotation,
                cp.origin,
                old_size + i,
                entry.new_key_id.hex()[:16],
            )

    def header_keys(self, gateway_id: str, origin: str | None) -> list[ec.EllipticCurvePublicKey]:
        """Keys a gateway's batch headers may be signed with beyond its registered one:
        those its log rotated to (trusted by the witness through a rotation entry)."""
        if self.witness is None or origin is None:
            return []
        try:
            verifiers = self.witness.verifiers(origin)
        except witness_mod.UnknownLog:
            return []
        out: list[ec.EllipticCurvePublicKey] = []
        for v in verifiers:
            if isinstance(v, EcdsaVerifier):
                key = serialization.load_der_public_key(v.public_key_der)
                if isinstance(key, ec.EllipticCurvePublicKey):
                    out.append(key)
        return out

    @staticmethod
    def _cosigned_already(conn: sqlite3.Connection, signed: bytes) -> tuple[int, str] | None:
        """A checkpoint this node already cosigned (a re-send after a lost answer): the
        cosignature it gave then. Reads the witness's own table (gateway.ledger.witness)."""
        try:
            cp = checkpoint_of(parse_note(signed))
        except NoteError:
            return None  # the witness reports it
        if cp.size > _SQLITE_MAX_INT:
            return None
        row = conn.execute(
            "SELECT root_hash, note, cosignature FROM witness_cosigned"
            " WHERE origin = ? AND size = ?",
            (cp.origin, cp.size),
        ).fetchone()
        if row is None or bytes(row[0]) != cp.root_hash:
            return None
        # Same size, root and body: the same checkpoint, cosigned then after its checks.
        if parse_note(bytes(row[1])).text != cp.body():
            return None
        return cp.size, bytes(row[2]).decode().rstrip("\n")

    def _consistency_sync(
        self, gateway_id: str, origin: str, old_size: int
    ) -> tuple[bytes, list[bytes]]:
        conn = self._db()
        with _sqlite_errors("consistency proof", self.path):
            row = conn.execute(
                "SELECT size, note, cosignature FROM witness_cosigned WHERE origin = ?"
                " ORDER BY size DESC LIMIT 1",
                (origin,),
            ).fetchone()
            if row is None:
                raise NoCheckpoint(f"this node cosigned no checkpoint of {origin}")
            size = int(row[0])
            if not 0 < old_size <= size:
                raise ConsistencyRange(
                    f"old_size {old_size}: this node's latest checkpoint of {origin} has "
                    f"{size} leaves; ask from 1 to {size}"
                )
            reader = logtree.TileReader(size, _tile_fetch(conn, gateway_id))
            try:
                proof = reader.consistency_proof(old_size) if old_size < size else []
            except logtree.LogStateError as e:
                raise LedgerStoreError(
                    f"ledger store {self.path}: log of {gateway_id}: {e}"
                ) from None
        cosignature = bytes(row[2])
        if not cosignature.endswith(b"\n"):
            cosignature += b"\n"
        return bytes(row[1]) + cosignature, proof

    def _batches_sync(self, gateway_id: str, from_seq: int, limit: int) -> list[bytes]:
        with _sqlite_errors("batch listing", self.path):
            rows = (
                self._db()
                .execute(
                    "SELECT batch FROM batches WHERE gateway_id = ? AND seq >= ?"
                    " ORDER BY seq LIMIT ?",
                    (gateway_id, from_seq, limit),
                )
                .fetchall()
            )
        return [bytes(r[0]) for r in rows]


# --- gRPC service -------------------------------------------------------------------------


def load_gateway_keys(paths: Mapping[str, Path]) -> dict[str, ec.EllipticCurvePublicKey]:
    """Read every registered gateway's public key once, at start."""
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for gateway_id, path in paths.items():
        try:
            pem = path.read_bytes()
        except OSError as e:
            raise ConfigError(
                f"gateways.{gateway_id} = {str(path)!r}: cannot read the key: {e.strerror}"
            ) from None
        try:
            keys[gateway_id] = batchformat.load_public_key(pem)
        except (ValueError, UnsupportedAlgorithm) as e:
            raise ConfigError(
                f"gateways.{gateway_id} = {str(path)!r}: not a P-256 public key PEM ({e}): "
                "export it with `openssl ec -pubout`"
            ) from None
    return keys


@dataclass(frozen=True, slots=True)
class ClientAccess:
    """Under mutual TLS: the certificate identity bound to each gateway id, and the
    identities that may read every gateway's batches."""

    gateways: Mapping[str, Identity]
    readers: tuple[Identity, ...] = ()

    @classmethod
    def of(cls, cfg: LedgerNodeConfig) -> ClientAccess | None:
        """None when the node takes no client certificates (plain text, no client CA)."""
        if cfg.tls is None or cfg.tls.client_ca_file is None:
            return None
        return cls(dict(cfg.gateway_clients), cfg.readers)

    def shared(self) -> list[list[str]]:
        """Groups of gateway ids bound to one identity: each may act for the others."""
        by_identity: defaultdict[object, list[str]] = defaultdict(list)
        for gid, ident in self.gateways.items():
            by_identity[(ident.uri, ident.subject)].append(gid)
        return [sorted(g) for g in by_identity.values() if len(g) > 1]


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    """LedgerService over one LedgerStore; each gateway's submissions are applied one at a time."""

    def __init__(
        self,
        node_id: str,
        keys: Mapping[str, ec.EllipticCurvePublicKey],
        store: LedgerStore,
        verify_executor: ThreadPoolExecutor | None = None,
        access: ClientAccess | None = None,
        origins: Mapping[str, str] | None = None,
    ) -> None:
        """`origins`: each gateway's log origin, for the witness ([witness] origins)."""
        self._origins = dict(origins or {})
        self._node_id = node_id
        self._keys = dict(keys)
        self._store = store
        self._verify_executor = verify_executor
        self._access = access
        self._locks = {gid: asyncio.Lock() for gid in self._keys}

    async def _authorize(
        self,
        method: str,
        gateway_id: str,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        read: bool,
    ) -> None:
        """Under mutual TLS: the gateway's own certificate, or for a read a reader's."""
        if self._access is None:
            return
        peer = peer_certificate(context.auth_context())
        if peer is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
            return
        bound = self._access.gateways.get(gateway_id)
        if bound is not None and bound.matches(peer):
            return
        if read and peer.is_any(self._access.readers):
            return
        who = peer.description
        log.warning("%s for gateway %r refused to %s", method, gateway_id, who)
        if bound is None and not read:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"gateway {gateway_id!r} is not registered on ledger node {self._node_id}: "
                "add its public key and client certificate under [gateways]",
            )
        allowed = "the certificate bound to it under [gateways]"
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method} for gateway {gateway_id!r} needs {allowed}"
            + (" or one listed in node.readers" if read else "")
            + f"; {who} is not one",
        )

    async def SubmitBatch(
        self,
        request: ledger_pb2.SubmitBatchRequest,
        context: grpc.aio.ServicerContext[ledger_pb2.SubmitBatchRequest, batch_pb2.Receipt],
    ) -> batch_pb2.Receipt:
        batch = request.batch
        if not request.HasField("batch"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad_header: no batch sent")
        try:
            header = batchformat.parse_header(batch.header)
        except BatchInvalid as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        gateway_id = header.gateway_id
        if header.seq > _SQLITE_MAX_INT:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"bad_header: seq {header.seq} is out of range: batch seqs go from 0 to "
                f"{_SQLITE_MAX_INT}",
            )
        # Before the signature's CPU work: only the gateway's own certificate may write.
        await self._authorize("SubmitBatch", gateway_id, context, read=False)
        key = self._keys.get(gateway_id)
        if key is None:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"gateway {gateway_id!r} is not registered on ledger node {self._node_id}: "
                "add its public key under [gateways]",
            )
        if key is not None and header.key_id != batchformat.key_id_of(key):
            # After a key rotation the header is signed by the key the log rotated to.
            for rotated in self._store.header_keys(gateway_id, self._origins.get(gateway_id)):
                if batchformat.key_id_of(rotated) == header.key_id:
                    key = rotated
                    break
        try:
            # Pure CPU work (ECDSA, hashing every leaf): off the event loop.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._verify_executor, batchformat.verify_batch, batch, key)
        except BatchInvalid as e:
            # The contract puts an unknown key with an unknown gateway.
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if e.reason == "unknown_key"
                else grpc.StatusCode.INVALID_ARGUMENT
            )
            log.warning("refused batch %s/%d: %s", gateway_id, header.seq, e)
            await context.abort(code, str(e))
        async with self._locks[gateway_id]:
            try:
                appended = await self._store.append(self._node_id, gateway_id, header, batch)
            except SeqGap as e:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    str(e),
                    trailing_metadata=(("expected-seq", str(e.expected)),),
                )
            except SeqFork as e:
                log.warning("refused batch %s/%d: %s", gateway_id, header.seq, e)
                await context.abort(grpc.StatusCode.ABORTED, str(e))
            except BadChainLink as e:
                log.warning("refused batch %s/%d: %s", gateway_id, header.seq, e)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except LedgerStoreError as e:
                log.error("%s", e)
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        if appended.duplicate:
            log.debug("re-sent batch %s/%d answered with its receipt", gateway_id, header.seq)
        else:
            log.info(
                "stored batch %s/%d (%d txs, header %s)",
                gateway_id,
                header.seq,
                header.tx_count,
                appended.receipt.header_hash.hex()[:16],
            )
        return appended.receipt

    async def GetHead(
        self,
        request: ledger_pb2.GetHeadRequest,
        context: grpc.aio.ServicerContext[ledger_pb2.GetHeadRequest, ledger_pb2.Head],
    ) -> ledger_pb2.Head:
        await self._authorize("GetHead", request.gateway_id, context, read=False)
        await self._require_registered(request.gateway_id, context)
        try:
            head = await self._store.head(request.gateway_id)
        except LedgerStoreError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        origin = self._origins.get(request.gateway_id)
        log_size = 0
        if origin is not None:
            try:
                log_size = await self._store.log_size(origin)
            except LedgerStoreError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return ledger_pb2.Head(
            gateway_id=request.gateway_id,
            next_seq=head.next_seq,
            header_hash=head.header_hash,
            node_id=self._node_id,
            log_size=log_size,
        )

    async def AddCheckpoint(
        self,
        request: ledger_pb2.AddCheckpointRequest,
        context: grpc.aio.ServicerContext[ledger_pb2.AddCheckpointRequest, ledger_pb2.Cosignature],
    ) -> ledger_pb2.Cosignature:
        gateway_id = request.gateway_id
        await self._authorize("AddCheckpoint", gateway_id, context, read=False)
        await self._require_registered(gateway_id, context)
        origin = self._origins.get(gateway_id)
        if origin is None or self._store.witness is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"ledger node {self._node_id} witnesses no log of gateway {gateway_id!r}: "
                "set [witness] key_file",
            )
            raise AssertionError("unreachable")
        if len(request.leaves) > MAX_CHECKPOINT_LEAVES or request.old_size > _SQLITE_MAX_INT:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_CHECKPOINT_LEAVES} leaves and an old size below 2^63 per call",
            )
        try:
            cp = checkpoint_of(parse_note(request.checkpoint))
        except NoteError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a checkpoint: {e}")
            raise AssertionError("unreachable") from None
        if cp.origin != origin:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"checkpoint origin {cp.origin[:200]!r} is not the log of gateway "
                f"{gateway_id!r} ({origin})",
            )
        async with self._locks[gateway_id]:
            try:
                size, line = await self._store.add_checkpoint(gateway_id, request)
            except witness_mod.OldSizeMismatch as e:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    str(e),
                    trailing_metadata=(("known-size", str(e.known_size)),),
                )
            except (witness_mod.SplitView, witness_mod.BadConsistencyProof) as e:
                log.error(
                    "SPLIT VIEW of gateway %s's log (%s): refused, evidence kept", gateway_id, e
                )
                await context.abort(grpc.StatusCode.ABORTED, str(e))
            except witness_mod.BadSignature as e:
                log.warning("refused checkpoint of %s: %s", gateway_id, e)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
            except witness_mod.UnknownLog as e:
                await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            except (witness_mod.WitnessError, LeavesRejected) as e:
                log.warning("refused checkpoint of %s: %s", gateway_id, e)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except LedgerStoreError as e:
                log.error("%s", e)
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        log.info("cosigned checkpoint %s/%d", gateway_id, size)
        return ledger_pb2.Cosignature(node_id=self._node_id, size=size, line=line)

    async def ListBatches(
        self,
        request: ledger_pb2.ListBatchesRequest,
        context: grpc.aio.ServicerContext[ledger_pb2.ListBatchesRequest, batch_pb2.SignedBatch],
    ) -> AsyncIterator[batch_pb2.SignedBatch]:
        await self._authorize("ListBatches", request.gateway_id, context, read=True)
        await self._require_registered(request.gateway_id, context)
        if request.from_seq > _SQLITE_MAX_INT:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"from_seq {request.from_seq} is out of range: batch seqs go from 0 to "
                f"{_SQLITE_MAX_INT}",
            )
        remaining = request.limit or None
        seq = request.from_seq
        while remaining is None or remaining > 0:
            page = LIST_PAGE if remaining is None else min(LIST_PAGE, remaining)
            try:
                rows = await self._store.batches(request.gateway_id, seq, page)
            except LedgerStoreError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            for raw in rows:
                yield batch_pb2.SignedBatch.FromString(raw)
            if len(rows) < page:
                return
            seq += len(rows)
            if remaining is not None:
                remaining -= len(rows)

    async def GetConsistency(
        self,
        request: ledger_pb2.GetConsistencyRequest,
        context: grpc.aio.ServicerContext[
            ledger_pb2.GetConsistencyRequest, ledger_pb2.ConsistencyProof
        ],
    ) -> ledger_pb2.ConsistencyProof:
        gateway_id = request.gateway_id
        await self._authorize("GetConsistency", gateway_id, context, read=True)
        await self._require_registered(gateway_id, context)
        origin = self._origins.get(gateway_id)
        if origin is None or self._store.witness is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"ledger node {self._node_id} witnesses no log of gateway {gateway_id!r}",
            )
            raise AssertionError("unreachable")
        old_size = min(request.old_size, _SQLITE_MAX_INT)
        try:
            note, proof = await self._store.consistency(gateway_id, origin, old_size)
        except NoCheckpoint as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            raise AssertionError("unreachable") from None
        except ConsistencyRange as e:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(e))
            raise AssertionError("unreachable") from None
        except LedgerStoreError as e:
            log.error("%s", e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            raise AssertionError("unreachable") from None
        return ledger_pb2.ConsistencyProof(checkpoint=note, old_size=old_size, proof=proof)

    async def _require_registered(
        self, gateway_id: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if gateway_id not in self._keys:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"gateway {gateway_id!r} is not registered on ledger node {self._node_id}",
            )


# --- lifecycle ----------------------------------------------------------------------------


async def serve(
    cfg: LedgerNodeConfig,
    *,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the node until `stop` is set (forever without one); then drain and close."""
    check_ledger_certificates(cfg)
    keys = load_gateway_keys(cfg.gateway_keys)
    access = ClientAccess.of(cfg)
    for group in access.shared() if access is not None else []:
        log.warning(
            "gateways %s are bound to one client certificate: each may write the others' "
            "chains; give each gateway a certificate of its own",
            ", ".join(group),
        )
    make_witness = _witness_factory(cfg, keys)
    store = await LedgerStore.open(cfg.db_path, make_witness)
    verify_executor = ThreadPoolExecutor(thread_name_prefix="ledger-verify")
    try:
        # Past max_concurrent_rpcs grpc answers RESOURCE_EXHAUSTED and the forwarder backs
        # off: it bounds the work queued behind the single SQLite thread, and the memory
        # held by calls in flight (each up to max_receive_bytes).
        server = grpc.aio.server(
            options=grpcutil.server_options(max_receive_bytes(cfg.max_batch_bytes)),
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        origins = cfg.witness.origins if cfg.witness is not None else {}
        servicer = LedgerServicer(cfg.node_id, keys, store, verify_executor, access, origins)
        # The generated registration helper carries no annotations.
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(servicer, server)
        # grpc-stubs predates the asyncio health servicer; it exists since grpcio-health 1.30.
        health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            port = grpcutil.add_port(server, cfg.listen, cfg.tls)
        except RuntimeError as e:  # grpcio >= 1.60 raises instead of returning port 0
            raise ConfigError(
                f"node.listen = {cfg.listen!r}: cannot listen ({e}): "
                "is another process on that port?"
            ) from None
        await server.start()
        try:
            if ready is not None:
                ready(port)
            if stop is None:
                await server.wait_for_termination()
            else:
                await stop.wait()
        finally:
            await health_servicer.enter_graceful_shutdown()
            await server.stop(SHUTDOWN_GRACE_S)
    finally:
        verify_executor.shutdown(wait=False, cancel_futures=True)
        # The store thread runs jobs in order: a commit still in flight finishes before close.
        await store.close()


def _witness_factory(
    cfg: LedgerNodeConfig, keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> WitnessFactory | None:
    """The node's witness: its key from [witness] key_file, and each registered gateway's
    log under its origin, verified with the gateway's public key (type 0x02 notes)."""
    if cfg.witness is None:
        return None
    name, key = witness_mod.load_key(cfg.witness.key_file)
    logs = [
        LogKey(origin, (EcdsaVerifier.from_public_key(origin, keys[gid]),))
        for gid, origin in cfg.witness.origins.items()
    ]

    def make(conn: sqlite3.Connection) -> Witness:
        return Witness(conn, name, key, logs)

    return make


def _bound_address(listen: str, port: int) -> str:
    host, _, _ = listen.rpartition(":")
    return f"{host}:{port}"


def run(cfg: LedgerNodeConfig) -> int:
    """Serve until SIGTERM or SIGINT; 0 on a clean stop. Errors propagate as GatewayError."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def announce(port: int) -> None:
        log.info("ledger node %s listening on %s", cfg.node_id, _bound_address(cfg.listen, port))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(cfg, ready=announce, stop=stop)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        log.info("ledger node %s stopped", cfg.node_id)

    asyncio.run(main())
    return EXIT_OK
