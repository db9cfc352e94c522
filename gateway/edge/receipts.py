"""Receipts to devices: once a transaction of a profile with `[receipts] enabled = true` is
committed (a checkpoint covering it cosigned by the forwarder's quorum), its receipt
(gateway.formats.receipt) goes to the device's receipt topic, QoS 1, over a publish-only
MQTT connection of the main process, never through the intake processes.

What is pending lives in the spool, not in memory: the meta row `receipts_published_size`
is the log size below which every receipt was acknowledged by the broker. The publisher
reads the leaves after it in chunks (at most CHUNK, never across a batch), publishes the
chunk's receipts with at most WINDOW unacknowledged, and moves the mark only when the broker
acknowledged them all. A restart or a broker that goes away mid-chunk sends that chunk again:
a device may get a receipt twice (QoS 1 is at least once), never none, unless retention
removed its transaction first (counted as skipped, reason pruned). Device ids appear in
topics, never in logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError

from gateway._pb.edgegateway.v1 import transaction_pb2
from gateway.edge import metrics, tlog
from gateway.edge.config import MqttConfig
from gateway.edge.profiles.builtin import DEVICE_ID_RE
from gateway.edge.profiles.spec import ReceiptSpec
from gateway.edge.spool import Spool, StoredCheckpoint
from gateway.formats import note, receipt

log = logging.getLogger("gateway.edge.receipts")

MARK_KEY = "receipts_published_size"
CLIENT_ID_SUFFIX = "-receipts"
# Receipts read from the spool at a time, and published before the mark moves.
CHUNK = 256
# Receipts published and not yet acknowledged by the broker, at most.
WINDOW = 64
# How long a chunk may wait for the broker's acknowledgements before it is sent again.
ACK_TIMEOUT_S = 30.0
IDLE_S = 1.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str  # below the mount point
    payload: bytes


@dataclass(slots=True)
class Chunk:
    """Leaves [start, end) of the log and the receipts among them, against `size`."""

    start: int
    end: int
    size: int
    receipts: list[Outgoing] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def read_mark(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (MARK_KEY,)).fetchone()
    return None if row is None else int(row[0])


def write_mark(conn: sqlite3.Connection, size: int) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (MARK_KEY, str(size)),
    )


def committed_size(conn: sqlite3.Connection) -> int:
    cp = Spool.q_last_committed_checkpoint(conn)
    return 0 if cp is None else cp.size


def _signatures(conn: sqlite3.Connection, cp: StoredCheckpoint) -> tuple[tuple[bytes, bytes], ...]:
    """The checkpoint's log signature and the witnesses' cosignatures, as (key ID, sig)."""
    lines = "".join(line + "\n" for _node, line in Spool.q_cosignatures(conn, cp.size))
    signed = note.parse_note(cp.note + lines.encode())
    return tuple((s.key_id, s.signature) for s in signed.signatures)


def load_chunk(
    conn: sqlite3.Connection, mark: int, specs: Mapping[str, ReceiptSpec], limit: int = CHUNK
) -> Chunk | None:
    """The receipts of the committed leaves from `mark` on (at most `limit`, within one
    batch), against the latest committed checkpoint; None when nothing is committed past
    `mark`. Pure spool reads."""
    target = Spool.q_last_committed_checkpoint(conn)
    if target is None or target.size <= mark:
        return None
    batch = Spool.q_checkpoint_covering_index(conn, mark)
    if batch is None:  # the log has no batch there: nothing to read, move on
        return Chunk(mark, target.size, target.size)
    end = min(batch.size, mark + limit, target.size)
    chunk = Chunk(mark, end, target.size)
    rows = conn.execute(
        "SELECT tx_id, device_id, leaf FROM tx WHERE rowid BETWEEN ? AND ?"
        " ORDER BY rowid LIMIT ? OFFSET ?",
        (batch.first_rowid, batch.last_rowid, end - mark, mark - batch.first_index),
    ).fetchall()
    if len(rows) != end - mark:
        chunk.skipped["pruned"] += end - mark
        return chunk
    reader: tlog.TileReader | None = None
    signatures: tuple[tuple[bytes, bytes], ...] = ()
    for i, (tx_id, device_id, leaf) in enumerate(rows):
        try:
            profile = transaction_pb2.Transaction.FromString(leaf).profile
        except DecodeError:
            continue  # not a transaction this gateway wrote: no profile, no receipt
        spec = specs.get(profile)
        if spec is None:
            continue
        if not DEVICE_ID_RE.match(device_id):
            chunk.skipped["device_id"] += 1
            continue
        if reader is None:
            reader = tlog.TileReader(target.size, tlog.sqlite_fetch(conn))
            signatures = _signatures(conn, target)
        index = mark + i
        r = receipt.Receipt(
            bytes(tx_id), index, target.size, tuple(reader.inclusion_proof(index)), signatures
        )
        chunk.receipts.append(Outgoing(spec.topic_for(device_id), r.encode()))
    return chunk


class ReceiptPublisher:
    """The receipt stage: spool in, QoS 1 publishes out, the mark back into the spool."""

    def __init__(
        self,
        cfg: MqttConfig,
        spool: Spool,
        specs: Callable[[], Mapping[str, ReceiptSpec]],
        make_client: Callable[[MqttConfig], mqtt.Client],
    ) -> None:
        """`specs`: profile id -> its [receipts], read at every turn (a SIGHUP may change
        them); `make_client` builds the paho client from [mqtt] (credentials, TLS)."""
        self.cfg = dataclasses.replace(cfg, client_id=cfg.client_id + CLIENT_ID_SUFFIX)
        self.spool = spool
        self._specs = specs
        self._make_client = make_client
        self._client: mqtt.Client | None = None
        self._cond = threading.Condition()
        self._connected = False
        self._refused: set[int] = set()
        self._wake = asyncio.Event()
        self.mark: int | None = None
        self.published = 0
        self.last_progress = time.monotonic()

    def wake(self) -> None:
        """A checkpoint was committed (any thread of the event loop)."""
        self._wake.set()

    @property
    def connected(self) -> bool:
        return self._connected

    # ---- the MQTT connection (paho's network thread) ---------------------------

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        ok = not getattr(rc, "is_failure", False)
        with self._cond:
            self._connected = ok
            self._cond.notify_all()
        if ok:
            log.info("receipts: connected to %s:%d", self.cfg.host, self.cfg.port)
        else:
            log.warning("receipts: broker %s:%d refused: %s", self.cfg.host, self.cfg.port, rc)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        with self._cond:
            was = self._connected
            self._connected = False
            self._cond.notify_all()
        if was:
            log.warning("receipts: disconnected from the broker (%s); pending ones wait", rc)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        # Called under paho's message lock: take only ours, briefly.
        with self._cond:
            if getattr(rc, "is_failure", False):
                self._refused.add(mid)
            self._cond.notify_all()

    def _start_client(self) -> None:
        c = self._make_client(self.cfg)
        c.max_inflight_messages_set(WINDOW)
        c.max_queued_messages_set(WINDOW)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        c.loop_start()
        self._client = c

    def close(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            with contextlib.suppress(OSError):
                c.disconnect()
            c.loop_stop()

    def _publish(self, out: list[Outgoing]) -> tuple[int, int] | None:
        """Publish `out` QoS 1 with at most WINDOW unacknowledged; (acknowledged, refused)
        once the broker answered every one, None if the connection went away or the
        answers took longer than ACK_TIMEOUT_S (the chunk goes again). Worker thread."""
        c = self._client
        assert c is not None
        mount = self.cfg.mount_point
        infos: list[mqtt.MQTTMessageInfo] = []
        deadline = time.monotonic() + ACK_TIMEOUT_S
        with self._cond:
            self._refused.clear()

        first = 0  # every publish before this one is acknowledged

        def unanswered() -> int:
            # At least the true count (one acknowledged out of order counts until those
            # before it are), and amortized O(1): the broker answers QoS 1 in order.
            nonlocal first
            while first < len(infos) and infos[first].is_published():
                first += 1
            return len(infos) - first

        for o in out:
            with self._cond:
                while unanswered() >= WINDOW and self._connected:
                    if time.monotonic() > deadline:
                        return None
                    self._cond.wait(0.05)
                if not self._connected:
                    return None
            info = c.publish(mount + o.topic, o.payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return None
            infos.append(info)
        with self._cond:
            while unanswered():
                if not self._connected or time.monotonic() > deadline:
                    return None
                self._cond.wait(0.05)
            refused = sum(1 for i in infos if i.mid in self._refused)
        return len(infos) - refused, refused

    # ---- the stage ---------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                moved = False
                specs = self._specs()
                if specs:
                    moved = await self._turn(specs)
                if not moved:
                    await self._idle(stop)
        finally:
            await asyncio.to_thread(self.close)

    async def _idle(self, stop: asyncio.Event) -> None:
        self._wake.clear()
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=IDLE_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _turn(self, specs: Mapping[str, ReceiptSpec]) -> bool:
        """One chunk; True if the mark moved."""
        spool = self.spool
        if self.mark is None:
            stored = await asyncio.wrap_future(spool.read(read_mark))
            if stored is None:
                # Opting in starts with what is committed from now on.
                stored = await asyncio.wrap_future(spool.read(committed_size))
                await asyncio.wrap_future(spool.write(lambda c: write_mark(c, stored)))
                log.info("receipts: published from log size %d on", stored)
            self.mark = stored
        if self._client is None:
            self._start_client()
        mark = self.mark
        chunk = await asyncio.wrap_future(spool.read(lambda c: load_chunk(c, mark, specs)))
        if chunk is None:
            metrics.receipts_pending.set(0)
            return False
        metrics.receipts_pending.set(chunk.size - mark)
        refused = 0
        if chunk.receipts:
            if not self._connected:
                return False
            done = await asyncio.to_thread(self._publish, chunk.receipts)
            if done is None:
                return False
            acked, refused = done
            metrics.receipts_published.inc(acked)
            self.published += acked
        if refused:
            chunk.skipped["refused"] += refused
        for reason, n in chunk.skipped.items():
            metrics.receipts_skipped.labels(reason).inc(n)
            log.warning(
                "receipts: %d of log entries %d..%d not published (%s)",
                n,
                chunk.start,
                chunk.end - 1,
                reason,
            )
        end = chunk.end
        await asyncio.wrap_future(spool.write(lambda c: write_mark(c, end)))
        self.mark = end
        self.last_progress = time.monotonic()
        metrics.receipts_pending.set(chunk.size - end)
        return True


def receipt_specs(profiles: Any) -> dict[str, ReceiptSpec]:
    """Profile id -> [receipts] of the profiles that opted in (a ProfileSet, or None)."""
    if profiles is None:
        return {}
    return {p.id: p.receipts for p in profiles.profiles() if p.receipts is not None}
