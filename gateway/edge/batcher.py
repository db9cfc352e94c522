"""The batcher: cuts spooled transactions into batches of the gateway's log and signs
each batch's checkpoint in the HSM, the batch's one signature.

A batch is cut by whichever comes first of max_tx, max_bytes and max_age (the
age of its oldest transaction); it is the log's leaves between the previous
checkpoint and its own. The checkpoint, the tx-to-batch assignment and the
log's new tiles are stored in one spool transaction, so a crash between signing
and storing leaves no trace but an unused signature: the same transactions
are batched again under the same seq (promise 2).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.common.errors import HsmError
from gateway.edge import metrics, rotation, tlog
from gateway.edge.config import BatchConfig
from gateway.edge.signer import Signer
from gateway.edge.spool import PendingTx, Spool, StoredCheckpoint, now_ms
from gateway.formats import checkpoint

log = logging.getLogger("gateway.edge.batcher")
HSM_RETRY_MAX_S = 15.0
# Without a wake-up, look at the spool at least this often.
POLL_S = 0.25
# Between wake-ups, look at most this often unless a full batch is waiting.
MIN_QUERY_INTERVAL_S = 0.02
# Signed batches on their way into the spool while the next is cut. Storing waits for
# the spool writers' turn; cutting need not wait for it.
MAX_STORES_IN_FLIGHT = 4


def _load_log(conn: sqlite3.Connection) -> tlog.LogEdge:
    """The log's right edge after the spool's last checkpoint."""
    last = Spool.q_last_checkpoint(conn)
    return tlog.load_edge(0 if last is None else last.size, tlog.sqlite_fetch(conn))


@dataclass(frozen=True, slots=True)
class Cut:
    """Where to cut: the first `count` pending transactions, or none yet."""

    count: int
    reason: str


def decide_cut(rows: Sequence[PendingTx], cfg: BatchConfig, now: int, force: bool = False) -> Cut:
    """Pure cutting rule: count, then bytes, then age of the oldest transaction."""
    if not rows:
        return Cut(0, "empty")
    total = 0
    for i, r in enumerate(rows):
        if i and total + r.size > cfg.max_bytes:
            return Cut(i, "max_bytes")
        total += r.size
        if i + 1 >= cfg.max_tx:
            return Cut(i + 1, "max_tx")
    if total >= cfg.max_bytes:
        return Cut(len(rows), "max_bytes")
    if now - rows[0].received_ms >= cfg.max_age_s * 1000:
        return Cut(len(rows), "max_age")
    if force:
        return Cut(len(rows), "flush")
    return Cut(0, "waiting")


class Batcher:
    def __init__(
        self,
        cfg: BatchConfig,
        spool: Spool,
        signer: Signer,
        gateway_id: str,
        key_id: bytes,
        on_signed: Callable[[int], None],
        origin: str | None = None,
        default_key: rotation.TokenKey | None = None,
    ) -> None:
        """`origin`: the log's origin line (config [log] origin); every batch also gets a
        checkpoint of the gateway's log, signed in the HSM under that name.
        `default_key`: the configured HSM key, which signs until a key rotation
        (gateway.edge.rotation) says otherwise."""
        self.cfg = cfg
        self.spool = spool
        self.signer = signer
        self.gateway_id = gateway_id
        self.key_id = key_id
        self._on_signed = on_signed
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.next_seq = 0
        self.cursor = 0  # last rowid already in a batch
        self.last_progress = time.monotonic()
        self.oldest_pending_ms: int | None = None
        self.paused_reason: str | None = None
        self.hsm_failures = 0
        self._cut_listeners: list[Callable[[], None]] = []
        self.hsm_error: str | None = None
        self._stores: collections.deque[asyncio.Future[None]] = collections.deque()
        self.origin = origin or checkpoint.gateway_origin("edge-gateway.invalid", gateway_id)
        self.log = tlog.LogEdge(0)  # the log as the next batch extends it
        self.default_key = default_key
        self.keys = rotation.KeyState()  # which keys sign, as the next batch is cut

    async def resume(self) -> None:
        """Continue the log from the spool's last batch."""
        self._loop = asyncio.get_running_loop()
        last = await asyncio.wrap_future(self.spool.read(Spool.q_last_checkpoint))
        if last is not None:
            self.next_seq = last.seq + 1
            self.cursor = last.last_rowid
        self.log = await asyncio.wrap_future(self.spool.read(_load_log))
        self.keys = await asyncio.wrap_future(self.spool.read(rotation.read_state))
        await self._retire_old_key()
        # Right after a restart, not only from the next signing on.
        metrics.last_signed_seq.set(self.next_seq - 1)
        self.spool.on_commit(self._committed)

    def key(self, k: rotation.TokenKey | None) -> rotation.TokenKey:
        """A key of a rotation plan on the token; None is the configured key."""
        if k is not None:
            return k
        if self.default_key is None:
            raise HsmError("no configured key to sign with")
        return self.default_key

    def begin_rotation(self, r: rotation.Rotation) -> bool:
        """Take up a rotation whose entry goes into the spool now: its checkpoint is
        signed by the old key, the following ones by both. False if one is under way."""
        if self.keys.in_progress():
            return False
        self.keys = rotation.KeyState(active=self.keys.active, rotation=r)
        return True

    async def _retire_old_key(self) -> None:
        r = self.keys.rotation
        if r is None or r.stage != "done":
            return
        try:
            await asyncio.wrap_future(self.signer.retire_key(r.old.label, r.old.cka_id))
        except HsmError as e:
            log.warning("old log key %r not marked retired on the token: %s", r.old.label, e)
            return
        log.info(
            "key rotation %d done: old log key %r retired on the token (CKA_SIGN false)",
            r.number,
            r.old.label,
        )

    def on_cut(self, listener: Callable[[], None]) -> None:
        """Call `listener()` on the event loop after each batch is stored."""
        self._cut_listeners.append(listener)

    def _committed(self, _max_rowid: int) -> None:
        # Runs on the spool writer thread.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    @property
    def depth(self) -> int:
        return max(0, self.spool.max_rowid - self.cursor)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._run(stop)
        finally:
            await self._drain_stores()

    async def _run(self, stop: asyncio.Event) -> None:
        last_query = 0.0
        while not stop.is_set():
            while self._stores and self._stores[0].done():
                await self._stores.popleft()  # a failed store ends the batcher here
            rows = await asyncio.wrap_future(
                self.spool.read(lambda c: Spool.q_pending(c, self.cursor, self.cfg.max_tx))
            )
            last_query = time.monotonic()
            self.oldest_pending_ms = rows[0].received_ms if rows else None
            cut = decide_cut(rows, self.cfg, now_ms())
            if cut.count:
                try:
                    await self._cut(rows[: cut.count], cut.reason)
                except HsmError as e:
                    # Batching pauses; intake keeps spooling up to its limits. The
                    # same transactions are cut again, under the same seq, once the
                    # HSM answers.
                    self.hsm_failures += 1
                    self.hsm_error = str(e)
                    delay = min(HSM_RETRY_MAX_S, 0.5 * 2 ** min(self.hsm_failures, 6))
                    log.error(
                        "batch %d not signed: %s; retrying in %.1f s", self.next_seq, e, delay
                    )
                    self.last_progress = time.monotonic()  # waiting on the HSM, not stuck
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    continue
                if self.hsm_failures:
                    log.info("hsm signing again after %d failed attempts", self.hsm_failures)
                self.hsm_failures = 0
                self.hsm_error = None
                continue
            self.last_progress = time.monotonic()  # idle and healthy
            timeout = POLL_S
            if rows:
                due = (rows[0].received_ms / 1000 + self.cfg.max_age_s) - time.time()
                timeout = max(0.0, min(timeout, due))
            await self._sleep(stop, timeout, last_query)

    async def _sleep(self, stop: asyncio.Event, timeout: float, last_query: float) -> None:
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return
            if self.depth >= self.cfg.max_tx:
                return
            # More arrived; max_bytes may now be crossed. Look again, but at most
            # every MIN_QUERY_INTERVAL_S rather than on every group commit.
            wait = MIN_QUERY_INTERVAL_S - (time.monotonic() - last_query)
            if wait > 0:
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            return

    async def flush(self) -> int:
        """Cut and sign everything pending now (graceful stop). Returns batches made."""
        made = 0
        while True:
            rows = await asyncio.wrap_future(
                self.spool.read(lambda c: Spool.q_pending(c, self.cursor, self.cfg.max_tx))
            )
            cut = decide_cut(rows, self.cfg, now_ms(), force=True)
            if not cut.count:
                await self._drain_stores()
                return made
            try:
                await self._cut(rows[: cut.count], cut.reason)
            except HsmError as e:
                log.error("open batch not signed at stop (%s); it is cut at the next start", e)
                await self._drain_stores()
                return made
            made += 1

    async def _cut(self, rows: Sequence[PendingTx], reason: str) -> None:
        while self._stores and self._stores[0].done():
            await self._stores.popleft()  # raises a store's spool error here
        log_after, tile_writes = self.log.append([r.tx_id for r in rows])
        cp = checkpoint.Checkpoint(self.origin, log_after.size, log_after.root())
        created = now_ms()
        cp_ckas: list[bytes | None] = [None]
        if self.default_key is not None:
            cp_ckas = [self.key(k).cka_id for k in rotation.plan(self.keys).checkpoint]
        t0 = time.perf_counter()
        # The batch's one signature (during a key rotation's overlap, one by each key).
        signed_cp = await asyncio.wrap_future(self.signer.sign_checkpoint(cp, cp_ckas))
        metrics.sign_seconds.observe(time.perf_counter() - t0)
        seq = self.next_seq
        stored_cp = StoredCheckpoint(
            size=cp.size,
            seq=seq,
            first_index=self.log.size,
            first_rowid=rows[0].rowid,
            last_rowid=rows[-1].rowid,
            root=cp.root_hash,
            note=signed_cp,
            created_ms=created,
            committed_ms=None,
        )

        keys_after = rotation.after_checkpoint(self.keys, [r.tx_id for r in rows], cp.size, created)
        changed = keys_after != self.keys

        def store_op(c: sqlite3.Connection) -> None:
            Spool.w_store_checkpoint(c, stored_cp, tile_writes)
            if changed:  # a rotation's stage moves with the checkpoint that moves it
                rotation.write_state(c, keys_after)

        # The checkpoint, the tx-to-batch assignment and the tiles are stored in one spool
        # transaction; the next batch is cut meanwhile. Stores run in seq order on the
        # spool's writer, and one that fails makes every later one fail
        # (w_store_checkpoint refuses a gap), so nothing is forwarded that is not durable
        # behind it.
        store = asyncio.wrap_future(self.spool.write(store_op))
        self.next_seq += 1
        self.log = log_after
        done = changed and keys_after.rotation is not None and keys_after.rotation.stage == "done"
        if changed:
            self.keys = keys_after
            # The key that signs the next checkpoints first (what GetStatus reports).
            nxt = self.signer.infos.get(self.key(rotation.plan(keys_after).checkpoint[0]).cka_id)
            if nxt is not None:
                self.key_id = nxt.key_id
        self.cursor = rows[-1].rowid
        self.last_progress = time.monotonic()
        log.debug("batch %d cut (%s): %d txs", seq, reason, len(rows))
        self._stores.append(asyncio.ensure_future(self._stored(store, seq, len(rows), done)))
        while len(self._stores) >= MAX_STORES_IN_FLIGHT:
            await self._stores.popleft()

    async def _stored(
        self, store: asyncio.Future[None], seq: int, count: int, rotation_done: bool = False
    ) -> None:
        await store  # a spool error ends the batcher, and the gateway with it
        if rotation_done:
            await self._retire_old_key()
        self.last_progress = time.monotonic()
        metrics.batches_signed.inc()
        metrics.batch_size.observe(count)
        metrics.last_signed_seq.set(seq)
        self._on_signed(seq)
        for listener in self._cut_listeners:
            listener()

    async def _drain_stores(self) -> None:
        while self._stores:
            await self._stores.popleft()
