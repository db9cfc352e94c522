"""The forwarder against real ledger nodes on loopback: what a restart finds in the spool
and on the nodes decides what is sent again, so a kill at any point loses no commitment
(a batch is committed once `quorum` nodes cosigned a checkpoint covering it)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway._pb.edgegateway.v1 import batch_pb2, ledger_pb2
from gateway.edge import tlog
from gateway.edge.config import ForwarderConfig, LedgerNodeRef
from gateway.edge.forwarder import Forwarder
from gateway.edge.spool import Spool, StoredBatch, StoredCheckpoint, prune
from gateway.formats import batchformat, checkpoint, merkle, note
from gateway.ledger import witness
from gateway.ledger.config import LedgerNodeConfig, WitnessConfig
from tests.test_ledger import GW, Node, SoftSigner, arun, running
from tests.test_note import digest_signer
from tests.test_spool import cfg, tx
from tests.test_tlog import cosigned_by

ORIGIN = checkpoint.gateway_origin("edge-gateway.invalid", GW)
QUORUM = 2


@dataclass
class Log:
    """A gateway's spool with batches cut as the batcher cuts them: each batch's header and
    checkpoint (signed by a software key standing in for the HSM) and the log's tiles in
    one spool transaction."""

    spool: Spool
    signer: SoftSigner
    batches: list[batch_pb2.SignedBatch] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # the checkpoints' sizes, by seq
    notes: list[bytes] = field(default_factory=list)
    leaves: list[bytes] = field(default_factory=list)
    edge: tlog.LogEdge = field(default_factory=lambda: tlog.LogEdge(0))
    prev: bytes = batchformat.ZERO_HASH

    def cut(self, n: int) -> None:
        """Spool `n` transactions and store them as the next batch with its checkpoint."""
        key = self.signer.key
        log_key = note.EcdsaDigestSigner(
            ORIGIN, note.spki_der(key.public_key()), digest_signer(key)
        )
        items = [tx("meter-1", len(self.leaves) + i + 1) for i in range(n)]
        for item in items:
            self.spool.append(item).result()
        # Rowids follow the transactions one to one: nothing else is spooled here.
        first_rowid = len(self.leaves) + 1
        seq = len(self.batches)
        b = self.signer.batch(seq, self.prev, [i.leaf for i in items])
        grown, writes = self.edge.append([i.tx_id for i in items])
        signed = checkpoint.sign_checkpoint(
            checkpoint.Checkpoint(ORIGIN, grown.size, grown.root()), [log_key]
        )
        hh = batchformat.header_hash(b.header)
        rowids = (first_rowid, first_rowid + n - 1)
        stored = StoredBatch(seq, b.header, b.signature, hh, *rowids, n, 0, None)
        cp = StoredCheckpoint(
            grown.size, seq, self.edge.size, *rowids, grown.root(), signed, 0, None
        )

        def store(c: sqlite3.Connection) -> None:
            Spool.w_store_batch(c, stored)
            Spool.w_store_checkpoint(c, cp, writes)

        self.spool.write(store).result()
        self.batches.append(b)
        self.sizes.append(grown.size)
        self.notes.append(signed)
        self.leaves += [i.leaf for i in items]
        self.edge = grown
        self.prev = hh

    def cosign_request(self, old: int, seq: int) -> ledger_pb2.AddCheckpointRequest:
        """The AddCheckpoint the forwarder sends a node that cosigned `old` leaves, for the
        checkpoint of batch `seq`."""
        size = self.sizes[seq]
        return ledger_pb2.AddCheckpointRequest(
            gateway_id=GW,
            old_size=old,
            consistency_proof=merkle.consistency_proof(self.leaves[:size], old) if old else [],
            checkpoint=self.notes[seq],
            leaves=self.leaves[old:size],
        )

    def record(self, seq: int, node_id: str, line: str) -> None:
        """A cosignature that reached the spool before the kill."""
        size = self.sizes[seq]
        self.spool.write(
            lambda c: Spool.w_store_cosignature(c, size, node_id, line, QUORUM)
        ).result()

    def record_receipt(self, seq: int, receipt: batch_pb2.Receipt) -> None:
        self.spool.write(
            lambda c: Spool.w_store_receipt(c, seq, receipt.node_id, receipt.SerializeToString())
        ).result()

    def committed_seq(self) -> int:
        return self.spool.read(Spool.q_last_committed_seq).result()

    def cosignatures(self, seq: int) -> list[tuple[str, str]]:
        return self.spool.read(lambda c: Spool.q_cosignatures(c, self.sizes[seq])).result()


@contextlib.contextmanager
def gateway_log(tmp_path: Path) -> Iterator[Log]:
    spool = Spool(cfg(tmp_path / "spool.db"), GW)
    spool.open()
    try:
        yield Log(spool, SoftSigner.new(GW))
    finally:
        spool.close()


@dataclass
class Nodes:
    running: list[Node]
    vkeys: dict[str, str]  # node id -> witness cosignature vkey

    async def cosign(self, req: ledger_pb2.AddCheckpointRequest) -> dict[str, str]:
        """Every node cosigns: node id -> cosignature line."""
        out: dict[str, str] = {}
        for n in self.running:
            answer: ledger_pb2.Cosignature = await n.stub.AddCheckpoint(req, timeout=10)
            out[n.cfg.node_id] = answer.line
        return out

    def forwarder(self, log: Log) -> Forwarder:
        return Forwarder(
            ForwarderConfig(
                nodes=tuple(
                    LedgerNodeRef(n.cfg.node_id, f"127.0.0.1:{n.port}") for n in self.running
                ),
                quorum=QUORUM,
                call_timeout_s=5,
                backoff_initial_s=0.05,
                backoff_max_s=0.5,
                keepalive_s=30,
                tls=None,
            ),
            log.spool,
            GW,
            self.vkeys,
        )


def witness_name(node_id: str) -> str:
    return checkpoint.witness_name("ledger.test.invalid", node_id)


@contextlib.asynccontextmanager
async def ledger_nodes(tmp_path: Path, signer: SoftSigner, n: int = 3) -> AsyncIterator[Nodes]:
    """`n` reference ledger nodes on 127.0.0.1 that witness the gateway's log."""
    pem = signer.write_public_pem(tmp_path / f"{GW}.pem")
    vkeys: dict[str, str] = {}
    cfgs: list[LedgerNodeConfig] = []
    for i in range(1, n + 1):
        node_id = f"ledger-{i}"
        key = tmp_path / f"{node_id}.key"
        vkeys[node_id] = witness.keygen(witness_name(node_id), key)
        cfgs.append(
            LedgerNodeConfig(
                node_id=node_id,
                listen="127.0.0.1:0",
                db_path=tmp_path / f"{node_id}.db",
                gateway_keys={GW: pem},
                tls=None,
                witness=WitnessConfig(key_file=key, origins={GW: ORIGIN}),
            )
        )
    async with contextlib.AsyncExitStack() as stack:
        yield Nodes([await stack.enter_async_context(running(c)) for c in cfgs], vkeys)


async def forward_until_committed(fwd: Forwarder, seq: int, timeout: float = 8) -> int:
    """Run the forwarder until it committed batch `seq` or `timeout` passed; the last
    committed seq it reached."""
    await fwd.resume()
    stop = asyncio.Event()
    task = asyncio.create_task(fwd.run(stop))
    deadline = time.monotonic() + timeout
    while fwd.last_committed_seq < seq and time.monotonic() < deadline and not task.done():
        await asyncio.sleep(0.05)
    stop.set()
    await task
    return fwd.last_committed_seq


def test_batches_the_nodes_hold_without_receipts_commit_once_their_checkpoint_is_cosigned(
    tmp_path: Path,
) -> None:
    """Killed after the nodes stored the last batch and before the spool stored their
    receipts (and before any checkpoint went out): every node's head is past that batch
    after the restart. Receipts commit nothing; the batch is committed by the quorum's
    cosignatures of the checkpoint that covers it, which the forwarder still gets."""
    with gateway_log(tmp_path) as log:
        log.cut(3)
        log.cut(3)

        async def scenario() -> tuple[int, dict[str, str]]:
            async with ledger_nodes(tmp_path, log.signer) as nodes:
                for node in nodes.running:
                    for b in log.batches:
                        receipt = await node.submit(b)
                        if receipt.seq == 0:  # only batch 0's receipts reached the spool
                            log.record_receipt(0, receipt)
                assert log.committed_seq() == -1  # three receipts of batch 0: not committed
                heads = [await n.head() for n in nodes.running]
                assert {(h.next_seq, h.log_size) for h in heads} == {(2, 0)}
                return await forward_until_committed(nodes.forwarder(log), 1), nodes.vkeys

        committed, vkeys = arun(scenario())
        assert committed == 1
        assert log.committed_seq() == 1
        last = log.spool.read(Spool.q_last_committed_checkpoint).result()
        assert last is not None and last.size == 6
        lines = log.cosignatures(1)
        signed = cosigned_by(log.notes[1], lines, list(vkeys.values()))
        assert signed == {witness_name(node_id) for node_id, _line in lines}
        assert len(signed) >= QUORUM


def test_a_checkpoint_every_node_cosigned_before_a_kill_is_committed_after_restart(
    tmp_path: Path,
) -> None:
    """Killed after every node cosigned the last checkpoint and before the spool recorded
    any of their cosignatures: each node's head reports that size as cosigned. With no new
    batch to follow, the forwarder must still ask the nodes for it again (they answer a
    re-sent checkpoint with the cosignature they gave) and commit its batch."""
    with gateway_log(tmp_path) as log:
        log.cut(3)
        log.cut(3)

        async def scenario() -> tuple[int, int, dict[str, str], dict[str, str]]:
            async with ledger_nodes(tmp_path, log.signer) as nodes:
                for node in nodes.running:
                    for seq, b in enumerate(log.batches):
                        log.record_receipt(seq, await node.submit(b))
                for node_id, line in (await nodes.cosign(log.cosign_request(0, 0))).items():
                    log.record(0, node_id, line)
                given = await nodes.cosign(log.cosign_request(3, 1))  # lost to the kill
                assert log.committed_seq() == 0
                assert {(await n.head()).log_size for n in nodes.running} == {6}
                fwd = nodes.forwarder(log)
                committed = await forward_until_committed(fwd, 1)
                return committed, fwd.last_signed_seq, given, nodes.vkeys

        committed, last_signed, given, vkeys = arun(scenario())
        assert (committed, last_signed) == (1, 1)  # no new batch was signed
        assert log.committed_seq() == 1
        lines = log.cosignatures(1)
        assert len(lines) >= QUORUM
        # The cosignatures the nodes gave before the kill, given again, and they verify.
        assert all(given[node_id] == line for node_id, line in lines)
        signed = cosigned_by(log.notes[1], lines, list(vkeys.values()))
        assert signed == {witness_name(node_id) for node_id, _line in lines}


def test_a_checkpoint_the_nodes_skipped_does_not_hold_back_their_cosigning_after_restart(
    tmp_path: Path,
) -> None:
    """A node catching up cosigns only the latest checkpoint (the ones between are never
    cosigned nor committed themselves; the latest commits their batches). After a
    restart, with those batches pruned by retention, the nodes' cosigning goes on from
    their head: the next batch is committed."""
    with gateway_log(tmp_path) as log:
        for _ in range(3):
            log.cut(3)

        async def scenario() -> int:
            async with ledger_nodes(tmp_path, log.signer) as nodes:
                for node in nodes.running:
                    for seq, b in enumerate(log.batches):
                        log.record_receipt(seq, await node.submit(b))
                for node_id, line in (await nodes.cosign(log.cosign_request(0, 0))).items():
                    log.record(0, node_id, line)
                # Checkpoint 6 skipped: 3 -> 9.
                for node_id, line in (await nodes.cosign(log.cosign_request(3, 2))).items():
                    log.record(2, node_id, line)
                assert log.committed_seq() == 2 and log.cosignatures(1) == []
                assert prune(log.spool, 2) == 2  # retention keeps the last committed batch
                log.cut(3)  # a batch signed after the restart
                return await forward_until_committed(nodes.forwarder(log), 3)

        assert arun(scenario()) == 3
        assert log.committed_seq() == 3
        assert len(log.cosignatures(3)) >= QUORUM
