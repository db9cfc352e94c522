"""The reference ledger node over a real grpc.aio server and a real SQLite file.

A gateway's leaves reach the node only with a checkpoint of its log (AddCheckpoint). The
checkpoints here are signed with a software P-256 key, as a type 0x02 note signature like
the HSM makes: the node only sees the signed note and the gateway's registered public key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway._pb.edgegateway.v1 import ledger_pb2, ledger_pb2_grpc, transaction_pb2
from gateway.common.errors import ConfigError
from gateway.formats import checkpoint, cosignature, merkle, note
from gateway.formats.checkpoint import Checkpoint
from gateway.ledger import node as ledger
from gateway.ledger import witness
from gateway.ledger.config import (
    DEFAULT_LOG_DOMAIN,
    LedgerNodeConfig,
    WitnessConfig,
    parse_ledger_config,
)

T = TypeVar("T")
GW = "edge-01"
OTHER_GW = "edge-02"
NODE_ID = "ledger-1"
WITNESS_NAME = checkpoint.witness_name("ledger.test.invalid", NODE_ID)
REPO = Path(__file__).resolve().parent.parent


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


# --- a gateway's log, signed as its HSM would ---------------------------------------------


@dataclass
class SoftSigner:
    """Stands in for the HSM: a P-256 key that signs checkpoints of the gateway's log."""

    gateway_id: str
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def new(cls, gateway_id: str) -> SoftSigner:
        return cls(gateway_id, ec.generate_private_key(ec.SECP256R1()))

    @property
    def origin(self) -> str:
        """The log origin a node derives for this gateway by default."""
        return checkpoint.gateway_origin(DEFAULT_LOG_DOMAIN, self.gateway_id)

    def write_public_pem(self, path: Path) -> Path:
        path.write_bytes(
            self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return path

    def note_signer(self, origin: str | None = None) -> note.EcdsaDigestSigner:
        def sign_digest(digest: bytes) -> bytes:
            return self.key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))

        spki = note.spki_der(self.key.public_key())
        return note.EcdsaDigestSigner(origin or self.origin, spki, sign_digest)

    def checkpoint(self, leaves: Sequence[bytes], origin: str | None = None) -> bytes:
        """A signed checkpoint of a log of `leaves`, under `origin` (default: its own)."""
        cp = Checkpoint(origin or self.origin, len(leaves), merkle.root(list(leaves)))
        return checkpoint.sign_checkpoint(cp, [self.note_signer(origin)])

    def log(self) -> GatewayLog:
        return GatewayLog(self)


@dataclass
class GatewayLog:
    """The gateway's log in memory and what its forwarder sends a node."""

    signer: SoftSigner
    leaves: list[bytes] = field(default_factory=list)
    cosigned: int = 0  # the size the node last cosigned

    def grow(self, n: int, tag: str = "") -> None:
        self.leaves += txs_for(len(self.leaves), n, tag, self.signer.gateway_id)

    def request(self, old: int | None = None) -> ledger_pb2.AddCheckpointRequest:
        """An AddCheckpoint of the whole log from `old` (default: what the node cosigned)."""
        old = self.cosigned if old is None else old
        return ledger_pb2.AddCheckpointRequest(
            gateway_id=self.signer.gateway_id,
            old_size=old,
            consistency_proof=merkle.consistency_proof(self.leaves, old) if old else [],
            checkpoint=self.signer.checkpoint(self.leaves),
            leaves=self.leaves[old:],
        )


def txs_for(first: int, n: int = 3, tag: str = "", gateway_id: str = GW) -> list[bytes]:
    """`n` canonical transactions, the log's leaves from index `first` on."""
    return [
        transaction_pb2.Transaction(
            device_id=f"meter-{i % 7}",
            device_seq=i,
            received_time_ms=1_700_000_000_000 + i,
            profile="acme-meter@1",
            kind="meter.reading",
            fields=f'{{"kwh":{i}{tag}}}'.encode(),
            gateway_id=gateway_id,
            channel="mqtt",
        ).SerializeToString(deterministic=True)
        for i in range(first, first + n)
    ]


# --- a running node -----------------------------------------------------------------------


@dataclass
class Node:
    cfg: LedgerNodeConfig
    port: int
    channel: grpc.aio.Channel

    @property
    def stub(self) -> ledger_pb2_grpc.LedgerServiceStub:
        return ledger_pb2_grpc.LedgerServiceStub(self.channel)

    async def head(self, gateway_id: str = GW) -> ledger_pb2.Head:
        h: ledger_pb2.Head = await self.stub.GetHead(
            ledger_pb2.GetHeadRequest(gateway_id=gateway_id), timeout=10
        )
        return h

    async def add(self, request: ledger_pb2.AddCheckpointRequest) -> ledger_pb2.Cosignature:
        c: ledger_pb2.Cosignature = await self.stub.AddCheckpoint(request, timeout=10)
        return c

    async def add_log(self, log: GatewayLog) -> ledger_pb2.Cosignature:
        """Send the log's latest checkpoint from the size the node cosigned last."""
        c = await self.add(log.request())
        log.cosigned = c.size
        return c

    async def consistency(self, old_size: int, gateway_id: str = GW) -> ledger_pb2.ConsistencyProof:
        p: ledger_pb2.ConsistencyProof = await self.stub.GetConsistency(
            ledger_pb2.GetConsistencyRequest(gateway_id=gateway_id, old_size=old_size),
            timeout=10,
        )
        return p


@contextlib.asynccontextmanager
async def running(cfg: LedgerNodeConfig) -> AsyncIterator[Node]:
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(ledger.serve(cfg, ready=bound.set_result, stop=stop))
    done, _ = await asyncio.wait({task, bound}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what serve raised
    port = bound.result()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Node(cfg, port, channel)
    finally:
        await channel.close()
        stop.set()
        await task


def node_config(
    tmp_path: Path,
    keys: dict[str, Path],
    node_id: str = NODE_ID,
    db_path: Path | None = None,
    **kw: Any,
) -> LedgerNodeConfig:
    """A plain-text node on a free port that witnesses the logs of `keys`' gateways under
    their default origins, with a witness key of its own (written once)."""
    key_file = tmp_path / f"{node_id}-witness.key"
    if not key_file.exists():
        witness.keygen(checkpoint.witness_name("ledger.test.invalid", node_id), key_file)
    return LedgerNodeConfig(
        node_id=node_id,
        listen="127.0.0.1:0",
        db_path=db_path or tmp_path / f"{node_id}.db",
        gateway_keys=keys,
        tls=None,
        witness=WitnessConfig.for_gateways(key_file, keys),
        **kw,
    )


@dataclass
class Setup:
    cfg: LedgerNodeConfig
    signer: SoftSigner
    other: SoftSigner
    witness_key: cosignature.CosignatureVerifier

    def verify(self, signed: bytes, c: ledger_pb2.Cosignature) -> checkpoint.SignedCheckpoint:
        """The checkpoint with the node's cosignature line: both signatures verify."""
        opened = checkpoint.open_checkpoint(
            signed + c.line.encode() + b"\n",
            [self.signer.note_signer().verifier(), self.witness_key],
            self.signer.origin,
        )
        assert {s.name for s in opened.note.verified} == {self.signer.origin, WITNESS_NAME}
        return opened


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    signer = SoftSigner.new(GW)
    other = SoftSigner.new(OTHER_GW)
    keys = {
        GW: signer.write_public_pem(tmp_path / f"{GW}.pem"),
        OTHER_GW: other.write_public_pem(tmp_path / f"{OTHER_GW}.pem"),
    }
    cfg = node_config(tmp_path, keys)
    name, key = witness.load_key(cfg.witness.key_file)
    vkey = cosignature.Cosigner(name, key).verifier()
    return Setup(cfg, signer, other, vkey)


async def expect_error(
    coro: Coroutine[Any, Any, object], code: grpc.StatusCode
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() == code, info.value.details()
    return info.value


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# --- the promises -------------------------------------------------------------------------


def test_checkpoints_are_cosigned_and_the_node_serves_consistency_from_its_copy(
    setup: Setup,
) -> None:
    async def go() -> list[bytes]:
        log = setup.signer.log()
        async with running(setup.cfg) as node:
            assert await node.head() == ledger_pb2.Head(gateway_id=GW, node_id=NODE_ID)
            sizes = []
            for n in (3, 1, 6):
                log.grow(n)
                c = await node.add_log(log)
                assert (c.node_id, c.size) == (NODE_ID, len(log.leaves))
                opened = setup.verify(setup.signer.checkpoint(log.leaves), c)
                assert opened.checkpoint.root_hash == merkle.root(log.leaves)
                assert (await node.head()).log_size == len(log.leaves)
                sizes.append(c.size)
            assert sizes == [3, 4, 10]
            # From every size a device may hold, a proof to the latest, from the node's tiles.
            root = merkle.root(log.leaves)
            for old in range(1, 11):
                p = await node.consistency(old)
                assert p.old_size == old
                cp = checkpoint.checkpoint_of(note.parse_note(p.checkpoint))
                assert (cp.size, cp.root_hash) == (10, root)
                assert merkle.verify_consistency(
                    old, 10, list(p.proof), merkle.root(log.leaves[:old]), root
                )
            # Logs are per gateway.
            assert (await node.head(OTHER_GW)).log_size == 0
        return log.leaves

    leaves = arun(go())
    stored = rows(setup.cfg.db_path, "SELECT leaf FROM log_leaf WHERE gateway_id = 'edge-01'")
    assert [bytes(r[0]) for r in stored] == leaves


def test_a_restart_keeps_the_log_and_a_resend_gets_the_same_cosignature(setup: Setup) -> None:
    async def go() -> None:
        log = setup.signer.log()
        log.grow(4)
        async with running(setup.cfg) as node:
            first = await node.add_log(log)
        await asyncio.sleep(1.1)  # a new cosignature would carry a later timestamp
        async with running(setup.cfg) as node:
            assert (await node.head()).log_size == 4
            # The answer was lost: the gateway sends the same checkpoint again.
            again = await node.add(log.request(old=0))
            assert again == first
            # A re-signed checkpoint (ECDSA is randomised) is the same checkpoint.
            resigned = log.request(old=0)
            assert resigned.checkpoint != log.request(old=0).checkpoint
            assert await node.add(resigned) == first
            log.grow(3)
            grown = await node.add_log(log)
            assert grown.size == 7
            p = await node.consistency(4)
            assert merkle.verify_consistency(
                4, 7, list(p.proof), merkle.root(log.leaves[:4]), merkle.root(log.leaves)
            )
        stored = rows(
            setup.cfg.db_path, "SELECT idx, leaf FROM log_leaf WHERE gateway_id = 'edge-01'"
        )
        assert [(i, bytes(b)) for i, b in stored] == list(enumerate(log.leaves))
        assert rows(setup.cfg.db_path, "SELECT count(*) FROM witness_cosigned") == [(2,)]

    arun(go())


def test_an_old_size_that_is_not_the_nodes_is_failed_precondition_with_the_known_size(
    setup: Setup,
) -> None:
    async def go() -> None:
        log = setup.signer.log()
        log.grow(3)
        async with running(setup.cfg) as node:
            await node.add_log(log)
            log.grow(2)
            for old in (0, 2, 4):
                err = await expect_error(
                    node.add(log.request(old=old)), grpc.StatusCode.FAILED_PRECONDITION
                )
                assert ("known-size", "3") in tuple(err.trailing_metadata() or ())
                assert f"old size {old} is not 3" in (err.details() or "")
            assert (await node.head()).log_size == 3
            # The gateway resumes from the size it was told.
            assert (await node.add(log.request(old=3))).size == 5

    arun(go())


def test_a_split_view_is_aborted_both_checkpoints_kept_and_logged_at_error(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> tuple[bytes, bytes]:
        log = setup.signer.log()
        log.grow(4)
        fork = setup.signer.log()
        fork.grow(4, tag="9")  # same size, other leaves: a second view of the log
        async with running(setup.cfg) as node:
            cosigned = await node.add_log(log)
            presented = fork.request(old=0)
            with caplog.at_level(logging.ERROR):
                err = await expect_error(node.add(presented), grpc.StatusCode.ABORTED)
            assert "split view" in (err.details() or "")
            # The node's view did not move.
            assert (await node.head()).log_size == 4
            p = await node.consistency(4)
            setup.verify(log.request(old=0).checkpoint, cosigned)
            assert checkpoint.checkpoint_of(note.parse_note(p.checkpoint)).root_hash == (
                merkle.root(log.leaves)
            )
        return log.request(old=0).checkpoint, presented.checkpoint

    ours, theirs = arun(go())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("SPLIT VIEW" in r.getMessage() and GW in r.getMessage() for r in errors)
    evidence = rows(
        setup.cfg.db_path, "SELECT kind, cosigned_note, presented_note FROM witness_evidence"
    )
    assert len(evidence) == 1
    kind, cosigned_note, presented_note = evidence[0]
    assert kind == "same_size"
    assert note.parse_note(bytes(cosigned_note)).text == note.parse_note(ours).text
    assert bytes(presented_note) == theirs
    assert rows(setup.cfg.db_path, "SELECT count(*) FROM log_leaf") == [(4,)]


def test_a_checkpoint_the_gateways_key_did_not_sign_is_permission_denied(setup: Setup) -> None:
    async def go() -> None:
        log = setup.signer.log()
        log.grow(3)
        impostor = SoftSigner.new(GW)  # claims the gateway's origin, signs with its own key
        forged = impostor.log()
        forged.leaves = list(log.leaves)
        async with running(setup.cfg) as node:
            err = await expect_error(node.add(forged.request()), grpc.StatusCode.PERMISSION_DENIED)
            assert GW in (err.details() or "")
            # edge-02's key does not sign for edge-01, under either origin.
            other = setup.other.log()
            other.leaves = list(log.leaves)
            crossed = other.request()
            crossed.gateway_id = GW
            await expect_error(node.add(crossed), grpc.StatusCode.PERMISSION_DENIED)
            crossed.checkpoint = setup.other.checkpoint(log.leaves, origin=setup.signer.origin)
            await expect_error(node.add(crossed), grpc.StatusCode.PERMISSION_DENIED)
            # A signature over other bytes does not verify either.
            tampered = log.request()
            tampered.checkpoint = tampered.checkpoint.replace(b"\n3\n", b"\n4\n", 1)
            await expect_error(node.add(tampered), grpc.StatusCode.PERMISSION_DENIED)
            assert (await node.head()).log_size == 0
            assert (await node.add_log(log)).size == 3

    arun(go())


def test_leaves_that_do_not_give_the_root_are_invalid_argument_and_nothing_is_stored(
    setup: Setup,
) -> None:
    async def go() -> None:
        log = setup.signer.log()
        log.grow(4)
        good = log.request()
        flipped = bytearray(good.leaves[1])
        flipped[-1] ^= 0x01  # same length: only the root can tell
        variants = {
            "a changed leaf": [good.leaves[0], bytes(flipped), *good.leaves[2:]],
            "a leaf dropped": list(good.leaves[:3]),
            "a leaf added": [*good.leaves, b"one more"],
            "two leaves swapped": [good.leaves[1], good.leaves[0], *good.leaves[2:]],
            "no leaves": [],
        }
        async with running(setup.cfg) as node:
            for what, leaves in variants.items():
                bad = ledger_pb2.AddCheckpointRequest()
                bad.CopyFrom(good)
                del bad.leaves[:]
                bad.leaves.extend(leaves)
                err = await expect_error(node.add(bad), grpc.StatusCode.INVALID_ARGUMENT)
                assert "leaves" in (err.details() or ""), what
            assert (await node.head()).log_size == 0
            await expect_error(node.consistency(1), grpc.StatusCode.NOT_FOUND)
            assert rows(setup.cfg.db_path, "SELECT count(*) FROM log_leaf") == [(0,)]
            assert rows(setup.cfg.db_path, "SELECT count(*) FROM witness_cosigned") == [(0,)]
            assert (await node.add_log(log)).size == 4

    arun(go())


def test_malformed_requests_are_invalid_argument(setup: Setup) -> None:
    async def go() -> None:
        async with running(setup.cfg) as node:
            for junk in (b"", b"\xff\xff\xff", b"not a note\n\n"):
                await expect_error(
                    node.add(ledger_pb2.AddCheckpointRequest(gateway_id=GW, checkpoint=junk)),
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
            log = setup.signer.log()
            log.grow(2)
            too_far = log.request()
            too_far.old_size = 2**63
            err = await expect_error(node.add(too_far), grpc.StatusCode.INVALID_ARGUMENT)
            assert (
                err.details()
                == f"old_size {2**63} is out of range: log sizes go from 0 to {2**63 - 1}"
            )
            assert (await node.head()).log_size == 0

    arun(go())


def test_an_unknown_gateway_is_not_found(setup: Setup) -> None:
    async def go() -> None:
        stranger = SoftSigner.new("edge-99")
        log = stranger.log()
        log.grow(2)
        async with running(setup.cfg) as node:
            err = await expect_error(node.add(log.request()), grpc.StatusCode.NOT_FOUND)
            assert "'edge-99' is not registered" in (err.details() or "")
            await expect_error(node.head("edge-99"), grpc.StatusCode.NOT_FOUND)
            await expect_error(node.consistency(1, "edge-99"), grpc.StatusCode.NOT_FOUND)

    arun(go())


def test_consistency_is_asked_within_the_latest_cosigned_size(setup: Setup) -> None:
    async def go() -> None:
        log = setup.signer.log()
        log.grow(5)
        async with running(setup.cfg) as node:
            err = await expect_error(node.consistency(1), grpc.StatusCode.NOT_FOUND)
            assert "cosigned no checkpoint" in (err.details() or "")
            await node.add_log(log)
            for old in (0, 6, 2**63 - 1, 2**64 - 1):
                await expect_error(node.consistency(old), grpc.StatusCode.OUT_OF_RANGE)
            p = await node.consistency(5)
            assert p.old_size == 5 and list(p.proof) == []

    arun(go())


def test_two_callers_racing_the_same_checkpoint_store_it_once(setup: Setup) -> None:
    async def go() -> None:
        log = setup.signer.log()
        log.grow(6)
        request = log.request()
        async with running(setup.cfg) as node:
            answers = await asyncio.gather(*(node.add(request) for _ in range(8)))
            assert all(a == answers[0] for a in answers) and answers[0].size == 6
            assert (await node.head()).log_size == 6

    arun(go())
    assert rows(setup.cfg.db_path, "SELECT count(*) FROM log_leaf") == [(6,)]
    assert rows(setup.cfg.db_path, "SELECT count(*) FROM witness_cosigned") == [(1,)]


def test_rival_checkpoints_of_one_size_race_and_one_wins(setup: Setup) -> None:
    async def go() -> None:
        rivals = []
        for i in range(6):
            lg = setup.signer.log()
            lg.grow(3, tag=str(i))
            rivals.append(lg)
        async with running(setup.cfg) as node:
            results = await asyncio.gather(
                *(node.add(lg.request()) for lg in rivals), return_exceptions=True
            )
            won = [i for i, r in enumerate(results) if isinstance(r, ledger_pb2.Cosignature)]
            lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert len(won) == 1 and len(lost) == 5
            assert all(e.code() == grpc.StatusCode.ABORTED for e in lost)
            p = await node.consistency(3)
            cp = checkpoint.checkpoint_of(note.parse_note(p.checkpoint))
            assert cp.root_hash == merkle.root(rivals[won[0]].leaves)

    arun(go())
    assert rows(setup.cfg.db_path, "SELECT count(*) FROM log_leaf") == [(3,)]


def test_store_is_sqlite_wal_on_disk_at_schema_4(setup: Setup) -> None:
    async def go() -> None:
        log = setup.signer.log()
        log.grow(2)
        async with running(setup.cfg) as node:
            await node.add_log(log)

    arun(go())
    assert rows(setup.cfg.db_path, "PRAGMA journal_mode") == [("wal",)]
    assert rows(setup.cfg.db_path, "SELECT value FROM ledger_meta") == [("4",)]
    tables = {r[0] for r in rows(setup.cfg.db_path, "SELECT name FROM sqlite_master")}
    assert {"log_leaf", "log_tile", "witness_cosigned"} <= tables
    assert "batches" not in tables


def test_a_schema_3_store_is_upgraded_in_place_and_its_log_goes_on(setup: Setup) -> None:
    """Schema 3 kept the leaves in a WITHOUT ROWID table; a node of schema 4 moves them
    to a rowid table when it opens the store, and the same log grows on from there."""
    db = setup.cfg.db_path
    log = setup.signer.log()

    async def grow_by(n: int) -> None:
        log.grow(n)
        async with running(setup.cfg) as node:
            await node.add_log(log)

    arun(grow_by(5))
    # The store as a schema 3 node left it.
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(
        "BEGIN;"
        "ALTER TABLE log_leaf RENAME TO log_leaf_4;"
        "CREATE TABLE log_leaf (gateway_id TEXT NOT NULL, idx INTEGER NOT NULL,"
        " leaf BLOB NOT NULL, PRIMARY KEY (gateway_id, idx)) WITHOUT ROWID;"
        "INSERT INTO log_leaf SELECT gateway_id, idx, leaf FROM log_leaf_4;"
        "DROP TABLE log_leaf_4;"
        "UPDATE ledger_meta SET value = '3' WHERE key = 'schema_version';"
        "COMMIT;"
    )
    conn.close()
    leaf_table = "SELECT sql FROM sqlite_master WHERE name = 'log_leaf'"
    assert "WITHOUT ROWID" in rows(db, leaf_table)[0][0]
    arun(grow_by(3))
    assert rows(db, "SELECT value FROM ledger_meta WHERE key = 'schema_version'") == [("4",)]
    assert "WITHOUT ROWID" not in rows(db, leaf_table)[0][0]
    assert rows(db, "SELECT idx, leaf FROM log_leaf ORDER BY idx") == list(enumerate(log.leaves))
    assert log.cosigned == 8


def test_a_schema_2_database_is_refused_and_left_untouched(setup: Setup) -> None:
    conn = sqlite3.connect(setup.cfg.db_path)
    conn.executescript(
        "CREATE TABLE ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
        "INSERT INTO ledger_meta VALUES ('schema_version', '2');"
        "CREATE TABLE batches (gateway_id TEXT, seq INTEGER, header BLOB);"
    )
    conn.close()
    before = setup.cfg.db_path.read_bytes()
    with pytest.raises(ledger.LedgerStoreFormat) as info:
        arun(ledger.serve(setup.cfg))
    message = str(info.value)
    assert info.value.exit_code == 65 and "\n" not in message
    assert "schema 2 (the log beside the batch header chain)" in message
    assert "reads schemas 3 and 4" in message and "left untouched" in message
    assert setup.cfg.db_path.read_bytes() == before


def test_health_serving_and_reflection(setup: Setup) -> None:
    async def go() -> None:
        async with running(setup.cfg) as node:
            health = health_pb2_grpc.HealthStub(node.channel)
            for service in ("", "edgegateway.v1.LedgerService"):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(node.channel)
            call = refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = {s.name async for r in call for s in r.list_services_response.service}
            assert {"edgegateway.v1.LedgerService", "grpc.health.v1.Health"} <= names

    arun(go())


def test_the_service_has_no_batch_calls_left() -> None:
    methods = set(ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].methods_by_name)
    assert methods == {"GetHead", "AddCheckpoint", "GetConsistency"}
    assert set(ledger_pb2.Head.DESCRIPTOR.fields_by_name) == {"gateway_id", "node_id", "log_size"}
    assert "edgegateway/v1/batch.proto" not in [d.name for d in ledger_pb2.DESCRIPTOR.dependencies]


def test_unreadable_gateway_key_stops_the_start(setup: Setup, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    cfg = node_config(tmp_path, {GW: bad}, db_path=tmp_path / "x.db")
    with pytest.raises(ConfigError, match=r"gateways\.edge-01 = .*bad\.pem"):
        arun(ledger.serve(cfg))


def test_a_gateway_without_a_log_origin_stops_the_start(setup: Setup, tmp_path: Path) -> None:
    keys = dict(setup.cfg.gateway_keys)
    cfg = LedgerNodeConfig(
        node_id=NODE_ID,
        listen="127.0.0.1:0",
        db_path=tmp_path / "y.db",
        gateway_keys=keys,
        tls=None,
        witness=WitnessConfig.for_gateways(setup.cfg.witness.key_file, [GW]),
    )
    with pytest.raises(ConfigError) as info:
        arun(ledger.serve(cfg))
    assert "no log origin for gateways edge-02" in str(info.value)
    assert not cfg.db_path.exists()


# --- configuration ------------------------------------------------------------------------


def _ledger_data(tmp_path: Path, **witness_table: Any) -> dict[str, Any]:
    pem = SoftSigner.new(GW).write_public_pem(tmp_path / "gw.pem")
    data: dict[str, Any] = {
        "node": {"id": "l1", "db_path": "l.db", "plaintext": True},
        "gateways": {GW: str(pem), OTHER_GW: str(pem)},
    }
    if witness_table:
        data["witness"] = witness_table
    return data


def test_a_node_without_a_witness_key_is_refused_at_load(tmp_path: Path) -> None:
    source = tmp_path / "ledger-node.toml"
    for data, key in [
        (_ledger_data(tmp_path), "[witness] is missing"),
        (_ledger_data(tmp_path, log_domain="carrier.example"), "witness.key_file is missing"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_ledger_config(data, source)
        message = str(info.value)
        assert info.value.exit_code == 78 and "\n" not in message
        assert message.startswith(f"config {source}: {key}: ")
        assert "edge-gateway ledger-node keygen" in message and "witness.key_file" in message


def test_every_registered_gateway_gets_a_log_origin(tmp_path: Path) -> None:
    source = tmp_path / "ledger-node.toml"
    cfg = parse_ledger_config(_ledger_data(tmp_path, key_file="w.key"), source)
    assert cfg.witness.key_file == tmp_path / "w.key"
    # The default domain is the one a gateway's [log] origin defaults to.
    assert dict(cfg.witness.origins) == {
        GW: "edge-gateway.invalid/edge-gateway/edge-01",
        OTHER_GW: "edge-gateway.invalid/edge-gateway/edge-02",
    }
    given = {OTHER_GW: "ledger.example/other-log"}
    cfg = parse_ledger_config(
        _ledger_data(tmp_path, key_file="w.key", log_domain="carrier.example", origins=given),
        source,
    )
    assert dict(cfg.witness.origins) == {
        GW: "carrier.example/edge-gateway/edge-01",
        OTHER_GW: "ledger.example/other-log",
    }
    for table, fragment in [
        ({"origins": {"edge-99": "x.example/l"}}, "not listed under [gateways]"),
        ({"origins": {GW: "x.example/l", OTHER_GW: "x.example/l"}}, "share one log origin"),
        ({"log_domain": "not a domain"}, "witness.log_domain"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_ledger_config(_ledger_data(tmp_path, key_file="w.key", **table), source)
        assert fragment in str(info.value)


def test_run_serves_until_sigterm_and_exits_zero(setup: Setup, tmp_path: Path) -> None:
    cfg_path = tmp_path / "ledger-node.toml"
    cfg_path.write_text(
        f"""
[node]
id = "ledger-1"
listen = "127.0.0.1:0"
db_path = "{setup.cfg.db_path}"
plaintext = true

[gateways]
"{GW}" = "{setup.cfg.gateway_keys[GW]}"

[witness]
key_file = "{setup.cfg.witness.key_file}"
"""
    )
    code = (
        "import sys; from pathlib import Path;"
        " from gateway.ledger.config import load_ledger_config;"
        " from gateway.ledger.node import run; sys.exit(run(load_ledger_config(Path(sys.argv[1]))))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(cfg_path)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "ledger node ledger-1 listening on 127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1])
        log = setup.signer.log()
        log.grow(2)

        async def add_and_head() -> ledger_pb2.Head:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = ledger_pb2_grpc.LedgerServiceStub(ch)
                await stub.AddCheckpoint(log.request(), timeout=10)
                h: ledger_pb2.Head = await stub.GetHead(
                    ledger_pb2.GetHeadRequest(gateway_id=GW), timeout=10
                )
                return h

        assert arun(add_and_head()).log_size == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
