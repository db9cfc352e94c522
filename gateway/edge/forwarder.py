"""The forwarder: the gateway's log to ledger nodes over gRPC, one checkpoint at a time.

A batch is the log's leaves between two checkpoints. Each node has its own loop and
position, the size of the last checkpoint it cosigned: on start (and after it answers
that it holds another size) the loop asks the node for its head, then sends it, with
AddCheckpoint, the leaves since that size up to the latest checkpoint and a consistency
proof; the node answers its witness cosignature. A batch counts committed once `quorum`
nodes cosigned a checkpoint covering it. Transient failures back off exponentially with
jitter; a split view (the node cosigned another log under this gateway's name) stops
forwarding to that node and is reported loudly, since the gateway never rewrites its log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from gateway._pb.edgegateway.v1 import ledger_pb2, ledger_pb2_grpc
from gateway.common.errors import LedgerError
from gateway.common.grpcutil import aio_channel
from gateway.edge import metrics, rotation, tlog
from gateway.edge.config import ForwarderConfig, LedgerNodeRef
from gateway.edge.spool import NewlyCommitted, Spool, StoredCheckpoint, now_ms
from gateway.formats import cosignature, note

log = logging.getLogger("gateway.edge.forwarder")

TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


@dataclass(slots=True)
class NodeState:
    ref: LedgerNodeRef
    state: str = "connecting"
    last_error: str = ""
    failures: int = 0
    # Since when (monotonic) and after how many failed attempts the node has been
    # unreachable or refusing; None while it answers.
    down_since: float | None = None
    down_attempts: int = 0
    # The size of the last checkpoint of this gateway's log the node cosigned (from its
    # GetHead, then from its cosignatures); None until asked, and after it answered
    # that it holds another size than this one without saying which.
    log_size: int | None = None
    cosigned: int = 0


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter (AWS architecture blog's "full jitter")."""
    cap = min(maximum, initial * (2 ** min(attempt, 30)))
    return rng.uniform(initial / 2, cap)


class Forwarder:
    def __init__(
        self,
        cfg: ForwarderConfig,
        spool: Spool,
        gateway_id: str,
        witnesses: Mapping[str, str] | None = None,
        max_call_bytes: int = 2 * 1024 * 1024,
    ) -> None:
        """`witnesses`: node id -> witness cosignature vkey ([log] witnesses); a node's
        cosignature is stored only if it verifies under its vkey, when it has one.
        `max_call_bytes`: the leaf bytes one AddCheckpoint carries at most when a node
        catches up over several checkpoints (batch.max_bytes: what a node takes anyway)."""
        self._max_call_bytes = max_call_bytes
        # The last few steps loaded, by the size they start from: the nodes usually ask
        # for the same step one after the other, and the leaves are read and the request
        # serialized once for all of them.
        self._steps: collections.OrderedDict[int, _Sent] = collections.OrderedDict()
        self._witnesses = {
            node_id: cosignature.parse_cosigner_vkey(vkey)
            for node_id, vkey in (witnesses or {}).items()
        }
        self.cfg = cfg
        self.spool = spool
        self.gateway_id = gateway_id
        self.nodes = [NodeState(ref) for ref in cfg.nodes]
        self.last_signed_seq = -1
        self.last_committed_seq = -1
        self.last_progress = time.monotonic()
        self._wakes = [asyncio.Event() for _ in self.nodes]
        self._beats = [time.monotonic() for _ in self.nodes]
        self._rng = random.Random()
        self._channels: list[grpc.aio.Channel] = []
        self._commit_listeners: list[Callable[[], None]] = []
        metrics.forwarder_quorum.set(cfg.quorum)
        for n in self.nodes:
            self._publish_state(n)

    def _set_state(self, node: NodeState, state: str) -> None:
        """Every change of a node's state goes through here, so the gauges follow it."""
        if state in ("unreachable", "refused"):
            if node.down_since is None:
                node.down_since = time.monotonic()
                node.down_attempts = 0
            node.down_attempts += 1
        if state != node.state:
            node.state = state
            self._publish_state(node)

    def _working(self, node: NodeState) -> None:
        """The node cosigned a checkpoint, or has cosigned the latest: state ok, and if it
        was unreachable or refusing, one line saying it is back. (Answering GetHead alone
        is not enough: a node that needs pruned leaves answers it, then refuses again.)"""
        if node.down_since is not None:
            log.info(
                "ledger node %s reachable again at %s after %.0f s (%d failed attempts)",
                node.ref.node_id,
                node.ref.address,
                time.monotonic() - node.down_since,
                node.down_attempts,
            )
            node.down_since = None
        self._set_state(node, "ok")

    def _publish_state(self, node: NodeState) -> None:
        for s in metrics.LEDGER_NODE_STATES:
            metrics.ledger_node_state.labels(node.ref.node_id, s).set(1 if s == node.state else 0)
        metrics.ledger_nodes_ok.set(sum(1 for n in self.nodes if n.state == "ok"))

    def on_committed(self, listener: Callable[[], None]) -> None:
        """Call `listener` (on the event loop) whenever a checkpoint commits batches."""
        self._commit_listeners.append(listener)

    def notify_signed(self, seq: int) -> None:
        """Batch `seq` (its checkpoint) is durable in the spool."""
        self.last_signed_seq = max(self.last_signed_seq, seq)
        for w in self._wakes:
            w.set()

    async def resume(self) -> None:
        last = await asyncio.wrap_future(self.spool.read(Spool.q_last_checkpoint))
        self.last_signed_seq = -1 if last is None else last.seq
        self.last_committed_seq = await asyncio.wrap_future(
            self.spool.read(Spool.q_last_committed_seq)
        )
        metrics.last_committed_seq.set(self.last_committed_seq)

    def heartbeat(self) -> float:
        """Monotonic time of the least recent node loop turn: a loop that stops
        turning (not one waiting in backoff) is stuck."""
        return min(self._beats) if self._beats else time.monotonic()

    def all_delivered(self) -> bool:
        """Every batch reached the quorum (used by the graceful stop)."""
        return self.last_committed_seq >= self.last_signed_seq

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            for i, node in enumerate(self.nodes):
                ch = aio_channel(node.ref.address, self.cfg.tls, self.cfg.keepalive_s)
                self._channels.append(ch)
                tg.create_task(
                    self._node_loop(i, node, ledger_pb2_grpc.LedgerServiceStub(ch), _add(ch), stop),
                    name=f"forward-{node.ref.node_id}",
                )
        for ch in self._channels:
            await ch.close(None)

    async def _wait(self, i: int, stop: asyncio.Event, timeout: float) -> None:
        waits = [asyncio.ensure_future(self._wakes[i].wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _node_loop(
        self,
        i: int,
        node: NodeState,
        stub: ledger_pb2_grpc.LedgerServiceStub,
        add: _AddCheckpoint,
        stop: asyncio.Event,
    ) -> None:
        """One node: one AddCheckpoint in flight at a time, from the size it last cosigned
        up to the latest checkpoint (several batches in one call when it is behind)."""
        attempt = 0
        while not stop.is_set():
            self._beats[i] = time.monotonic()
            if node.state == "forked":
                self._wakes[i].clear()
                await self._wait(i, stop, 10)
                continue
            try:
                if node.log_size is None:
                    await self._sync_head(node, stub)
                    if node.state == "forked":
                        continue
                self._wakes[i].clear()
                if await self._cosign(node, add):
                    attempt = 0
                    continue
                if node.state != "forked":
                    self._working(node)  # it has cosigned every checkpoint there is
                attempt = 0
                await self._wait(i, stop, 1.0)
                continue
            except LedgerError as e:
                self._set_state(node, "refused")
                node.last_error = str(e)
                node.failures += 1
                attempt += 1
                if attempt == 1 or attempt % 10 == 0:
                    log.error("%s", e)
            except grpc.aio.AioRpcError as e:
                code = e.code()
                metrics.forward_errors.labels(node.ref.node_id, code.name).inc()
                node.failures += 1
                node.last_error = f"{code.name}: {e.details()}"
                if code is grpc.StatusCode.FAILED_PRECONDITION:
                    # The node cosigned another size than we thought (it lost state, or
                    # the spool lacks its last cosignature): continue from the size it
                    # names, or ask its head again.
                    known = _metadata(e, "known-size")
                    log.warning(
                        "ledger %s holds another log size (%s); resyncing from %s",
                        node.ref.node_id,
                        e.details(),
                        f"size {known}" if known and known.isdigit() else "its head",
                    )
                    self._set_state(node, "resyncing")
                    node.log_size = int(known) if known is not None and known.isdigit() else None
                    attempt += 1
                elif code is grpc.StatusCode.ABORTED:  # a split view
                    self._forked(node, e.details() or "")
                    continue
                else:
                    self._set_state(node, "unreachable" if code in TRANSIENT else "refused")
                    attempt += 1
                    if attempt == 1 or attempt % 10 == 0:
                        log.warning(
                            "ledger %s at %s: %s (attempt %d)",
                            node.ref.node_id,
                            node.ref.address,
                            node.last_error,
                            attempt,
                        )
            delay = backoff_delay(
                attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self._rng
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    def _forked(self, node: NodeState, detail: str) -> None:
        self._set_state(node, "forked")
        node.last_error = detail
        log.error(
            "LEDGER SPLIT VIEW: node %s holds a different log for this gateway than its "
            "spool (%s); forwarding to it stopped, the gateway's log is unchanged. An "
            "operator must compare the node's checkpoints with this gateway's spool.",
            node.ref.node_id,
            detail,
        )

    async def _sync_head(self, node: NodeState, stub: ledger_pb2_grpc.LedgerServiceStub) -> None:
        head: ledger_pb2.Head = await stub.GetHead(
            ledger_pb2.GetHeadRequest(gateway_id=self.gateway_id),
            timeout=self.cfg.call_timeout_s,
            wait_for_ready=False,
        )
        # A checkpoint the node cosigned may lack its cosignature here (the gateway was
        # killed between the node's answer and the store): start from before the first
        # such checkpoint, so the node answers it (or a later one covering it) again and
        # the quorum can still be reached when no new batch follows.
        uncosigned = await asyncio.wrap_future(
            self.spool.read(lambda c: _before_uncosigned(c, node.ref.node_id, head.log_size))
        )
        node.log_size = head.log_size if uncosigned is None else uncosigned
        log.info(
            "ledger %s head: log size %d; cosigning from %d",
            node.ref.node_id,
            head.log_size,
            node.log_size,
        )

    async def _cosign(self, node: NodeState, add: _AddCheckpoint) -> bool:
        """Bring the node's cosigned view of the log up to the latest checkpoint: one
        AddCheckpoint from the size it last cosigned, with the leaves since and a
        consistency proof from the tiles. True if it sent one."""
        old = node.log_size
        if old is None:
            return False
        sent = self._steps.get(old)
        if sent is None:
            loaded = await asyncio.wrap_future(
                self.spool.read(
                    lambda c: _load_cosign(c, old, MAX_COSIGN_LEAVES, self._max_call_bytes)
                )
            )
            if loaded is None:
                return False
            cp, leaves, proof = loaded
            if cp is None:
                self._forked(
                    node,
                    f"node cosigned a checkpoint of size {old}, which this gateway's log has not",
                )
                return False
            if not leaves and cp.size > old:
                raise LedgerError(
                    f"ledger {node.ref.node_id} needs the log's leaves from {old}, which the "
                    "spool no longer keeps: raise spool.retention_batches or restore the node "
                    "from a peer"
                )
            # Serialized here, once: building and serializing the request took a third of
            # the main process's GIL at 1 KiB payloads when each node's call did it again.
            wire = ledger_pb2.AddCheckpointRequest(
                gateway_id=self.gateway_id,
                old_size=old,
                consistency_proof=proof,
                checkpoint=cp.note,
                leaves=leaves,
            ).SerializeToString()
            sent = self._steps[old] = (cp, wire)
            while len(self._steps) > STEPS_KEPT:
                self._steps.popitem(last=False)
        cp, wire = sent
        t0 = time.perf_counter()
        answer: ledger_pb2.Cosignature = await add(wire, timeout=self.cfg.call_timeout_s)
        metrics.forward_seconds.labels(node.ref.node_id).observe(time.perf_counter() - t0)
        line = self._checked_line(node, cp, answer)
        new = await asyncio.wrap_future(
            self.spool.write(
                lambda c: Spool.w_store_cosignature(
                    c, cp.size, node.ref.node_id, line, self.cfg.quorum
                )
            )
        )
        node.log_size = cp.size
        node.cosigned += 1
        node.last_error = ""
        self._working(node)
        self.last_progress = time.monotonic()
        self._committed(new)
        return True

    def _checked_line(
        self, node: NodeState, cp: StoredCheckpoint, answer: ledger_pb2.Cosignature
    ) -> str:
        """The node's cosignature line, verified under its vkey when one is configured."""
        if answer.size != cp.size or not answer.line or "\n" in answer.line:
            raise LedgerError(
                f"ledger {node.ref.node_id} answered a cosignature of size {answer.size} "
                f"for checkpoint {cp.size}"
            )
        try:
            body = note.parse_note(cp.note).text
            cosigned = note.parse_note((body + "\n" + answer.line + "\n").encode())
            verifier = self._witnesses.get(node.ref.node_id)
            if verifier is not None:
                note.verify_note(cosigned, [verifier])
        except note.NoteError as e:
            raise LedgerError(
                f"ledger {node.ref.node_id}: its cosignature of checkpoint {cp.size} "
                f"does not verify ({e})"
            ) from None
        return answer.line

    def _committed(self, new: NewlyCommitted) -> None:
        """Batches the quorum's cosignatures committed (only the node whose cosignature
        completed the quorum sees them)."""
        if not new.batches or new.last_seq <= self.last_committed_seq:
            return
        now = now_ms()
        metrics.commit_latency.observe_many([max(0, now - r) / 1000 for r in new.received_ms])
        self.last_committed_seq = new.last_seq
        metrics.batches_committed.inc(new.batches)
        metrics.last_committed_seq.set(new.last_seq)
        for listener in self._commit_listeners:
            listener()


# A step: the checkpoint a node is sent next, the leaves since the size it cosigned and
# the consistency proof (see _load_cosign).
_Step = tuple[StoredCheckpoint | None, list[bytes], list[bytes]]
# A step as sent: its checkpoint and the AddCheckpoint request, serialized.
_Sent = tuple[StoredCheckpoint, bytes]
# LedgerService.AddCheckpoint taking its request already serialized.
_AddCheckpoint = Callable[..., Awaitable[ledger_pb2.Cosignature]]
_ADD_CHECKPOINT = (
    f"/{ledger_pb2.DESCRIPTOR.services_by_name['LedgerService'].full_name}/AddCheckpoint"
)


def _add(channel: grpc.aio.Channel) -> _AddCheckpoint:
    """AddCheckpoint on `channel` for a request serialized by the caller (a stub would
    serialize the same request again for each node)."""
    return channel.unary_unary(
        _ADD_CHECKPOINT,
        request_serializer=None,
        response_deserializer=ledger_pb2.Cosignature.FromString,
    )


# Steps kept for the other nodes (one per node is enough when they keep up together).
# With MAX_COSIGN_LEAVES they bound the leaves held while nodes catch up: 8 steps of
# 20,000 took the gateway of a 1,000,000-transaction spool to a peak RSS of 236 MB; 3 of
# 10,000, once observing the commit latency no longer slowed the catch-up, to 200-209 MB
# (the main process 144 MB); 3 of 5,000 to 188 (main 122), catching up in 17 s.
STEPS_KEPT = 3
# Leaves one AddCheckpoint carries at most when a node catches up (several checkpoints);
# their bytes are bounded by batch.max_bytes too (Forwarder max_call_bytes), so that a
# catch-up call is never larger than the largest batch a node must take.
MAX_COSIGN_LEAVES = 5_000


def _metadata(e: grpc.aio.AioRpcError, key: str) -> str | None:
    items: Any = e.trailing_metadata() or ()
    for k, v in items:
        if k == key:
            return v if isinstance(v, str) else bytes(v).decode("ascii", "replace")
    return None


def _load_cosign(
    conn: sqlite3.Connection, old_size: int, max_leaves: int, max_bytes: int
) -> _Step | None:
    """What a node that cosigned `old_size` is sent next: the latest checkpoint whose
    leaves since `old_size` are at most `max_leaves` and `max_bytes` (at least the next
    checkpoint, whatever its size), those leaves and the consistency proof. None when it
    is up to date; (None, [], []) when old_size is no checkpoint of this log; leaves empty
    when retention pruned some of them.

    A node trusts a rotation's new key only from a checkpoint signed by the old key that
    covers the rotation's entry: the step never goes past the first such checkpoint after
    `old_size`, so a node behind several rotations takes them one at a time."""
    if old_size:
        known = Spool.q_checkpoint(conn, old_size)
        if known is None:
            return None, [], []
    limit = old_size + max_leaves
    entry = rotation.first_entry_size_after(conn, old_size)
    if entry is not None:
        limit = min(limit, entry)
    steps = conn.execute(
        "SELECT size, last_rowid FROM log_checkpoint WHERE size > ? AND size <= ? ORDER BY size",
        (old_size, limit),
    ).fetchall()
    if not steps:
        steps = conn.execute(
            "SELECT size, last_rowid FROM log_checkpoint WHERE size > ? ORDER BY size LIMIT 1",
            (old_size,),
        ).fetchall()
    if not steps:
        return None
    first = Spool.q_checkpoint_covering_index(conn, old_size)
    assert first is not None
    leaves: list[bytes] = []
    total = 0
    size = old_size
    rows = conn.execute(
        "SELECT leaf FROM tx WHERE rowid BETWEEN ? AND ? ORDER BY rowid",
        (first.first_rowid, steps[-1][1]),
    )
    for step_size, _last_rowid in steps:
        want = step_size - old_size - len(leaves)
        more = [r[0] for r in rows.fetchmany(want)]
        if len(more) != want:
            if leaves:
                break
            return Spool.q_checkpoint(conn, step_size), [], []  # pruned
        added = sum(len(leaf) for leaf in more)
        if leaves and total + added > max_bytes:
            break
        leaves += more
        total += added
        size = step_size
    rows.close()
    cp = Spool.q_checkpoint(conn, size)
    assert cp is not None
    reader = tlog.TileReader(cp.size, tlog.sqlite_fetch(conn))
    proof = reader.consistency_proof(old_size) if old_size else []
    return cp, leaves, proof


def _before_uncosigned(conn: sqlite3.Connection, node_id: str, size: int) -> int | None:
    """Where the cosigning of a node that last cosigned checkpoint `size` (its head) starts
    when the spool lacks that cosignature and no checkpoint from `size` on is committed: the
    size of the checkpoint before it (0 if none), so the node is sent it again. None
    otherwise. Only its last cosignature can be missing (each is stored before the node is
    sent the next checkpoint); the checkpoints it skipped lack its cosignature for good."""
    row = conn.execute(
        "SELECT 1 FROM log_checkpoint WHERE size = ? AND size > (SELECT coalesce(max(size), 0)"
        " FROM log_checkpoint WHERE committed_ms IS NOT NULL) AND NOT EXISTS"
        " (SELECT 1 FROM log_cosignature AS s WHERE s.size = ? AND s.node_id = ?)",
        (size, size, node_id),
    ).fetchone()
    if row is None:
        return None
    before = conn.execute("SELECT max(size) FROM log_checkpoint WHERE size < ?", (size,)).fetchone()
    return 0 if before is None or before[0] is None else int(before[0])
