"""Fault-scenario harness: a recording publisher, an end-to-end audit, a TCP proxy
that can hang or cut ledger calls, and the figures table `make faults` prints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway._pb.edgegateway.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    transaction_pb2,
)
from gateway.edge import client
from gateway.edge.config import load_gateway_config
from gateway.formats import batchformat, merkle
from gateway.lab import demo, logaudit
from gateway.lab.sandbox import ClientFiles, GatewayProc, Ledger

ROWS: list[dict[str, object]] = []


class Publisher:
    """QoS 1 device traffic that remembers exactly which (device, seq) the broker acknowledged."""

    def __init__(
        self,
        port: int,
        name: str,
        devices: int,
        prefix: str = "dev",
        tls: ClientFiles | None = None,
    ) -> None:
        self.devices = [f"{prefix}-{i:04d}" for i in range(devices)]
        self.next_seq = dict.fromkeys(self.devices, 1)
        self.acked: set[tuple[str, int]] = set()
        self.sent = 0
        self._pending: dict[int, tuple[str, int]] = {}
        self._early: set[int] = set()
        self._lock = threading.Lock()
        self._c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, clean_session=False)
        self._c.max_inflight_messages_set(500)
        self._c.max_queued_messages_set(0)
        self._c.reconnect_delay_set(1, 2)
        self._c.on_publish = self._on_publish
        if tls is not None:
            tls.apply_paho(self._c)
        self._c.connect("127.0.0.1", port, keepalive=30)
        self._c.loop_start()

    def _on_publish(self, _c: object, _u: object, mid: int, _rc: object, _p: object) -> None:
        with self._lock:
            key = self._pending.pop(mid, None)
            if key is None:
                self._early.add(mid)  # PUBACK raced ahead of publish() returning
            else:
                self.acked.add(key)

    def publish(self, total: int, rate: float) -> None:
        """Publish `total` messages round-robin over the devices at about `rate` msg/s."""
        t0 = time.monotonic()
        for n in range(total):
            dev = self.devices[n % len(self.devices)]
            seq = self.next_seq[dev]
            self.next_seq[dev] = seq + 1
            body = json.dumps(
                {
                    "seq": seq,
                    "time": time.time_ns() // 1_000_000,
                    "kind": "meter.reading",
                    "wh": seq * 7,
                }
            ).encode()
            # Never hold our lock across paho's: its network thread calls back into us.
            info = self._c.publish(f"devices/{dev}/tx", body, qos=1)
            with self._lock:
                if info.mid in self._early:
                    self._early.discard(info.mid)
                    self.acked.add((dev, seq))
                else:
                    self._pending[info.mid] = (dev, seq)
            self.sent += 1
            ahead = (n + 1) / rate - (time.monotonic() - t0)
            if ahead > 0.005:
                time.sleep(ahead)

    def wait_acked(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return
            time.sleep(0.05)

    def close(self) -> None:
        self.wait_acked(30)
        self._c.disconnect()
        self._c.loop_stop()


@dataclass
class Audit:
    acknowledged: int
    committed: int
    lost: int
    applied_twice: int
    proofs_verified: int
    per_node: dict[str, int] = field(default_factory=dict)
    # The gateway's log: checkpoints each node cosigned, and successive pairs of them
    # shown consistent by a proof from the gateway's own tiles.
    cosigned: dict[str, int] = field(default_factory=dict)
    consistent_pairs: int = 0


def audit(
    gw: GatewayProc,
    ledgers: list[Ledger],
    acked: set[tuple[str, int]],
    quorum: int = 2,
    proof_sample: int = 200,
) -> Audit:
    """Every acknowledged (device, seq) committed at the quorum exactly once; each node's
    copy of the log reproduces the root of the latest checkpoint it cosigned (signed by
    the gateway's key), a sample of its leaves' inclusion proofs verify against that root,
    and log proofs through the gateway's API verify."""
    key = batchformat.load_public_keys(gw.public_key.read_bytes())
    holders: Counter[tuple[str, int]] = Counter()
    twice = 0
    per_node: dict[str, int] = {}
    proofs = 0
    rng = random.Random(7)
    for lg in ledgers:
        if not lg.proc.alive():
            continue
        size, leaves = demo.ledger_log(lg, gw.public_key, gw.gateway_id)
        assert size == len(leaves), f"{lg.node_id}: {len(leaves)} leaves, verified {size}"
        # Every perfect subtree hashed once: the root and each sampled proof cost
        # O(log n) from here, not O(n) each.
        tree = merkle.subtree_hashes([merkle.leaf_hash(x) for x in leaves])
        root = merkle.root_from_provider(len(leaves), tree)
        seen: Counter[tuple[str, int]] = Counter()
        for leaf in leaves:
            tx = transaction_pb2.Transaction.FromString(leaf)
            seen[(tx.device_id, tx.device_seq)] += 1
        for i in rng.sample(range(len(leaves)), min(proof_sample, len(leaves))):
            proof = merkle.inclusion_proof_from_provider(i, len(leaves), tree)
            assert merkle.verify_inclusion(leaves[i], i, len(leaves), proof, root)
            proofs += 1
        twice += sum(c - 1 for c in seen.values() if c > 1)
        per_node[lg.node_id] = len(seen)
        holders.update(seen.keys())
    committed = {k for k, c in holders.items() if c >= quorum}
    lost = len(acked - committed)
    with gw.channel("admin") as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        conn_ids = _sample_tx_ids(gw, proof_sample)
        for tx_id in conn_ids:
            resp = stub.GetTransaction(gateway_pb2.GetTransactionRequest(tx_id=tx_id), timeout=10)
            client.verify_log_proof(resp, key, client.LogTrust())
    cosigned, pairs = audit_log(gw, ledgers)
    return Audit(
        acknowledged=len(acked),
        committed=len(acked & committed),
        lost=lost,
        applied_twice=twice,
        proofs_verified=proofs,
        per_node=per_node,
        cosigned=cosigned,
        consistent_pairs=pairs,
    )


def audit_log(gw: GatewayProc, ledgers: list[Ledger]) -> tuple[dict[str, int], int]:
    """The gateway's log from its spool (every checkpoint signed, each batch's leaves
    giving its root, successive checkpoints consistent) and every node's cosigned
    checkpoints (signed, cosigned, successive ones consistent, one root per size
    everywhere); a node that is down is read from its database file."""
    origin = load_gateway_config(gw.config).log_origin
    pem = gw.public_key.read_bytes()
    own = logaudit.audit_spool(gw.spool, origin, pem)
    assert own.ok, f"the gateway's log: {own.errors}"
    audits = [
        logaudit.audit_witness(lg.node_id, lg.db, origin, pem, lg.witness_vkey, gw.spool)
        for lg in ledgers
    ]
    errors = [e for a in audits for e in a.errors] + logaudit.same_roots(audits, gw.spool)
    assert not errors, f"cosigned checkpoints: {errors}"
    return {a.node_id: a.cosigned for a in audits}, sum(a.consistent_pairs for a in audits)


def _sample_tx_ids(gw: GatewayProc, n: int) -> list[str]:
    import sqlite3

    conn = sqlite3.connect(f"file:{gw.spool}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT tx_id FROM tx WHERE rowid <= (SELECT coalesce(max(last_rowid), 0) FROM batch)"
        ).fetchall()
    finally:
        conn.close()
    return [r[0].hex() for r in random.Random(3).sample(rows, min(n, len(rows)))]


def status(gw: GatewayProc) -> gateway_pb2.GatewayStatus:
    with gw.channel("reader") as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        st: gateway_pb2.GatewayStatus = stub.GetStatus(gateway_pb2.GetStatusRequest(), timeout=10)
        return st


def wait_committed(
    gw: GatewayProc,
    ledgers: list[Ledger],
    acked: set[tuple[str, int]],
    timeout: float,
    quorum: int = 2,
) -> float:
    """Wait until the gateway has committed everything it stored; returns seconds waited."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        try:
            st = status(gw)
        except grpc.RpcError:
            time.sleep(0.2)
            continue
        if (
            st.transactions_stored >= len(acked)
            and st.spool_depth == 0
            and st.last_committed_seq == st.last_signed_seq
        ):
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"not drained within {timeout} s: {status(gw)}")


def wait_all_nodes(
    gw: GatewayProc, ledgers: list[Ledger], acked: set[tuple[str, int]], timeout: float = 60
) -> None:
    """Until every live ledger node holds every acknowledged transaction (beyond quorum)."""
    deadline = time.monotonic() + timeout
    while True:
        per_node = audit(gw, ledgers, acked, proof_sample=0).per_node
        if all(v >= len(acked) for v in per_node.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"ledger nodes did not catch up: {per_node}")
        time.sleep(0.5)


def record(scenario: str, a: Audit, recovery_s: float) -> None:
    ROWS.append(
        {
            "scenario": scenario,
            "acknowledged": a.acknowledged,
            "committed": a.committed,
            "lost": a.lost,
            "applied_twice": a.applied_twice,
            "cosigned_pairs_consistent": a.consistent_pairs,
            "recovery_s": round(recovery_s, 1),
        }
    )
    assert a.lost == 0, f"{scenario}: {a.lost} acknowledged transactions lost"
    assert a.applied_twice == 0, f"{scenario}: {a.applied_twice} applied twice"
    assert a.committed == a.acknowledged


class Proxy:
    """A TCP proxy in front of a ledger node: pass, hang (accept, never answer) or cut
    (close each connection after `cut_after` bytes from the client)."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.mode = "pass"
        self.cut_after = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)

    def set_mode(self, mode: str, cut_after: int = 0) -> None:
        self.mode, self.cut_after = mode, cut_after
        asyncio.run_coroutine_threadsafe(self._drop_all(), self._loop).result(10)

    async def _drop_all(self) -> None:
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.mode == "hang":
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
            writer.close()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.add(uw)
        budget = [self.cut_after if self.mode == "cut" else -1]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limited: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    if limited and budget[0] >= 0:
                        if len(data) >= budget[0]:
                            dst.write(data[: budget[0]])
                            break
                        budget[0] -= len(data)
                    dst.write(data)
                    await dst.drain()
            dst.close()
            writer.close()
            uw.close()

        await asyncio.gather(pump(reader, uw, True), pump(ur, writer, False))

    def stop(self) -> None:
        async def close() -> None:
            await self._drop_all()
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def table() -> str:
    cols = [
        "scenario",
        "acknowledged",
        "committed",
        "lost",
        "applied_twice",
        "cosigned_pairs_consistent",
        "recovery_s",
    ]
    width = {c: max(len(c), *(len(str(r[c])) for r in ROWS)) for c in cols} if ROWS else {}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in ROWS]
    return "\n".join(lines)


def write_table(path: Path) -> None:
    path.write_text(table() + "\n")
