"""The reference ledger node over a real grpc.aio server and a real SQLite file.

Batches are signed with a software P-256 key here: the product signs in the HSM, but the
ledger only sees DER signatures and a registered public key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway._pb.edgegateway.v1 import batch_pb2, ledger_pb2, ledger_pb2_grpc, transaction_pb2
from gateway.common.errors import ConfigError
from gateway.formats import batchformat, merkle
from gateway.ledger import node as ledger
from gateway.ledger.config import LedgerNodeConfig

T = TypeVar("T")
GW = "edge-01"
OTHER_GW = "edge-02"
REPO = Path(__file__).resolve().parent.parent


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


# --- signing test batches -----------------------------------------------------------------


@dataclass
class SoftSigner:
    """Stands in for the HSM: a P-256 key that signs DOMAIN_TAG || header, low-S DER."""

    gateway_id: str
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def new(cls, gateway_id: str) -> SoftSigner:
        return cls(gateway_id, ec.generate_private_key(ec.SECP256R1()))

    @property
    def key_id(self) -> bytes:
        return batchformat.key_id_of(self.key.public_key())

    def write_public_pem(self, path: Path) -> Path:
        path.write_bytes(
            self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return path

    def sign(self, header: bytes) -> bytes:
        der = self.key.sign(batchformat.signing_input(header), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return batchformat.der_low_s(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def batch(
        self,
        seq: int,
        prev: bytes,
        txs: Sequence[bytes],
        *,
        created_ms: int = 1_700_000_000_000,
        gateway_id: str | None = None,
    ) -> batch_pb2.SignedBatch:
        header = batchformat.encode_header(
            batchformat.HeaderFields(
                gateway_id=gateway_id or self.gateway_id,
                seq=seq,
                prev_header_hash=prev,
                merkle_root=merkle.root(txs),
                tx_count=len(txs),
                byte_count=sum(len(t) for t in txs),
                first_received_ms=created_ms - 1000,
                last_received_ms=created_ms - 10,
                created_ms=created_ms,
                key_id=self.key_id,
            )
        )
        return batch_pb2.SignedBatch(header=header, signature=self.sign(header), transactions=txs)

    def chain(
        self, n: int, *, start_prev: bytes = batchformat.ZERO_HASH
    ) -> list[batch_pb2.SignedBatch]:
        out: list[batch_pb2.SignedBatch] = []
        prev = start_prev
        for seq in range(n):
            b = self.batch(seq, prev, txs_for(seq))
            out.append(b)
            prev = batchformat.header_hash(b.header)
        return out


def txs_for(seq: int, n: int = 3, tag: str = "") -> list[bytes]:
    return [
        transaction_pb2.Transaction(
            device_id=f"meter-{i}",
            device_seq=seq * 100 + i,
            received_time_ms=1_700_000_000_000 + i,
            profile="acme-meter@1",
            kind="meter.reading",
            fields=f'{{"kwh":{seq}.{i}{tag}}}'.encode(),
            gateway_id=GW,
            channel="mqtt",
        ).SerializeToString(deterministic=True)
        for i in range(n)
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

    async def submit(self, batch: batch_pb2.SignedBatch) -> batch_pb2.Receipt:
        r: batch_pb2.Receipt = await self.stub.SubmitBatch(
            ledger_pb2.SubmitBatchRequest(batch=batch), timeout=10
        )
        return r

    async def head(self, gateway_id: str = GW) -> ledger_pb2.Head:
        h: ledger_pb2.Head = await self.stub.GetHead(
            ledger_pb2.GetHeadRequest(gateway_id=gateway_id), timeout=10
        )
        return h

    async def list(
        self, gateway_id: str = GW, from_seq: int = 0, limit: int = 0
    ) -> list[batch_pb2.SignedBatch]:
        call = self.stub.ListBatches(
            ledger_pb2.ListBatchesRequest(gateway_id=gateway_id, from_seq=from_seq, limit=limit),
            timeout=10,
        )
        return [b async for b in call]


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


@dataclass
class Setup:
    cfg: LedgerNodeConfig
    signer: SoftSigner
    other: SoftSigner


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    signer = SoftSigner.new(GW)
    other = SoftSigner.new(OTHER_GW)
    cfg = LedgerNodeConfig(
        node_id="ledger-1",
        listen="127.0.0.1:0",
        db_path=tmp_path / "ledger.db",
        gateway_keys={
            GW: signer.write_public_pem(tmp_path / f"{GW}.pem"),
            OTHER_GW: other.write_public_pem(tmp_path / f"{OTHER_GW}.pem"),
        },
        tls=None,
    )
    return Setup(cfg, signer, other)


async def expect_error(
    coro: Coroutine[Any, Any, object], code: grpc.StatusCode
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() == code, info.value.details()
    return info.value


# --- the promises -------------------------------------------------------------------------


def test_chain_of_three_batches_is_accepted_with_receipts(setup: Setup) -> None:
    async def go() -> None:
        async with running(setup.cfg) as node:
            before = time.time_ns() // 1_000_000
            for seq, b in enumerate(setup.signer.chain(3)):
                r = await node.submit(b)
                assert r.node_id == "ledger-1"
                assert r.gateway_id == GW
                assert r.seq == seq
                assert r.header_hash == batchformat.header_hash(b.header)
                assert before <= r.committed_ms <= time.time_ns() // 1_000_000

    arun(go())


def test_identical_resend_returns_original_receipt_and_stores_once(setup: Setup) -> None:
    async def go() -> None:
        chain = setup.signer.chain(2)
        async with running(setup.cfg) as node:
            first = [await node.submit(b) for b in chain]
            await asyncio.sleep(0.01)  # a new receipt would carry a later committed_ms
            assert await node.submit(chain[0]) == first[0]
            assert await node.submit(chain[1]) == first[1]
            # A re-signed header (ECDSA is randomised) is the same batch.
            resigned = batch_pb2.SignedBatch()
            resigned.CopyFrom(chain[1])
            resigned.signature = setup.signer.sign(chain[1].header)
            assert resigned.signature != chain[1].signature
            assert await node.submit(resigned) == first[1]
            assert (await node.head()).next_seq == 2
            assert len(await node.list()) == 2

    arun(go())


def test_gap_is_refused_with_expected_seq(setup: Setup) -> None:
    async def go() -> None:
        chain = setup.signer.chain(4)
        async with running(setup.cfg) as node:
            await node.submit(chain[0])
            err = await expect_error(node.submit(chain[2]), grpc.StatusCode.FAILED_PRECONDITION)
            assert err.details() == "gap: expected seq 1, got 2"
            assert ("expected-seq", "1") in tuple(err.trailing_metadata() or ())
            assert (await node.head()).next_seq == 1

    arun(go())


def test_fork_at_stored_seq_is_aborted(setup: Setup) -> None:
    async def go() -> None:
        chain = setup.signer.chain(2)
        fork = setup.signer.batch(1, batchformat.header_hash(chain[0].header), txs_for(1, tag="9"))
        async with running(setup.cfg) as node:
            for b in chain:
                await node.submit(b)
            err = await expect_error(node.submit(fork), grpc.StatusCode.ABORTED)
            stored = batchformat.header_hash(chain[1].header).hex()
            received = batchformat.header_hash(fork.header).hex()
            assert err.details() == (
                f"fork at seq 1: stored header hash {stored}, received {received}"
            )
            assert [b.header for b in await node.list()] == [b.header for b in chain]

    arun(go())


def test_bad_signature_is_invalid_argument(setup: Setup) -> None:
    async def go() -> None:
        b = setup.signer.chain(1)[0]
        forged = batch_pb2.SignedBatch()
        forged.CopyFrom(b)
        # A valid signature over different bytes.
        forged.signature = setup.signer.sign(b.header + b"\x00")
        r, s = decode_dss_signature(b.signature)
        high_s = batch_pb2.SignedBatch()
        high_s.CopyFrom(b)
        high_s.signature = encode_dss_signature(r, batchformat.P256_N - s)
        not_der = batch_pb2.SignedBatch()
        not_der.CopyFrom(b)
        not_der.signature = b"\x01" * 64
        async with running(setup.cfg) as node:
            for bad, detail in [
                (forged, "bad_signature: signature does not verify"),
                (high_s, "bad_signature: signature is not low-S"),
                (not_der, "bad_signature: signature is not DER"),
            ]:
                err = await expect_error(node.submit(bad), grpc.StatusCode.INVALID_ARGUMENT)
                assert err.details() == detail
            assert (await node.head()).next_seq == 0
            await node.submit(b)

    arun(go())


def test_tampered_transaction_is_invalid_argument(setup: Setup) -> None:
    async def go() -> None:
        b = setup.signer.chain(1)[0]
        swapped = batch_pb2.SignedBatch()
        swapped.CopyFrom(b)
        tx = bytearray(swapped.transactions[1])
        tx[-1] ^= 0x01  # same length: only the Merkle root can tell
        swapped.transactions[1] = bytes(tx)
        dropped = batch_pb2.SignedBatch()
        dropped.CopyFrom(b)
        del dropped.transactions[-1]
        reordered = batch_pb2.SignedBatch()
        reordered.CopyFrom(b)
        reordered.transactions[0], reordered.transactions[1] = b.transactions[1], b.transactions[0]
        async with running(setup.cfg) as node:
            for bad, reason in [
                (swapped, "bad_merkle_root"),
                (dropped, "bad_count"),
                (reordered, "bad_merkle_root"),
            ]:
                err = await expect_error(node.submit(bad), grpc.StatusCode.INVALID_ARGUMENT)
                assert (err.details() or "").startswith(f"{reason}: ")
            assert (await node.head()).next_seq == 0

    arun(go())


def test_wrong_prev_hash_is_invalid_argument(setup: Setup) -> None:
    async def go() -> None:
        s = setup.signer
        async with running(setup.cfg) as node:
            nonzero_genesis = s.batch(0, b"\x11" * 32, txs_for(0))
            err = await expect_error(node.submit(nonzero_genesis), grpc.StatusCode.INVALID_ARGUMENT)
            assert (err.details() or "").startswith("bad_chain_link: ")
            first = s.batch(0, batchformat.ZERO_HASH, txs_for(0))
            await node.submit(first)
            unlinked = s.batch(1, b"\x22" * 32, txs_for(1))
            err = await expect_error(node.submit(unlinked), grpc.StatusCode.INVALID_ARGUMENT)
            assert (err.details() or "").startswith("bad_chain_link: ")
            assert (await node.head()).next_seq == 1

    arun(go())


def test_unknown_gateway_or_key_is_permission_denied(setup: Setup) -> None:
    async def go() -> None:
        stranger = SoftSigner.new("edge-99")
        impostor = SoftSigner.new(GW)  # claims a registered gateway, signs with its own key
        async with running(setup.cfg) as node:
            err = await expect_error(
                node.submit(stranger.chain(1)[0]), grpc.StatusCode.PERMISSION_DENIED
            )
            assert "'edge-99' is not registered" in (err.details() or "")
            err = await expect_error(
                node.submit(impostor.chain(1)[0]), grpc.StatusCode.PERMISSION_DENIED
            )
            assert (err.details() or "").startswith("unknown_key: ")
            # edge-02's key does not sign for edge-01 either.
            cross = setup.other.batch(0, batchformat.ZERO_HASH, txs_for(0), gateway_id=GW)
            await expect_error(node.submit(cross), grpc.StatusCode.PERMISSION_DENIED)
            assert (await node.head()).next_seq == 0

    arun(go())


def test_malformed_request_is_invalid_argument(setup: Setup) -> None:
    async def go() -> None:
        async with running(setup.cfg) as node:
            await expect_error(
                node.stub.SubmitBatch(ledger_pb2.SubmitBatchRequest()),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            junk = batch_pb2.SignedBatch(header=b"\xff\xff\xff", signature=b"")
            err = await expect_error(node.submit(junk), grpc.StatusCode.INVALID_ARGUMENT)
            assert (err.details() or "").startswith("bad_header: ")

    arun(go())


def test_get_head_before_and_after(setup: Setup) -> None:
    async def go() -> None:
        chain = setup.signer.chain(2)
        async with running(setup.cfg) as node:
            h = await node.head()
            assert (h.gateway_id, h.next_seq, h.header_hash, h.node_id) == (GW, 0, b"", "ledger-1")
            for b in chain:
                await node.submit(b)
            h = await node.head()
            assert h.next_seq == 2
            assert h.header_hash == batchformat.header_hash(chain[1].header)
            assert (await node.head(OTHER_GW)).next_seq == 0  # chains are per gateway
            await expect_error(node.head("edge-99"), grpc.StatusCode.NOT_FOUND)

    arun(go())


def test_list_batches_returns_them_in_order(setup: Setup) -> None:
    async def go() -> None:
        chain = setup.signer.chain(40)  # more than one page of the server's stream
        other = setup.other.chain(2)
        async with running(setup.cfg) as node:
            for b in chain:
                await node.submit(b)
            for b in other:
                await node.submit(b)
            got = await node.list()
            assert got == chain  # byte for byte: header, signature, transactions
            assert await node.list(from_seq=35) == chain[35:]
            assert await node.list(from_seq=3, limit=33) == chain[3:36]
            assert await node.list(from_seq=40) == []
            assert await node.list(from_seq=2**63 - 1, limit=2**64 - 1) == []
            await expect_error(node.list(from_seq=2**63), grpc.StatusCode.INVALID_ARGUMENT)
            assert await node.list(OTHER_GW) == other
            await expect_error(node.list("edge-99"), grpc.StatusCode.NOT_FOUND)

    arun(go())


def test_restart_keeps_head_and_idempotency(setup: Setup) -> None:
    async def go() -> None:
        chain = setup.signer.chain(4)
        async with running(setup.cfg) as node:
            receipts = [await node.submit(b) for b in chain[:3]]
        async with running(setup.cfg) as node:
            h = await node.head()
            assert h.next_seq == 3
            assert h.header_hash == batchformat.header_hash(chain[2].header)
            assert await node.submit(chain[1]) == receipts[1]
            fork = setup.signer.batch(2, receipts[1].header_hash, txs_for(2, tag="7"))
            await expect_error(node.submit(fork), grpc.StatusCode.ABORTED)
            await node.submit(chain[3])
            assert await node.list() == chain

    arun(go())


def test_concurrent_submits_of_same_seq_store_exactly_one(setup: Setup) -> None:
    async def go() -> None:
        b = setup.signer.chain(1)[0]
        async with running(setup.cfg) as node:
            receipts = await asyncio.gather(*(node.submit(b) for _ in range(8)))
            assert all(r == receipts[0] for r in receipts)
            assert await node.list() == [b]
            assert (await node.head()).next_seq == 1

    arun(go())


def test_concurrent_different_batches_at_same_seq_one_wins(setup: Setup) -> None:
    async def go() -> None:
        s = setup.signer
        rivals = [s.batch(0, batchformat.ZERO_HASH, txs_for(0, tag=str(i))) for i in range(6)]
        async with running(setup.cfg) as node:
            results = await asyncio.gather(
                *(node.submit(b) for b in rivals), return_exceptions=True
            )
            won = [r for r in results if isinstance(r, batch_pb2.Receipt)]
            lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert len(won) == 1 and len(lost) == 5
            assert all(e.code() == grpc.StatusCode.ABORTED for e in lost)
            stored = await node.list()
            assert len(stored) == 1
            assert batchformat.header_hash(stored[0].header) == won[0].header_hash

    arun(go())


def test_store_is_sqlite_wal_on_disk(setup: Setup) -> None:
    async def go() -> None:
        async with running(setup.cfg) as node:
            await node.submit(setup.signer.chain(1)[0])

    arun(go())
    conn = sqlite3.connect(setup.cfg.db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = conn.execute("SELECT gateway_id, seq, receipt FROM batches").fetchall()
    finally:
        conn.close()
    assert [(g, s) for g, s, _ in rows] == [(GW, 0)]
    assert batch_pb2.Receipt.FromString(rows[0][2]).seq == 0


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


def test_unreadable_gateway_key_stops_the_start(setup: Setup, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    cfg = LedgerNodeConfig(
        node_id="ledger-1",
        listen="127.0.0.1:0",
        db_path=tmp_path / "x.db",
        gateway_keys={GW: bad},
        tls=None,
    )
    with pytest.raises(ConfigError, match=r"gateways\.edge-01 = .*bad\.pem"):
        arun(ledger.serve(cfg))


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

        async def head() -> ledger_pb2.Head:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = ledger_pb2_grpc.LedgerServiceStub(ch)
                h: ledger_pb2.Head = await stub.GetHead(
                    ledger_pb2.GetHeadRequest(gateway_id=GW), timeout=10
                )
                return h

        assert arun(head()).next_seq == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
