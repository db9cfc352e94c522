"""The reference ledger node: witnesses each registered gateway's log and keeps its leaves.

Promise: a gateway's leaves are stored only with a checkpoint of its log the node cosigns
(AddCheckpoint), after the gateway's signature, the consistency proof from the last
checkpoint cosigned and the leaves' root all verified, in one SQLite transaction (WAL,
synchronous=FULL) committed before the cosignature is answered. Under mutual TLS a
gateway's checkpoints are added and its head read only with the client certificate bound
to that gateway, and its consistency proofs read only with that certificate or one listed
in node.readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import signal
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import grpc
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway._pb.edgegateway.v1 import ledger_pb2, ledger_pb2_grpc
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
# SQLite integers are signed 64-bit; a uint64 size beyond this cannot be stored anyway.
_SQLITE_MAX_INT = 2**63 - 1
# An AddCheckpoint beyond its leaves' bytes: the signed checkpoint, the consistency proof
# (at most 63 hashes) and the gateway id, and a tag and a length per leaf, which is at most
# a quarter of the leaves (two bytes per leaf of eight or more).
CHECKPOINT_FIXED_OVERHEAD = 64 * 1024


def max_receive_bytes(max_batch_bytes: int) -> int:
    """The largest request the node accepts: an AddCheckpoint carrying node.max_batch_bytes
    of leaf bytes and its framing. grpc refuses a bigger one before buffering it
    (RESOURCE_EXHAUSTED)."""
    return max_batch_bytes + max_batch_bytes // 4 + CHECKPOINT_FIXED_OVERHEAD


# The database's layout. Schema 3 is upgraded in place when the store opens; a file of
# any other layout is refused before anything is written to it.
SCHEMA_VERSION = 4
# What each earlier schema held, for the line that refuses it.
_OLD_SCHEMAS = {
    None: "the per-batch chain format",
    "2": "schema 2 (the log beside the batch header chain)",
}
# Leaves in a rowid table (schema 4): in a WITHOUT ROWID table (schema 3) a row of a
# kilobyte fills a quarter of a B-tree page, so appends split pages all the time; an
# insert of a 1,100-byte leaf cost 20 us of CPU there and 7 here (500-row commits,
# WAL, synchronous=FULL), where a 130-byte leaf costs 2.5 either way.
_LOG_LEAF = """
CREATE TABLE IF NOT EXISTS log_leaf (
    gateway_id TEXT    NOT NULL,
    idx        INTEGER NOT NULL,
    leaf       BLOB    NOT NULL,
    PRIMARY KEY (gateway_id, idx)
);
"""
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
-- Each gateway's log as this node holds it: the leaves and the tree's tiles
-- (gateway.formats.logtree), extended only by a checkpoint this node cosigned.
"""
    + _LOG_LEAF
    + """CREATE TABLE IF NOT EXISTS log_tile (
    gateway_id TEXT    NOT NULL,
    level      INTEGER NOT NULL,
    idx        INTEGER NOT NULL,
    data       BLOB    NOT NULL,
    PRIMARY KEY (gateway_id, level, idx)
) WITHOUT ROWID;
"""
)


def _upgrade_3_to_4(conn: sqlite3.Connection) -> int:
    """Schema 3 -> 4 in one transaction: the leaves move to a rowid table. Returns how
    many leaves moved."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("ALTER TABLE log_leaf RENAME TO log_leaf_schema_3")
        conn.execute(_LOG_LEAF)
        moved = conn.execute(
            "INSERT INTO log_leaf (gateway_id, idx, leaf)"
            " SELECT gateway_id, idx, leaf FROM log_leaf_schema_3"
        ).rowcount
        conn.execute("DROP TABLE log_leaf_schema_3")
        conn.execute("UPDATE ledger_meta SET value = '4' WHERE key = 'schema_version'")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return moved


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


# --- store --------------------------------------------------------------------------------


@contextlib.contextmanager
def _sqlite_errors(what: str, path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise LedgerStoreError(f"ledger store {path}: {what} failed: {e}") from e


class LedgerStore:
    """Each gateway's log, as this node witnesses it, in one SQLite file touched only by one
    dedicated thread."""

    def __init__(self, path: Path, make_witness: WitnessFactory) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-store")
        self._conn: sqlite3.Connection | None = None
        self._make_witness = make_witness
        self._witness: Witness | None = None

    @classmethod
    async def open(cls, path: Path, make_witness: WitnessFactory) -> LedgerStore:
        """`make_witness(conn)`: the node's witness over the store's connection, built on
        the store thread (every use of the connection stays on that thread)."""
        store = cls(path, make_witness)
        try:
            await store._run(store._open_sync)
        except LedgerStoreError:
            store._executor.shutdown(wait=False)
            raise
        return store

    @property
    def witness(self) -> Witness:
        """The node's witness; it exists once the store is open."""
        if self._witness is None:
            raise LedgerStoreError(f"ledger store {self.path} is not open")
        return self._witness

    async def close(self) -> None:
        try:
            await self._run(self._close_sync)
        finally:
            self._executor.shutdown(wait=False)

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
                upgrade = self._refuse_other_schema(conn)
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise LedgerStoreError(
                        f"ledger store {self.path}: WAL journal mode refused (got {mode!r}): "
                        "put the database on a local file system"
                    )
                # FULL: the WAL is fsynced at every commit, so a cosignature survives power loss.
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA busy_timeout=5000")
                if upgrade:
                    moved = _upgrade_3_to_4(conn)
                    log.info(
                        "ledger store %s: upgraded from schema 3 to 4 (%d leaves moved to a "
                        "rowid table)",
                        self.path,
                        moved,
                    )
                conn.executescript(_SCHEMA)
                conn.execute(
                    "INSERT OR IGNORE INTO ledger_meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                self._witness = self._make_witness(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    def _refuse_other_schema(self, conn: sqlite3.Connection) -> bool:
        """Refuses a layout this node neither reads nor upgrades; True for schema 3,
        which it upgrades."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return False
        version = None
        if "ledger_meta" in tables:
            row = conn.execute(
                "SELECT value FROM ledger_meta WHERE key = 'schema_version'"
            ).fetchone()
            version = None if row is None else row[0]
        if version == "3":
            return True
        if version != str(SCHEMA_VERSION):
            found = _OLD_SCHEMAS.get(version, f"schema {version}")
            raise LedgerStoreFormat(
                f"ledger store {self.path} holds {found}, this node reads schemas 3 and "
                f"{SCHEMA_VERSION} (each gateway's log, taken only with a checkpoint it "
                "cosigns): it was left untouched; move it aside to start with an empty store"
            )
        return False

    def _close_sync(self) -> None:
        if self._conn is not None:
            with _sqlite_errors("close", self.path):
                self._conn.close()
            self._conn = None

    def _log_size_sync(self, origin: str) -> int:
        with _sqlite_errors("log size query", self.path):
            return self.witness.known_size(origin)

    def _add_checkpoint_sync(
        self, gateway_id: str, req: ledger_pb2.AddCheckpointRequest
    ) -> tuple[int, str]:
        witness = self.witness
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
    identities that may read every gateway's consistency proofs."""

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
    """LedgerService over one LedgerStore; each gateway's checkpoints are taken one at a time."""

    def __init__(
        self,
        node_id: str,
        keys: Mapping[str, ec.EllipticCurvePublicKey],
        store: LedgerStore,
        origins: Mapping[str, str],
        access: ClientAccess | None = None,
    ) -> None:
        """`origins`: each registered gateway's log origin ([witness] origins)."""
        missing = sorted(set(keys) - set(origins))
        if missing:
            raise ConfigError(
                f"witness.origins: no log origin for gateways {', '.join(missing)}: "
                "set witness.log_domain or list them in witness.origins"
            )
        self._origins = {gid: origins[gid] for gid in keys}
        self._node_id = node_id
        self._keys = dict(keys)
        self._store = store
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

    async def GetHead(
        self,
        request: ledger_pb2.GetHeadRequest,
        context: grpc.aio.ServicerContext[ledger_pb2.GetHeadRequest, ledger_pb2.Head],
    ) -> ledger_pb2.Head:
        await self._authorize("GetHead", request.gateway_id, context, read=False)
        await self._require_registered(request.gateway_id, context)
        try:
            log_size = await self._store.log_size(self._origins[request.gateway_id])
        except LedgerStoreError as e:
            log.error("%s", e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            raise AssertionError("unreachable") from None
        return ledger_pb2.Head(
            gateway_id=request.gateway_id, node_id=self._node_id, log_size=log_size
        )

    async def AddCheckpoint(
        self,
        request: ledger_pb2.AddCheckpointRequest,
        context: grpc.aio.ServicerContext[ledger_pb2.AddCheckpointRequest, ledger_pb2.Cosignature],
    ) -> ledger_pb2.Cosignature:
        gateway_id = request.gateway_id
        await self._authorize("AddCheckpoint", gateway_id, context, read=False)
        await self._require_registered(gateway_id, context)
        origin = self._origins[gateway_id]
        if len(request.leaves) > MAX_CHECKPOINT_LEAVES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.leaves)} leaves in one call: at most {MAX_CHECKPOINT_LEAVES}; "
                "send the log in several checkpoints",
            )
        if request.old_size > _SQLITE_MAX_INT:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"old_size {request.old_size} is out of range: log sizes go from 0 to "
                f"{_SQLITE_MAX_INT}",
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
            except witness_mod.SplitView as e:
                log.error(
                    "SPLIT VIEW of gateway %s's log (%s): refused, evidence kept", gateway_id, e
                )
                await context.abort(grpc.StatusCode.ABORTED, str(e))
            except witness_mod.BadConsistencyProof as e:
                log.warning("refused checkpoint of %s: %s", gateway_id, e)
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
        origin = self._origins[gateway_id]
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
            "gateways %s are bound to one client certificate: each may add checkpoints of "
            "the others' logs; give each gateway a certificate of its own",
            ", ".join(group),
        )
    origins = gateway_origins(cfg)
    make_witness = _witness_factory(cfg, keys, origins)
    store = await LedgerStore.open(cfg.db_path, make_witness)
    try:
        # Past max_concurrent_rpcs grpc answers RESOURCE_EXHAUSTED and the forwarder backs
        # off: it bounds the work queued behind the single SQLite thread, and the memory
        # held by calls in flight (each up to max_receive_bytes).
        server = grpc.aio.server(
            options=grpcutil.server_options(max_receive_bytes(cfg.max_batch_bytes)),
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        servicer = LedgerServicer(cfg.node_id, keys, store, origins, access)
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
        # The store thread runs jobs in order: a commit still in flight finishes before close.
        await store.close()


def gateway_origins(cfg: LedgerNodeConfig) -> dict[str, str]:
    """Each registered gateway's log origin: the node witnesses every gateway it accepts."""
    missing = sorted(set(cfg.gateway_keys) - set(cfg.witness.origins))
    if missing:
        raise ConfigError(
            f"config {cfg.source}: witness.origins has no log origin for gateways "
            f"{', '.join(missing)}: set witness.log_domain or list them in witness.origins"
        )
    return {gid: cfg.witness.origins[gid] for gid in cfg.gateway_keys}


def _witness_factory(
    cfg: LedgerNodeConfig,
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    origins: Mapping[str, str],
) -> WitnessFactory:
    """The node's witness: its key from [witness] key_file, and each registered gateway's
    log under its origin, verified with the gateway's public key (type 0x02 notes)."""
    name, key = witness_mod.load_key(cfg.witness.key_file)
    logs = [
        LogKey(origin, (EcdsaVerifier.from_public_key(origin, keys[gid]),))
        for gid, origin in origins.items()
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
