"""The forwarder against real ledger nodes on loopback: a node gets the gateway's log only
through AddCheckpoint, and what a restart finds in the spool and on the nodes decides what
is sent again, so a kill at any point loses no commitment (a batch is committed once
`quorum` nodes cosigned a checkpoint covering it)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway._pb.edgegateway.v1 import ledger_pb2
from gateway.edge import tlog
from gateway.edge.config import ForwarderConfig, LedgerNodeRef
from gateway.edge.forwarder import Forwarder
from gateway.edge.spool import Incoming, Spool, StoredCheckpoint, prune
from gateway.formats import checkpoint, keyrotation, merkle, note
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
    """A gateway's spool with batches cut as the batcher cuts them: each batch's checkpoint
    (signed by a software key standing in for the HSM) and the log's tiles in one spool
    transaction. `device` names the devices' transactions (another device, another log)."""

    spool: Spool
    signer: SoftSigner
    device: str = "meter-1"
    sizes: list[int] = field(default_factory=list)  # the checkpoints' sizes, by seq
    notes: list[bytes] = field(default_factory=list)
    leaves: list[bytes] = field(default_factory=list)
    edge: tlog.LogEdge = field(default_factory=lambda: tlog.LogEdge(0))

    def cut(
        self,
        n: int,
        keys: list[ec.EllipticCurvePrivateKey] | None = None,
        entry: keyrotation.RotationEntry | None = None,
        content: bytes = b"x",
    ) -> None:
        """Spool `n` transactions and store them as the next batch: its checkpoint, signed
        by `keys` (the signer's key by default). `entry`: a key rotation entry spooled
        first, as the service spools it (one more leaf)."""
        log_keys = [
            note.EcdsaDigestSigner(ORIGIN, note.spki_der(k.public_key()), digest_signer(k))
            for k in keys or [self.signer.key]
        ]
        items = [tx(self.device, len(self.leaves) + i + 1, content) for i in range(n)]
        if entry is not None:
            leaf = entry.leaf()
            items.insert(
                0,
                Incoming(
                    device_id=keyrotation.RESERVED_DEVICE,
                    device_seq=entry.rotation,
                    payload_sha256=hashlib.sha256(entry.fields()).digest(),
                    tx_id=merkle.leaf_hash(leaf),
                    leaf=leaf,
                    received_ms=1_790_000_000_000,
                ),
            )
            n += 1
        for item in items:
            self.spool.append(item).result()
        # Rowids follow the transactions one to one: nothing else is spooled here.
        first_rowid = len(self.leaves) + 1
        seq = len(self.sizes)
        grown, writes = self.edge.append([i.tx_id for i in items])
        signed = checkpoint.sign_checkpoint(
            checkpoint.Checkpoint(ORIGIN, grown.size, grown.root()), log_keys
        )
        rowids = (first_rowid, first_rowid + n - 1)
        cp = StoredCheckpoint(
            grown.size, seq, self.edge.size, *rowids, grown.root(), signed, 0, None
        )
        self.spool.write(lambda c: Spool.w_store_checkpoint(c, cp, writes)).result()
        self.sizes.append(grown.size)
        self.notes.append(signed)
        self.leaves += [i.leaf for i in items]
        self.edge = grown

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

    def committed_seq(self) -> int:
        return self.spool.read(Spool.q_last_committed_seq).result()

    def cosignatures(self, seq: int) -> list[tuple[str, str]]:
        return self.spool.read(lambda c: Spool.q_cosignatures(c, self.sizes[seq])).result()


@contextlib.contextmanager
def gateway_log(
    tmp_path: Path, signer: SoftSigner | None = None, device: str = "meter-1"
) -> Iterator[Log]:
    spool = Spool(cfg(tmp_path / f"spool-{device}.db"), GW)
    spool.open()
    try:
        yield Log(spool, signer or SoftSigner.new(GW), device)
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

    def forwarder(self, log: Log, max_call_bytes: int = 2 * 1024 * 1024) -> Forwarder:
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
            max_call_bytes=max_call_bytes,
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


def test_nodes_that_hold_nothing_get_the_log_through_add_checkpoint_alone(
    tmp_path: Path,
) -> None:
    """Fresh nodes: one AddCheckpoint each carries both batches' leaves up to the latest
    checkpoint (no batch is sent otherwise), and the quorum's cosignatures commit both."""
    with gateway_log(tmp_path) as log:
        log.cut(3)
        log.cut(3)

        async def scenario() -> tuple[int, dict[str, str], list[int], list[int]]:
            async with ledger_nodes(tmp_path, log.signer) as nodes:
                assert {(await n.head()).log_size for n in nodes.running} == {0}
                fwd = nodes.forwarder(log)
                committed = await forward_until_committed(fwd, 1)
                sizes = [(await n.head()).log_size for n in nodes.running]
                return committed, nodes.vkeys, sizes, [n.cosigned for n in fwd.nodes]

        committed, vkeys, sizes, calls = arun(scenario())
        assert committed == 1
        assert log.committed_seq() == 1
        assert sizes.count(6) >= QUORUM and set(sizes) <= {0, 6}
        assert all(c <= 1 for c in calls)  # one call covered both batches
        last = log.spool.read(Spool.q_last_committed_checkpoint).result()
        assert last is not None and last.size == 6
        assert log.cosignatures(0) == []  # checkpoint 3 was skipped, not cosigned
        lines = log.cosignatures(1)
        signed = cosigned_by(log.notes[1], lines, list(vkeys.values()))
        assert signed == {witness_name(node_id) for node_id, _line in lines}
        assert len(signed) >= QUORUM


def test_a_node_that_cosigned_another_log_is_a_split_view_and_the_quorum_commits_without_it(
    tmp_path: Path,
) -> None:
    """A node cosigned a checkpoint of another log under this gateway's name and key (a
    second gateway on a copy of the spool, say): the forwarder's AddCheckpoint is refused
    as a split view, the node is marked forked, and the others commit the batch."""
    signer = SoftSigner.new(GW)
    with gateway_log(tmp_path, signer) as log, gateway_log(tmp_path, signer, "rogue-1") as other:
        log.cut(3)
        log.cut(3)
        other.cut(3)

        async def scenario() -> tuple[int, dict[str, str]]:
            async with ledger_nodes(tmp_path, log.signer) as nodes:
                await nodes.running[0].stub.AddCheckpoint(other.cosign_request(0, 0), timeout=10)
                fwd = nodes.forwarder(log)
                await fwd.resume()
                stop = asyncio.Event()
                task = asyncio.create_task(fwd.run(stop))
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline and not task.done():
                    states = [n.state for n in fwd.nodes]
                    if fwd.last_committed_seq == 1 and states == ["forked", "ok", "ok"]:
                        break
                    await asyncio.sleep(0.05)
                stop.set()
                await task
                return fwd.last_committed_seq, {n.ref.node_id: n.state for n in fwd.nodes}

        committed, states = arun(scenario())
        assert committed == 1
        assert states == {"ledger-1": "forked", "ledger-2": "ok", "ledger-3": "ok"}
        assert [node for node, _line in log.cosignatures(1)] == ["ledger-2", "ledger-3"]


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
    restart, with those batches' transactions pruned by retention, the nodes' cosigning
    goes on from their head: the next batch is committed."""
    with gateway_log(tmp_path) as log:
        for _ in range(3):
            log.cut(3)

        async def scenario() -> int:
            async with ledger_nodes(tmp_path, log.signer) as nodes:
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


def rotation_entry(
    number: int, old: ec.EllipticCurvePrivateKey, new: ec.EllipticCurvePrivateKey
) -> keyrotation.RotationEntry:
    return keyrotation.RotationEntry(
        origin=ORIGIN,
        gateway_id=GW,
        rotation=number,
        old_key_id=hashlib.sha256(note.spki_der(old.public_key())).digest(),
        new_spki=note.spki_der(new.public_key()),
        overlap_checkpoints=1,
        overlap_seconds=0,
        created_ms=1_790_000_000_000 + number,
    )


@pytest.mark.parametrize("max_bytes", [3 * 5 * 215, 2 * 1024 * 1024], ids=["3 batches", "2 MiB"])
def test_a_node_two_rotations_behind_takes_them_one_at_a_time_in_calls_of_bounded_bytes(
    tmp_path: Path, max_bytes: int
) -> None:
    """A node that was away through two key rotations trusts only the first key: it is
    sent the checkpoint covering the first rotation's entry (the first key signed it),
    then the one covering the second's (the second key signed it), then the rest; and
    however far behind, no call carries more leaf bytes than max_call_bytes beyond one
    checkpoint's. (Sent the latest checkpoint at once, it would refuse it for ever.)"""
    signer = SoftSigner.new(GW)
    k0, k1, k2 = signer.key, *(ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    with gateway_log(tmp_path, signer) as log:
        content = b"y" * 200  # leaves of about 210 bytes
        log.cut(5, content=content)
        log.cut(5, [k0], rotation_entry(1, k0, k1), content)  # covers entry 1: old key
        log.cut(5, [k0, k1], content=content)  # the overlap
        log.cut(5, [k1], content=content)
        log.cut(5, [k1], rotation_entry(2, k1, k2), content)  # covers entry 2
        log.cut(5, [k1, k2], content=content)
        log.cut(5, [k2], content=content)
        log.cut(5, [k2], content=content)
        entries = {log.sizes[1], log.sizes[4]}

        async def scenario() -> list[int]:
            async with ledger_nodes(tmp_path, log.signer, n=2) as nodes:
                fwd = nodes.forwarder(log, max_call_bytes=max_bytes)
                await forward_until_committed(fwd, len(log.sizes) - 1)
                cosigned = []
                for n in nodes.running:
                    conn = sqlite3.connect(f"file:{n.cfg.db_path}?mode=ro", uri=True)
                    try:
                        cosigned.append(
                            [r[0] for r in conn.execute("SELECT size FROM witness_cosigned")]
                        )
                    finally:
                        conn.close()
                return cosigned

        for sizes in arun(scenario()):
            assert sizes[-1] == log.sizes[-1], sizes
            assert entries <= set(sizes), (entries, sizes)
            steps = list(zip([0, *sizes[:-1]], sizes, strict=True))
            for old, new in steps:
                leaf_bytes = sum(len(leaf) for leaf in log.leaves[old:new])
                one_batch = log.sizes.index(new) == 0 or log.sizes[log.sizes.index(new) - 1] == old
                assert leaf_bytes <= max_bytes or one_batch, (old, new, leaf_bytes)
        assert log.committed_seq() == len(log.sizes) - 1
