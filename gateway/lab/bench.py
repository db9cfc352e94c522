"""`make bench`: the pipeline's figures on this machine, on real components, rerunnable.

Mosquitto, a SoftHSM2 token, three reference ledger nodes (quorum 2) and the
gateway as its own process, all on 127.0.0.1 (gateway.lab.sandbox), fed by the
publisher processes of gateway.lab.loadgen. In one run, with the same generator and
payloads:

1. the generator's own ceiling (as fast as it can, a bare consumer draining);
2. the bare consumer: a paho QoS 1 subscriber that only counts (Python MQTT intake),
   the denominator of the ratio; beside it, in the main run, the limits: the fastest
   Python consumer (a bulk parser on a plain socket) and a C client (mosquitto_sub),
   each delivered msg/s and CPU per message;
3. the gateway end to end: committed transactions/s while the generator keeps it
   saturated (credit: a bounded backlog ahead of what is committed at the quorum),
   then publish-to-commit latency at 80 % of that rate (a backlog at saturation
   would only measure queueing), CPU per 1,000 transactions, peak RSS,
   signatures/s; then overload: devices that outrun it (the broker always holds a
   backlog), to see whether commits keep pace with intake; the gateway's CPU per
   transaction by process (intake, main) and, in a window of its own with a sampling
   profiler (py-spy) attached, by stage (MQTT client, decode, spool, batch and sign,
   forward, ...);
4. the same at other device counts and payload sizes;
5. a spool of 1,000,000 transactions built with the gateway's own Spool, Batcher
   and Signer, then served by the gateway process: RSS and GetTransaction with
   proof latency.

It prints a table and, last, one JSON line with every figure. Figures are not
pass/fail: the table marks the issue's targets, nothing asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc, transaction_pb2
from gateway.common.errors import GatewayError
from gateway.lab import cpustages, loadgen
from gateway.lab.demo import percentile
from gateway.lab.sandbox import Hsm, Ledger, Proc, Sandbox, free_port

QUORUM = 2
NODES = 3
# Credit: how far the generator may run ahead of what the consumer has taken
# (bare consumer) or of what the gateway has committed at the quorum (end to end).
CREDIT_WINDOW = 4000
LATENCY_LOAD = 0.8  # latency is measured at this fraction of the saturated rate
DRAIN_TIMEOUT_S = 180.0
CATCH_UP_TIMEOUT_S = 300.0
SEQ_STRIDE = 100_000_000  # device seqs of each phase start this far apart
OTHER_LOAD_WARN = 0.15  # cores used by processes outside the bench that make figures suspect


@dataclass
class Options:
    seconds: float = 30.0
    warmup: float = 5.0
    latency_seconds: float = 15.0
    overload_seconds: float = 15.0
    devices: int = 1000
    payload_bytes: int = 120
    processes: int = 2
    ceiling_seconds: float = 6.0
    bare_seconds: float = 12.0
    scale_devices: tuple[int, ...] = (10, 10_000)
    scale_payloads: tuple[int, ...] = (1024, 4096)
    scale_seconds: float = 10.0
    spool_tx: int = 1_000_000
    lookups: int = 2000
    batch_max_tx: int = 500
    batch_max_age_s: float = 1.0
    intake_processes: int = 1
    workdir: Path | None = None
    keep: bool = False
    profile: Path | None = None
    profile_gil: bool = False
    quick: bool = False
    tls: bool = False
    limits: tuple[str, ...] = ("bulk", "mosquitto_sub")
    limit_seconds: float = 10.0
    stage_seconds: float = 10.0


@dataclass
class Bare:
    devices: int
    payload_bytes: int
    msg_per_s: float
    cpu_s_per_1k: float
    other_cpu_share: float
    consumer: str = "paho"
    broker_cpu_share: float = 0.0
    note: str = ""
    rss_peak_mb: float = 0.0

    @property
    def cpu_us_per_msg(self) -> float:
        return self.cpu_s_per_1k * 1000


@dataclass
class EndToEnd:
    gateway_id: str
    devices: int
    payload_bytes: int
    seconds: float
    tx_per_s: float
    stored_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    latency_rate: float
    latency_samples: int
    saturated_p50_ms: float
    saturated_p99_ms: float
    cpu_s_per_1k: float
    rss_peak_mb: float
    signatures_per_s: float
    batches: int
    signatures: int
    transactions: int
    gateway_cpu_share: float  # cores busy on average during the window
    broker_cpu_share: float
    generator_cpu_share: float
    ledgers_cpu_share: float
    other_cpu_share: float  # processes this bench did not start (other users of the machine)
    spool_tx: int
    get_tx_p50_ms: float
    get_tx_p99_ms: float
    overload_stored_per_s: float
    overload_committed_per_s: float
    overload_depth: int
    overload_other_cpu_share: float
    # CPU µs per committed transaction by gateway process ("intake", "main", "other"
    # children) in the saturated window, and by process and stage in the stage window.
    cpu_us_by_process: dict[str, float] = field(default_factory=dict)
    cpu_us_by_stage: dict[str, dict[str, float]] = field(default_factory=dict)
    stage_note: str = ""
    errors: list[str] = field(default_factory=list)
    # The latency window's legs (SpoolProbe.latency_legs): leg -> (p50, p99) ms.
    latency_legs_ms: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class BigSpool:
    transactions: int
    batches: int
    build_s: float
    spool_mb: float
    ready_s: float
    catch_up_s: float
    rss_mb: float
    rss_peak_mb: float
    get_tx_p50_ms: float
    get_tx_p99_ms: float
    lookups: int


@dataclass(frozen=True, slots=True)
class Mark:
    t: float
    stored: int
    committed: int
    batches: int
    cpu: float
    broker_cpu: float
    generator_cpu: float
    ledger_cpu: float
    machine_cpu: float  # busy CPU seconds of the whole machine
    bench_cpu: float  # this controller process
    roles: dict[str, float] = field(default_factory=dict)  # gateway CPU by process


def machine_busy() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def credit_window(history: list[tuple[float, int]]) -> int:
    """How far the generator may run ahead of what is committed: CREDIT_WINDOW, or one
    second of the recent commit rate if more, so that the window never caps throughput
    (Little: in flight = rate x latency) while a backlog never grows without bound."""
    now, last = history[-1]
    for t, n in reversed(history):
        if now - t >= 2.0:
            return max(CREDIT_WINDOW, int((last - n) / (now - t)))
    return CREDIT_WINDOW


def other_share(a: Mark, b: Mark) -> float:
    """Cores busy with processes that are not part of the bench, on average."""
    ours = (
        (b.cpu - a.cpu)
        + (b.broker_cpu - a.broker_cpu)
        + (b.generator_cpu - a.generator_cpu)
        + (b.ledger_cpu - a.ledger_cpu)
        + (b.bench_cpu - a.bench_cpu)
    )
    return max(0.0, (b.machine_cpu - a.machine_cpu) - ours) / (b.t - a.t)


def say(text: str) -> None:
    print(text, flush=True)


# ---- watching processes and the spool --------------------------------------------


class Watch:
    """CPU seconds and peak RSS of one process and its children (the gateway's intake
    process), sampled on a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self.rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"watch-{pid}")
        self._interval = interval
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                rss = self.proc.memory_info().rss
                for child in self.proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        rss += child.memory_info().rss
                self.rss = rss
                self.peak_rss = max(self.peak_rss, self.rss)
            self._stop.wait(self._interval)

    def cpu(self) -> float:
        """CPU seconds of the process and of its children, living or reaped."""
        try:
            t = self.proc.cpu_times()
            children = self.proc.children(recursive=True)
        except psutil.Error:
            return 0.0
        total = t.user + t.system + t.children_user + t.children_system
        for child in children:
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return float(total)

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds by process: "main" (the gateway's own process), "intake" (its intake
        processes) and "other" (any other child, living or reaped)."""
        out = {"main": 0.0, "intake": 0.0, "other": 0.0}
        try:
            t = self.proc.cpu_times()
            children = self.proc.children(recursive=True)
        except psutil.Error:
            return out
        out["main"] = t.user + t.system
        out["other"] = t.children_user + t.children_system
        for child in children:
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                out[process_role(child)] += c.user + c.system
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


INTAKE_PROCESS_NAME = "edge-gw-intake"


def process_role(proc: psutil.Process) -> str:
    """A gateway child's role: its intake processes (named so by PR_SET_NAME), or other."""
    try:
        return "intake" if proc.name() == INTAKE_PROCESS_NAME else "other"
    except psutil.Error:
        return "other"


def cpu_of(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


class SpoolProbe:
    """Reads the gateway's spool (read-only, WAL) with O(log n) queries only."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)

    def stored(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(rowid), 0) FROM tx").fetchone()[0])

    def committed(self) -> int:
        """Transactions in batches that reached the quorum (rowids are contiguous): those up
        to the largest checkpoint the quorum cosigned."""
        row = self.conn.execute(
            "SELECT last_rowid FROM log_checkpoint WHERE committed_ms IS NOT NULL"
            " ORDER BY size DESC LIMIT 1"
        ).fetchone()
        return 0 if row is None else int(row[0])

    def batches(self) -> int:
        row = self.conn.execute("SELECT max(seq) FROM batch").fetchone()
        return 0 if row is None or row[0] is None else int(row[0]) + 1

    def _committed_txs(
        self, lo_rowid: int, hi_rowid: int, from_ms: int, to_ms: int
    ) -> Iterator[tuple[Any, int, int]]:
        """(transaction, its checkpoint's created_ms, committed_ms) of the committed txs
        in (lo, hi] published (device clock) in [from_ms, to_ms)."""
        batches = self.conn.execute(
            "SELECT first_rowid, last_rowid, created_ms, committed_ms FROM batch"
            " WHERE committed_ms IS NOT NULL AND last_rowid > ? AND first_rowid <= ?",
            (lo_rowid, hi_rowid),
        ).fetchall()
        parse = transaction_pb2.Transaction.FromString
        for first, last, created_ms, committed_ms in batches:
            for (leaf,) in self.conn.execute(
                "SELECT leaf FROM tx WHERE rowid BETWEEN ? AND ?",
                (max(first, lo_rowid + 1), min(last, hi_rowid)),
            ):
                tx = parse(leaf)
                if from_ms <= tx.device_time_ms < to_ms:
                    yield tx, created_ms, committed_ms

    def latencies(
        self, lo_rowid: int, hi_rowid: int, from_ms: int, to_ms: int = 2**62
    ) -> list[float]:
        """committed_ms - device time of committed txs in (lo, hi] published in
        [from_ms, to_ms)."""
        return [
            float(committed - tx.device_time_ms)
            for tx, _created, committed in self._committed_txs(lo_rowid, hi_rowid, from_ms, to_ms)
        ]

    def latency_legs(
        self, lo_rowid: int, hi_rowid: int, from_ms: int, to_ms: int
    ) -> dict[str, list[float]]:
        """The legs of `latencies` for the same transactions, ms: device clock to the
        gateway's receipt (broker, socket, intake's queue), receipt to its batch's signed
        checkpoint (spool, batcher, HSM), checkpoint to the quorum (ledger nodes)."""
        legs: dict[str, list[float]] = {"receipt": [], "checkpoint": [], "quorum": []}
        for tx, created, committed in self._committed_txs(lo_rowid, hi_rowid, from_ms, to_ms):
            legs["receipt"].append(float(tx.received_time_ms - tx.device_time_ms))
            legs["checkpoint"].append(float(created - tx.received_time_ms))
            legs["quorum"].append(float(committed - created))
        return legs

    def sample_tx_ids(self, n: int, seed: int = 7) -> list[str]:
        hi = self.committed()
        if hi == 0:
            return []
        rng = random.Random(seed)
        rowids = [rng.randint(1, hi) for _ in range(n)]
        ids: list[str] = []
        for r in rowids:
            row = self.conn.execute("SELECT tx_id FROM tx WHERE rowid = ?", (r,)).fetchone()
            if row is not None:
                ids.append(bytes(row[0]).hex())
        return ids

    def close(self) -> None:
        self.conn.close()


def get_tx_latencies(channel: grpc.Channel, tx_ids: Sequence[str]) -> list[float]:
    """GetTransaction (with its tlog-proof bundle: inclusion proof, cosigned checkpoint)
    round trips, ms."""
    out: list[float] = []
    with channel as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        for tx_id in tx_ids[:20]:  # connection and caches warm
            stub.GetTransaction(gateway_pb2.GetTransactionRequest(tx_id=tx_id), timeout=10)
        for tx_id in tx_ids:
            t0 = time.perf_counter()
            resp = stub.GetTransaction(gateway_pb2.GetTransactionRequest(tx_id=tx_id), timeout=10)
            out.append((time.perf_counter() - t0) * 1000)
            if not resp.tlog_proof:
                raise GatewayError(f"GetTransaction {tx_id} answered without a proof")
    return out


def scrape_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


@contextlib.contextmanager
def py_spy(pid: int, seconds: float, out: Path | None, gil: bool = False) -> Iterator[None]:
    """Sample the gateway with py-spy while the block runs, if asked and installed."""
    if out is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(exe, os.X_OK):
        say("  (py-spy not found: pip install py-spy to profile; continuing without)")
        yield
        return
    argv = [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "100"]
    argv += ["--threads", "--subprocesses", "--format", "raw", "-o", str(out)]
    argv += ["--gil"] if gil else []
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            p.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)
            p.wait(10)
        say(f"  py-spy profile of the gateway written to {out}")


# ---- the deployment -----------------------------------------------------------------


@dataclass
class GatewaySlot:
    gateway_id: str
    config: Path
    pem: Path
    metrics_port: int


class Bench:
    def __init__(self, opts: Options, root: Path) -> None:
        self.opts = opts
        self.root = root
        # The loadgen publishers and the bare consumer speak plain MQTT.
        self.sb = Sandbox(root, tls=opts.tls)
        self.hsm: Hsm | None = None
        self.broker: Proc | None = None
        self.ledgers: list[Ledger] = []
        self.slots: dict[str, GatewaySlot] = {}
        self.gen = loadgen.LoadGenerator(opts.processes)
        self.phase = 0
        self.current: Proc | None = None  # the gateway under test

    @property
    def port(self) -> int:
        assert self.broker is not None
        return self.broker.port

    def tls(self, role: str) -> loadgen.Tls | None:
        """The broker's TLS files for an MQTT client of `role`; None in plain-text mode."""
        files = self.sb.mqtt_tls(role)
        if files is None:
            return None
        return loadgen.Tls(
            str(files.ca_file),
            str(files.cert_file) if files.cert_file else None,
            str(files.key_file) if files.key_file else None,
        )

    def next_seq(self) -> int:
        self.phase += 1
        return 1_000_000_000 + self.phase * SEQ_STRIDE

    def _job(
        self,
        name: str,
        devices: int,
        payload_bytes: int,
        seconds: float,
        mode: str = loadgen.MODE_CREDIT,
        rate: float = 0.0,
    ) -> loadgen.Job:
        """The next phase's load on the device listener, its seqs clear of every earlier
        phase's and its run named `name`-phase."""
        start_seq = self.next_seq()
        return loadgen.Job(
            port=self.port,
            devices=devices,
            payload_bytes=payload_bytes,
            seconds=seconds,
            start_seq=start_seq,
            mode=mode,
            rate=rate,
            run_id=f"{name}-{self.phase}",
            tls=self.tls("device"),
        )

    def setup(self, gateway_ids: Sequence[str]) -> None:
        """One token, one broker, three ledger nodes knowing every gateway's key."""
        self.hsm = self.sb.hsm()
        self.broker = self.sb.mosquitto()
        ports = [free_port() for _ in range(NODES)]
        names = [f"ledger-{i + 1}" for i in range(NODES)]
        nodes = [(n, f"127.0.0.1:{p}") for n, p in zip(names, ports, strict=True)]
        batch = f"max_tx = {self.opts.batch_max_tx}\nmax_age_s = {self.opts.batch_max_age_s}"
        for gid in gateway_ids:
            cfg = self.sb.gateway_config(
                gid,
                self.hsm,
                self.port,
                nodes,
                quorum=QUORUM,
                batch=batch,
                intake_processes=self.opts.intake_processes,
            )
            pem = self.root / f"{gid}.pem"
            self.sb.hsm_init(cfg, pem)
            data = tomllib.loads(cfg.read_text())
            mport = int(data["metrics"]["listen"].rpartition(":")[2])
            self.slots[gid] = GatewaySlot(gid, cfg, pem, mport)
        keys = {gid: s.pem for gid, s in self.slots.items()}
        self.ledgers = [self.sb.ledger(n, keys, port=p) for n, p in zip(names, ports, strict=True)]
        self.gen.start()

    def close(self) -> None:
        self.gen.close()
        self.sb.close()

    # ---- phases -----------------------------------------------------------------

    def ceiling(self) -> float:
        """The generator as fast as it can go, a bare consumer draining: its own limit."""
        o = self.opts
        consumer = loadgen.BareConsumer(self.port, self.tls("device"))
        consumer.start()
        try:
            job = self._job(
                "ceiling", o.devices, o.payload_bytes, o.ceiling_seconds, loadgen.MODE_MAX
            )
            t0 = self.gen.begin(job)
            warm = min(1.0, o.ceiling_seconds / 3)
            self._sleep_until(t0 + warm)
            a0, m0 = self.gen.acknowledged(), time.monotonic()
            self._sleep_until(t0 + o.ceiling_seconds - 0.1)
            a1, m1 = self.gen.acknowledged(), time.monotonic()
            res = self.gen.wait(60)
            if res.errors:
                say(f"  generator: {'; '.join(res.errors)}")
            return (a1 - a0) / (m1 - m0)
        finally:
            consumer.close()

    def bare(self, devices: int, payload_bytes: int, seconds: float, kind: str = "paho") -> Bare:
        """A consumer that only counts ("paho", "bulk" or "mosquitto_sub", see
        gateway.lab.loadgen), saturated by credit like the gateway: delivered msg/s and its CPU
        per message."""
        consumer = loadgen.make_consumer(kind, self.port, self.tls("device"))
        consumer.start()
        try:
            watch = Watch(consumer.pid)
            warm = min(3.0, seconds / 4)
            job = self._job("bare", devices, payload_bytes, seconds + warm)
            t0 = self.gen.begin(job)
            assert self.broker is not None and self.broker.proc is not None
            broker = [self.broker.proc.pid]
            ours = [consumer.pid, *broker, *self.gen.pids, os.getpid()]

            def look() -> tuple[float, int, float, float, float, float]:
                now, n = time.monotonic(), consumer.count()
                return now, n, watch.cpu(), cpu_of(ours), machine_busy(), cpu_of(broker)

            mark: tuple[float, int, float, float, float, float] | None = None
            while time.monotonic() < t0 + seconds + warm - 0.05:
                self.gen.set_credit(consumer.count() + CREDIT_WINDOW)
                if mark is None and time.monotonic() >= t0 + warm:
                    mark = look()
                time.sleep(0.01)
            end = look()
            res = self.gen.wait(60)
            watch.close()
            assert mark is not None
            # Everything published is delivered once the generator has its PUBACKs and the
            # consumer has caught up: a check of counting that is not exact (mosquitto_sub).
            final = consumer.count()
            settle = time.monotonic() + 10
            while final < res.published and time.monotonic() < settle:
                time.sleep(0.05)
                final = consumer.count()
            scale, note = 1.0, ""
            if isinstance(consumer, loadgen.MosquittoSubConsumer):
                if final and final != res.published:
                    scale = res.published / final
                    note = (
                        f"counted {final:,} of {res.published:,} messages by write calls "
                        f"({consumer.writes() / res.published:.3f} per message); rescaled"
                    )
            elif final < res.published:
                note = f"{res.published - final:,} published messages not delivered in 10 s"
            span = end[0] - mark[0]
            count = (end[1] - mark[1]) * scale
            rate = count / span
            cpu = (end[2] - mark[2]) / count * 1000 if count else 0.0
            other = max(0.0, (end[4] - mark[4]) - (end[3] - mark[3])) / span
            return Bare(
                devices,
                payload_bytes,
                rate,
                cpu,
                round(other, 2),
                consumer=kind,
                broker_cpu_share=round((end[5] - mark[5]) / span, 2),
                note=note,
                rss_peak_mb=round(watch.peak_rss / 2**20, 1),
            )
        finally:
            consumer.close()

    def end_to_end(
        self,
        gid: str,
        devices: int,
        payload_bytes: int,
        seconds: float,
        warmup: float,
        latency_seconds: float,
        profile: Path | None = None,
        overload_seconds: float = 0.0,
        stage_seconds: float = 0.0,
    ) -> EndToEnd:
        slot = self.slots[gid]
        gw = self.sb.gateway(gid, slot.config, slot.pem)
        self.current = gw.proc
        errors: list[str] = []
        assert gw.proc.proc is not None and self.broker is not None
        assert self.broker.proc is not None
        watch = Watch(gw.proc.proc.pid)
        probe = SpoolProbe(gw.spool)
        try:
            # Saturation: the generator stays a window ahead of what is committed.
            job = self._job("e2e", devices, payload_bytes, warmup + seconds)
            t0 = self.gen.begin(job)
            mark: Mark | None = None
            next_print = t0 + 5
            history: list[tuple[float, int]] = []
            base = probe.stored()
            with py_spy(gw.proc.proc.pid, seconds, profile, self.opts.profile_gil):
                while time.monotonic() < t0 + warmup + seconds - 0.05:
                    self._check()
                    stored, committed = probe.stored(), probe.committed()
                    now = time.monotonic()
                    history.append((now, committed))
                    if len(history) > 1000:
                        del history[:500]
                    self.gen.set_credit(committed - base + credit_window(history))
                    if mark is None and now >= t0 + warmup:
                        mark = self._mark(probe, watch)
                    if now >= next_print:
                        say(
                            f"    t={now - t0:4.0f}s stored {stored:>8} committed "
                            f"{committed:>8} batches {probe.batches():>6} "
                            f"rss {watch.rss / 2**20:5.0f} MB"
                        )
                        next_print += 5
                    time.sleep(0.02)
                end = self._mark(probe, watch)
            assert mark is not None
            res = self.gen.wait(120)
            errors += res.errors
            sat_hi = probe.stored()
            self._drain(probe, base + res.published, errors)
            span = end.t - mark.t
            committed = end.committed - mark.committed
            tx_per_s = committed / span
            stored_per_s = (end.stored - mark.stored) / span
            cpu_1k = (end.cpu - mark.cpu) / committed * 1000 if committed else 0.0
            sig_per_s = (end.batches - mark.batches) / span
            sat_lat = probe.latencies(mark.committed, sat_hi, 0)
            by_process = {
                role: round((end.roles[role] - mark.roles.get(role, 0.0)) / committed * 1e6, 1)
                for role in end.roles
                if committed
            }
            stages, stage_note = self._stages(gw.proc, probe, devices, payload_bytes, stage_seconds)

            # Latency: a fixed rate below saturation, so no backlog builds up.
            rate = max(50.0, LATENCY_LOAD * tx_per_s)
            lo = probe.stored()
            job = self._job("lat", devices, payload_bytes, latency_seconds, loadgen.MODE_RATE, rate)
            t1 = self.gen.begin(job)
            # Steady state only: after a second of ramp, and not the last batch, which
            # waits for max_age once the load stops (it would pose as the p99 of a short run).
            wall_t1 = time.time_ns() // 1_000_000 + int((t1 - time.monotonic()) * 1000)
            wall_from = wall_t1 + 1000
            wall_to = wall_t1 + int((latency_seconds - self.opts.batch_max_age_s - 0.25) * 1000)
            while time.monotonic() < t1 + latency_seconds:
                self._check()
                time.sleep(0.1)
            res = self.gen.wait(120)
            errors += res.errors
            self._drain(probe, lo + res.published, errors)
            hi, wall_end = probe.stored(), max(wall_from + 1000, wall_to)
            lat = probe.latencies(lo, hi, wall_from, wall_end)
            legs = {
                leg: (round(percentile(v, 0.50), 1), round(percentile(v, 0.99), 1))
                for leg, v in probe.latency_legs(lo, hi, wall_from, wall_end).items()
            }
            over = self._overload(probe, watch, devices, payload_bytes, overload_seconds, errors)

            spool_tx = probe.stored()
            ids = probe.sample_tx_ids(min(500, self.opts.lookups))
            gt = get_tx_latencies(gw.channel(), ids) if ids else []
            m = scrape_metrics(slot.metrics_port)
            e = EndToEnd(
                gateway_id=gid,
                devices=devices,
                payload_bytes=payload_bytes,
                seconds=round(span, 1),
                tx_per_s=round(tx_per_s, 1),
                stored_per_s=round(stored_per_s, 1),
                p50_ms=round(percentile(lat, 0.50), 1),
                p95_ms=round(percentile(lat, 0.95), 1),
                p99_ms=round(percentile(lat, 0.99), 1),
                latency_rate=round(rate, 1),
                latency_samples=len(lat),
                saturated_p50_ms=round(percentile(sat_lat, 0.50), 1),
                saturated_p99_ms=round(percentile(sat_lat, 0.99), 1),
                cpu_s_per_1k=round(cpu_1k, 3),
                rss_peak_mb=round(watch.peak_rss / 2**20, 1),
                signatures_per_s=round(sig_per_s, 2),
                batches=int(m.get("edge_gateway_batches_signed_total", 0)),
                signatures=int(m.get("edge_gateway_hsm_signatures_total", 0)),
                transactions=spool_tx,
                gateway_cpu_share=round((end.cpu - mark.cpu) / span, 2),
                broker_cpu_share=round((end.broker_cpu - mark.broker_cpu) / span, 2),
                generator_cpu_share=round((end.generator_cpu - mark.generator_cpu) / span, 2),
                ledgers_cpu_share=round((end.ledger_cpu - mark.ledger_cpu) / span, 2),
                other_cpu_share=round(other_share(mark, end), 2),
                spool_tx=spool_tx,
                get_tx_p50_ms=round(percentile(gt, 0.50), 2),
                get_tx_p99_ms=round(percentile(gt, 0.99), 2),
                overload_stored_per_s=round(over[0], 1),
                overload_committed_per_s=round(over[1], 1),
                overload_depth=over[2],
                overload_other_cpu_share=round(over[3], 2),
                cpu_us_by_process=by_process,
                cpu_us_by_stage=stages,
                stage_note=stage_note,
                errors=errors,
                latency_legs_ms=legs,
            )
            return e
        finally:
            probe.close()
            watch.close()
            self.current = None
            code = gw.proc.terminate(60)
            if code != 0:
                errors.append(f"gateway {gid} exited with {code} on SIGTERM")
            loadgen.clear_session(self.port, gid, self.tls("gateway"))

    def _mark(self, probe: SpoolProbe, watch: Watch) -> Mark:
        assert self.broker is not None and self.broker.proc is not None
        return Mark(
            t=time.monotonic(),
            stored=probe.stored(),
            committed=probe.committed(),
            batches=probe.batches(),
            cpu=watch.cpu(),
            broker_cpu=cpu_of([self.broker.proc.pid]),
            generator_cpu=cpu_of(self.gen.pids),
            ledger_cpu=cpu_of([lg.proc.proc.pid for lg in self.ledgers if lg.proc.proc]),
            machine_cpu=machine_busy(),
            bench_cpu=cpu_of([os.getpid()]),
            roles=watch.cpu_by_role(),
        )

    def _stages(
        self, gw: Proc, probe: SpoolProbe, devices: int, payload_bytes: int, seconds: float
    ) -> tuple[dict[str, dict[str, float]], str]:
        """A saturated window of its own with a sampling profiler attached (it costs some
        CPU, so the main window runs without it): CPU µs per committed transaction by
        gateway process and stage (gateway.lab.cpustages)."""
        if seconds <= 0:
            return {}, ""
        if cpustages.py_spy_path() is None:
            return {}, "py-spy not installed (pip install py-spy): no stage figures"
        assert gw.proc is not None
        root = psutil.Process(gw.proc.pid)
        roles = {gw.proc.pid: "main"}
        with contextlib.suppress(psutil.Error):
            for child in root.children(recursive=True):
                roles[child.pid] = process_role(child)
        warm = 2.0
        job = self._job("stages", devices, payload_bytes, warm + seconds)
        base = probe.stored()
        history: list[tuple[float, int]] = []
        sampler = cpustages.StageSampler(gw.proc.pid, roles, self.root / f"stages-{gw.name}.txt")
        t0 = self.gen.begin(job)
        c0 = c1 = 0
        errors: list[str] = []
        try:
            started = False
            while time.monotonic() < t0 + warm + seconds - 0.05:
                self._check()
                committed = probe.committed()
                history.append((time.monotonic(), committed))
                if len(history) > 1000:
                    del history[:500]
                self.gen.set_credit(committed - base + credit_window(history))
                if not started and time.monotonic() >= t0 + warm:
                    sampler.start(seconds)
                    c0, started = committed, True
                time.sleep(0.02)
            c1 = probe.committed()
            prof = sampler.stop()
        finally:
            sampler.close()
        res = self.gen.wait(120)
        self._drain(probe, base + res.published, errors)
        note = "; ".join([prof.note, *res.errors, *errors]).strip("; ")
        return prof.per_tx_us(c1 - c0), note

    def _overload(
        self,
        probe: SpoolProbe,
        watch: Watch,
        devices: int,
        payload_bytes: int,
        seconds: float,
        errors: list[str],
    ) -> tuple[float, float, int, float]:
        """Devices that outrun the gateway: the broker always holds a backlog for it, as
        when devices publish faster than it commits. Returns intake/s, committed/s, the
        spool depth (stored, not committed) at the end and the other processes' share."""
        if seconds <= 0:
            return 0.0, 0.0, 0, 0.0
        warm = 2.0
        job = self._job("over", devices, payload_bytes, seconds + warm)
        before = probe.stored()
        t0 = self.gen.begin(job)
        mark: Mark | None = None
        while time.monotonic() < t0 + seconds + warm - 0.05:
            self._check()
            self.gen.set_credit(probe.stored() - before + CREDIT_WINDOW)
            if mark is None and time.monotonic() >= t0 + warm:
                mark = self._mark(probe, watch)
            time.sleep(0.02)
        end = self._mark(probe, watch)
        assert mark is not None
        res = self.gen.wait(120)
        errors += res.errors
        self._drain(probe, before + res.published, errors)
        span = end.t - mark.t
        return (
            (end.stored - mark.stored) / span,
            (end.committed - mark.committed) / span,
            end.stored - end.committed,
            other_share(mark, end),
        )

    def _drain(self, probe: SpoolProbe, stored_at_least: int, errors: list[str]) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check()
            stored = probe.stored()
            if stored >= stored_at_least and probe.committed() >= stored:
                return
            time.sleep(0.1)
        errors.append(
            f"not drained in {DRAIN_TIMEOUT_S:.0f} s: stored {probe.stored()} of "
            f"{stored_at_least}, committed {probe.committed()}"
        )

    def _check(self) -> None:
        p = self.current
        if p is not None and not p.alive():
            code = p.proc.returncode if p.proc else "?"
            raise GatewayError(
                f"the gateway {p.name} exited with code {code} under load:\n" + p.log_text()[-2000:]
            )

    @staticmethod
    def _sleep_until(t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    # ---- a big spool ----------------------------------------------------------------

    def big_spool(self, gid: str, transactions: int, devices: int, lookups: int) -> BigSpool:
        """Fill a spool with the gateway's own classes, then serve it from the gateway."""
        slot = self.slots[gid]
        t0 = time.monotonic()
        sample = build_spool(slot.config, transactions, devices, self.opts.payload_bytes, lookups)
        build_s = time.monotonic() - t0
        spool_path = slot.config.parent / "spool.db"
        spool_mb = (
            sum(p.stat().st_size for p in spool_path.parent.glob("spool.db*") if p.is_file())
            / 2**20
        )
        say(f"    built {transactions:,} tx in {build_s:.0f} s ({spool_mb:.0f} MB on disk)")
        t1 = time.monotonic()
        gw = self.sb.gateway(gid, slot.config, slot.pem, ready_timeout=CATCH_UP_TIMEOUT_S)
        self.current = gw.proc
        ready_s = time.monotonic() - t1
        assert gw.proc.proc is not None
        watch = Watch(gw.proc.proc.pid)
        probe = SpoolProbe(gw.spool)
        try:
            say(f"    gateway ready on it in {ready_s:.1f} s; forwarding to the ledger nodes")
            t2 = time.monotonic()
            stored = probe.stored()
            next_print = t2 + 10
            while probe.committed() < stored and time.monotonic() - t2 < CATCH_UP_TIMEOUT_S:
                self._check()
                if time.monotonic() >= next_print:
                    say(
                        f"    catch-up: committed {probe.committed()} of {stored}, "
                        f"rss {watch.rss / 2**20:.0f} MB"
                    )
                    next_print += 10
                time.sleep(0.2)
            catch_up_s = time.monotonic() - t2
            if probe.committed() < stored:
                say(f"    not caught up after {catch_up_s:.0f} s; measuring anyway")
            batches = probe.batches()
            gt = get_tx_latencies(gw.channel(), sample)
            time.sleep(0.3)
            return BigSpool(
                transactions=stored,
                batches=batches,
                build_s=round(build_s, 1),
                spool_mb=round(spool_mb, 1),
                ready_s=round(ready_s, 1),
                catch_up_s=round(catch_up_s, 1),
                rss_mb=round(watch.rss / 2**20, 1),
                rss_peak_mb=round(watch.peak_rss / 2**20, 1),
                get_tx_p50_ms=round(percentile(gt, 0.50), 2),
                get_tx_p99_ms=round(percentile(gt, 0.99), 2),
                lookups=len(gt),
            )
        finally:
            probe.close()
            watch.close()
            self.current = None
            gw.proc.terminate(60)
            loadgen.clear_session(self.port, gid, self.tls("gateway"))

    def hsm_ceiling(self, gid: str, seconds: float) -> float:
        """Raw signatures/s on one PKCS#11 session, in a process of its own."""
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            return float(pool.apply(_hsm_ceiling, (str(self.slots[gid].config), seconds)))


def _hsm_ceiling(config: str, seconds: float) -> float:
    from gateway.edge.config import load_gateway_config
    from gateway.edge.signer import Signer, benchmark_signatures

    cfg = load_gateway_config(Path(config))
    signer = Signer(cfg.hsm, cfg.hsm.pin.read())
    signer.start()
    try:
        return benchmark_signatures(signer, seconds)
    finally:
        signer.close()


# ---- building a big spool with the gateway's own classes ------------------------------

DecodedRow = tuple[str, int, bytes, bytes, bytes, int]


def _decode_chunk(args: tuple[str, int, int, int, int, int, int]) -> list[DecodedRow]:
    """Payloads as the generator sends them, decoded by the gateway's json@1 profile."""
    from gateway.edge.profiles import JsonDecoder

    gateway_id, max_payload, first, count, devices, payload_bytes, received_ms = args
    decoder = JsonDecoder(gateway_id, max_payload)
    seq0 = 1_000_000_000
    head_len = len(loadgen.payload_head(seq0))
    rng = random.Random(first)
    tails = [loadgen.payload_tail(rng, payload_bytes, head_len) for _ in range(64)]
    out: list[DecodedRow] = []
    for i in range(first, first + count):
        dev = f"bench-{i % devices:05d}"
        payload = loadgen.build_payload(seq0 + i // devices, received_ms - 250, tails[i % 64])
        inc = decoder.decode(dev, f"devices/{dev}/tx", payload, received_ms + i // 1000, "mqtt")
        out.append(
            (
                inc.device_id,
                inc.device_seq,
                inc.payload_sha256,
                inc.tx_id,
                inc.leaf,
                inc.received_ms,
            )
        )
    return out


def build_spool(
    config: Path, transactions: int, devices: int, payload_bytes: int, lookups: int
) -> list[str]:
    """Append `transactions` through Spool.append (group commit), cut and sign them with
    Batcher and Signer exactly as the service does. Returns `lookups` random tx ids."""
    from gateway.edge.batcher import Batcher
    from gateway.edge.config import load_gateway_config
    from gateway.edge.signer import Signer
    from gateway.edge.spool import Incoming, Outcome, Spool

    cfg = load_gateway_config(config)
    spool = Spool(cfg.spool, cfg.gateway_id)
    spool.open()
    rng = random.Random(11)
    wanted = set(rng.sample(range(transactions), min(lookups, transactions)))
    sample: list[str] = []
    chunk = 5000
    now = time.time_ns() // 1_000_000
    tasks = [
        (
            cfg.gateway_id,
            cfg.mqtt.max_payload_bytes,
            first,
            min(chunk, transactions - first),
            devices,
            payload_bytes,
            now,
        )
        for first in range(0, transactions, chunk)
    ]
    ctx = mp.get_context("spawn")
    try:
        with ctx.Pool(max(1, min(2, os.cpu_count() or 1))) as pool:
            prev: list[Any] = []
            index = 0
            for rows in pool.imap(_decode_chunk, tasks):
                futs = [spool.append(Incoming(*r)) for r in rows]
                for r in rows:
                    if index in wanted:
                        sample.append(r[3].hex())
                    index += 1
                for f in prev:  # one chunk in flight behind the writer, no more
                    if f.result(120).outcome is not Outcome.STORED:
                        raise GatewayError("the big spool build met a duplicate")
                prev = futs
            for f in prev:
                f.result(120)
        signer = Signer(cfg.hsm, cfg.hsm.pin.read())
        info = signer.start()
        try:

            async def cut() -> int:
                b = Batcher(cfg.batch, spool, signer, cfg.gateway_id, info.key_id, lambda _s: None)
                await b.resume()
                return await b.flush()

            asyncio.run(cut())
        finally:
            signer.close()
    finally:
        spool.close()
    rng.shuffle(sample)
    return sample


# ---- report --------------------------------------------------------------------------


def _ratio(e2e: EndToEnd, bare: Bare) -> float:
    return round(e2e.tx_per_s / bare.msg_per_s, 3) if bare.msg_per_s else 0.0


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:g} KiB"


def mosquitto_version() -> str:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "?"
    first = out.splitlines()[0] if out else ""
    return first.rpartition(" ")[2] or "?"


CONSUMER_LABELS = {
    "paho": "paho QoS 1 (the ratio's denominator)",
    "bulk": "bulk Python parser",
    "mosquitto_sub": "mosquitto_sub (C)",
}


def report_limits(bare: Bare, limits: list[Bare], e2e: EndToEnd) -> None:
    """The consumers that only count beside the gateway, and the gateway's CPU by process
    and stage."""
    say("")
    say("limits beside the gateway (main run: same generator, broker and payloads, saturated):")
    head = f"{'consumer':<40}{'msg/s':>10}{'CPU µs/msg':>12}{'broker cores':>14}"
    say(head)
    say("-" * len(head))
    for b in [bare, *limits]:
        say(
            f"{CONSUMER_LABELS.get(b.consumer, b.consumer):<40}{b.msg_per_s:>10,.0f}"
            f"{b.cpu_us_per_msg:>12.1f}{b.broker_cpu_share:>14.2f}"
        )
        if b.note:
            say(f"  ({b.note})")
    say(
        f"{'this gateway, committed at the quorum':<40}{e2e.tx_per_s:>10,.0f}"
        f"{e2e.cpu_s_per_1k * 1000:>12.1f}{e2e.broker_cpu_share:>14.2f}"
    )
    if e2e.cpu_us_by_process:
        parts = ", ".join(f"{role} {us:.1f}" for role, us in e2e.cpu_us_by_process.items())
        say(f"  gateway CPU µs per transaction by process: {parts}")
    ratios = ", ".join(
        f"{b.consumer} {e2e.tx_per_s / b.msg_per_s:.2f}" for b in [bare, *limits] if b.msg_per_s
    )
    say(f"  gateway / consumer: {ratios}")
    if e2e.cpu_us_by_stage or e2e.stage_note:
        say("")
        say(
            "gateway CPU µs per committed transaction by process and stage (a window of "
            "its own, sampling profiler attached):"
        )
        for role, stages in e2e.cpu_us_by_stage.items():
            total = sum(stages.values())
            say(f"  {role} process: {total:.1f} µs")
            for stage, us in stages.items():
                say(f"    {stage:<40}{us:>8.1f}{us / total if total else 0:>8.0%}")
        if e2e.stage_note:
            say(f"  ({e2e.stage_note})")


def report(
    opts: Options,
    ceiling: float,
    rows: list[tuple[str, Bare, EndToEnd]],
    limits: list[Bare],
    big: BigSpool | None,
    hsm_rate: float,
    elapsed: float,
) -> dict[str, Any]:
    name, bare, e2e = rows[0]
    target_ms = opts.batch_max_age_s * 1000 + 250
    say("")
    say(
        f"edge-gateway benchmark: {os.cpu_count()} cores shared by broker, generator and "
        f"gateway; Python {platform.python_version()}, mosquitto {mosquitto_version()}"
    )
    say(
        f"batch max_tx {opts.batch_max_tx}, max_age {opts.batch_max_age_s:g} s; "
        f"{NODES} ledger nodes, quorum {QUORUM}; e2e window {e2e.seconds:g} s; "
        + ("mutual TLS on every link" if opts.tls else "plain text on loopback")
    )
    say(
        f"load generator ceiling: {ceiling:,.0f} msg/s ({opts.processes} processes, "
        f"{_size(opts.payload_bytes)}, QoS 1, bare consumer draining)"
    )
    say("")
    head = (
        f"{'run':<8}{'devices':>8}{'payload':>9}{'bare msg/s':>12}{'e2e tx/s':>10}"
        f"{'ratio':>7}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'cpu s/1k':>10}"
        f"{'peak MB':>9}{'sig/s':>7}{'getTx p99':>11}{'spool tx':>10}"
    )
    say(head)
    say("-" * len(head))
    for name, b, e in rows:
        say(
            f"{name:<8}{e.devices:>8}{_size(e.payload_bytes):>9}{b.msg_per_s:>12,.0f}"
            f"{e.tx_per_s:>10,.0f}{_ratio(e, b):>7.2f}{e.p50_ms:>8.0f}{e.p95_ms:>8.0f}"
            f"{e.p99_ms:>8.0f}{e.cpu_s_per_1k:>10.3f}{e.rss_peak_mb:>9.0f}"
            f"{e.signatures_per_s:>7.1f}{e.get_tx_p99_ms:>9.2f}ms{e.spool_tx:>10}"
        )
    say("")
    say(
        "latency: publish (device clock) to quorum commit, at "
        f"{LATENCY_LOAD:.0%} of the saturated rate; at saturation (a {CREDIT_WINDOW}-message "
        f"backlog) main p50 {e2e.saturated_p50_ms:.0f} ms, p99 {e2e.saturated_p99_ms:.0f} ms"
    )
    if e2e.latency_legs_ms:
        legs = e2e.latency_legs_ms
        say(
            f"  its legs at {LATENCY_LOAD:.0%}, p50 / p99 ms: device to the gateway's receipt "
            f"{legs['receipt'][0]:.0f} / {legs['receipt'][1]:.0f}, receipt to the signed "
            f"checkpoint {legs['checkpoint'][0]:.0f} / {legs['checkpoint'][1]:.0f}, checkpoint "
            f"to the quorum {legs['quorum'][0]:.0f} / {legs['quorum'][1]:.0f}"
        )
    say(
        f"cores busy during the main window: gateway {e2e.gateway_cpu_share:.2f}, broker "
        f"{e2e.broker_cpu_share:.2f}, generator {e2e.generator_cpu_share:.2f}, ledger nodes "
        f"{e2e.ledgers_cpu_share:.2f}, other processes {e2e.other_cpu_share:.2f}; "
        f"bare consumer {bare.cpu_s_per_1k:.3f} CPU s per 1k messages"
    )
    report_limits(bare, limits, e2e)
    busy = [
        (f"{n} {what}", share)
        for n, b, e in rows
        for what, share in (
            ("bare", b.other_cpu_share),
            ("e2e", e.other_cpu_share),
            ("overload", e.overload_other_cpu_share),
        )
        if share > OTHER_LOAD_WARN
    ]
    busy += [
        (f"main {lim.consumer}", lim.other_cpu_share)
        for lim in limits
        if lim.other_cpu_share > OTHER_LOAD_WARN
    ]
    for n, share in busy:
        say(
            f"  warning: [{n}] other processes kept {share:.2f} cores busy during the window: "
            "the machine was not quiet, figures are low"
        )
    if opts.overload_seconds:
        say(
            f"overload (devices outrun the gateway, the broker always holds a backlog): intake "
            f"{e2e.overload_stored_per_s:,.0f} tx/s, committed {e2e.overload_committed_per_s:,.0f} "
            f"tx/s, spool depth {e2e.overload_depth:,} after {opts.overload_seconds:g} s"
        )
    per_batch = e2e.signatures / e2e.batches if e2e.batches else 0.0
    say(
        f"HSM: {e2e.signatures} signatures for {e2e.batches} batches and {e2e.transactions} "
        f"transactions ({per_batch:.2f} per batch); one session's ceiling {hsm_rate:,.0f} sig/s"
    )
    if big is not None:
        say(
            f"spool of {big.transactions:,} tx ({big.batches} batches, {big.spool_mb:.0f} MB): "
            f"built in {big.build_s:.0f} s, gateway ready in {big.ready_s:.1f} s, caught up with "
            f"the ledgers in {big.catch_up_s:.0f} s; RSS {big.rss_mb:.0f} MB (peak "
            f"{big.rss_peak_mb:.0f}); GetTransaction with proof p50 {big.get_tx_p50_ms:.2f} ms, "
            f"p99 {big.get_tx_p99_ms:.2f} ms over {big.lookups} random lookups"
        )
    ratio = _ratio(e2e, bare)

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    say("")
    say("targets (figures are not pass/fail; for the reader):")
    say(f"  ratio >= 0.7 at ~120 B and 1,000 devices: {ratio:.2f} {mark(ratio >= 0.7)}")
    for _n, b, e in rows:
        if e.payload_bytes == 1024 and e.devices == 1000:
            kib = _ratio(e, b)
            say(f"  ratio >= 0.5 at 1 KiB: {kib:.2f} {mark(kib >= 0.5)}")
    say(
        f"  p99 <= max_age + 250 ms = {target_ms:.0f} ms: {e2e.p99_ms:.0f} ms "
        f"{mark(e2e.p99_ms <= target_ms)}"
    )
    if big is not None:
        say(
            f"  peak RSS < 200 MB at {big.transactions:,} tx: {big.rss_peak_mb:.0f} MB "
            f"{mark(big.rss_peak_mb < 200)}"
        )
        say(
            f"  GetTransaction p99 < 5 ms there: {big.get_tx_p99_ms:.2f} ms "
            f"{mark(big.get_tx_p99_ms < 5)}"
        )
    say(f"  one signature per batch: {per_batch:.2f} {mark(abs(per_batch - 1.0) < 1e-9)}")
    errors = [f"{e.gateway_id}: {err}" for _n, _b, e in rows for err in e.errors]
    for err in errors:
        say(f"  warning: {err}")
    say(f"bench took {elapsed:.0f} s")
    figures: dict[str, Any] = {
        "bare_msg_per_s": round(bare.msg_per_s, 1),
        "e2e_tx_per_s": e2e.tx_per_s,
        "ratio": ratio,
        "p50_ms": e2e.p50_ms,
        "p95_ms": e2e.p95_ms,
        "p99_ms": e2e.p99_ms,
        "p99_target_ms": target_ms,
        "saturated_p50_ms": e2e.saturated_p50_ms,
        "saturated_p99_ms": e2e.saturated_p99_ms,
        "rss_mb": e2e.rss_peak_mb,
        "cpu_s_per_1k": e2e.cpu_s_per_1k,
        "bare_cpu_s_per_1k": round(bare.cpu_s_per_1k, 3),
        "limits": [
            {
                "consumer": b.consumer,
                "msg_per_s": round(b.msg_per_s, 1),
                "cpu_us_per_msg": round(b.cpu_us_per_msg, 2),
                "broker_cpu_share": b.broker_cpu_share,
                "other_cpu_share": b.other_cpu_share,
                "ratio": round(e2e.tx_per_s / b.msg_per_s, 3) if b.msg_per_s else 0.0,
                "note": b.note,
            }
            for b in [bare, *limits]
        ],
        "gateway_cpu_us_per_tx_by_process": e2e.cpu_us_by_process,
        "gateway_cpu_us_per_tx_by_stage": e2e.cpu_us_by_stage,
        "signatures_per_s": e2e.signatures_per_s,
        "signatures_per_batch": round(per_batch, 3),
        "hsm_sign_ceiling_per_s": round(hsm_rate, 1),
        "generator_ceiling_msg_per_s": round(ceiling, 1),
        "generator_processes": opts.processes,
        "gateway_cpu_share": e2e.gateway_cpu_share,
        "broker_cpu_share": e2e.broker_cpu_share,
        "generator_cpu_share": e2e.generator_cpu_share,
        "ledgers_cpu_share": e2e.ledgers_cpu_share,
        "other_cpu_share": e2e.other_cpu_share,
        "overload_stored_per_s": e2e.overload_stored_per_s,
        "overload_committed_per_s": e2e.overload_committed_per_s,
        "overload_depth": e2e.overload_depth,
        "overload_other_cpu_share": e2e.overload_other_cpu_share,
        "e2e_seconds": e2e.seconds,
        "e2e_stored_per_s": e2e.stored_per_s,
        "latency_rate_tx_per_s": e2e.latency_rate,
        "latency_samples": e2e.latency_samples,
        "latency_legs_ms": {k: list(v) for k, v in e2e.latency_legs_ms.items()},
        "devices": opts.devices,
        "payload_bytes": opts.payload_bytes,
        "get_tx_p99_ms_at_1m": big.get_tx_p99_ms if big else None,
        "get_tx_p50_ms_at_1m": big.get_tx_p50_ms if big else None,
        "rss_mb_at_1m": big.rss_mb if big else None,
        "rss_peak_mb_at_1m": big.rss_peak_mb if big else None,
        "spool_tx_at_1m": big.transactions if big else 0,
        "spool_build_s": big.build_s if big else None,
        "spool_ready_s": big.ready_s if big else None,
        "spool_catch_up_s": big.catch_up_s if big else None,
        "scaling": [
            {
                "run": n,
                "devices": e.devices,
                "payload_bytes": e.payload_bytes,
                "bare_msg_per_s": round(b.msg_per_s, 1),
                "e2e_tx_per_s": e.tx_per_s,
                "ratio": _ratio(e, b),
                "p50_ms": e.p50_ms,
                "p95_ms": e.p95_ms,
                "p99_ms": e.p99_ms,
                "cpu_s_per_1k": e.cpu_s_per_1k,
                "rss_mb": e.rss_peak_mb,
                "signatures_per_s": e.signatures_per_s,
                "get_tx_p99_ms": e.get_tx_p99_ms,
                "spool_tx": e.spool_tx,
                "other_cpu_share": e.other_cpu_share,
            }
            for n, b, e in rows
        ],
        "errors": errors,
        "cores": os.cpu_count(),
        "tls": opts.tls,
        "bench_seconds": round(elapsed, 1),
    }
    return figures


# ---- command line ---------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


CONSUMERS = ("paho", "bulk", "mosquitto_sub")


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    for n in names:
        if n not in CONSUMERS:
            raise argparse.ArgumentTypeError(f"{n!r}: expected one of {', '.join(CONSUMERS)}")
    return names


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m gateway.lab.bench",
        description="Benchmark the gateway end to end on real Mosquitto, SoftHSM2 and ledgers.",
    )
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the bench works")
    p.add_argument("--seconds", type=float, help="measured e2e window (default 30)")
    p.add_argument("--devices", type=int, help="devices of the main run (default 1000)")
    p.add_argument("--payload-bytes", type=int, help="payload size of the main run (default 120)")
    p.add_argument("--processes", type=int, help="publisher processes (default 2)")
    p.add_argument(
        "--overload-seconds",
        type=float,
        help="devices outrunning the gateway (default 15; 0: skip)",
    )
    p.add_argument("--scale-devices", type=_ints, help="comma list (default 10,10000)")
    p.add_argument("--scale-payloads", type=_ints, help="comma list of bytes (default 1024,4096)")
    p.add_argument("--scale-seconds", type=float, help="e2e window of scaling runs (default 10)")
    p.add_argument("--spool-tx", type=int, help="transactions in the big spool (default 1000000)")
    p.add_argument("--lookups", type=int, help="GetTransaction calls on the big spool")
    p.add_argument("--batch-max-tx", type=int, help="gateway batch.max_tx (default 500)")
    p.add_argument("--batch-max-age", type=float, help="gateway batch.max_age_s (default 1.0)")
    p.add_argument("--intake-processes", type=int, help="gateway mqtt.intake_processes (default 1)")
    p.add_argument(
        "--tls",
        action="store_true",
        help="every link over mutual TLS, as in production (default: plain text on loopback)",
    )
    p.add_argument(
        "--limits",
        type=_names,
        help="consumers measured beside the gateway in the main run (default "
        "bulk,mosquitto_sub; empty: none)",
    )
    p.add_argument("--limit-seconds", type=float, help="window of each limit (default 10)")
    p.add_argument(
        "--stage-seconds",
        type=float,
        help="window of the CPU-by-stage profile, main run (default 10; 0: skip)",
    )
    p.add_argument("--workdir", type=Path, help="keep everything here instead of a temp dir")
    p.add_argument("--profile", type=Path, help="py-spy raw profile of the main e2e window")
    p.add_argument(
        "--profile-gil", action="store_true", help="profile only the thread holding the GIL"
    )
    a = p.parse_args(argv)
    o = Options()
    if a.quick:
        o = Options(
            seconds=2.0,
            warmup=1.0,
            latency_seconds=1.5,
            overload_seconds=1.5,
            ceiling_seconds=1.0,
            bare_seconds=1.5,
            scale_devices=(),
            scale_payloads=(1024,),
            scale_seconds=1.5,
            spool_tx=10_000,
            lookups=200,
            quick=True,
            limit_seconds=1.5,
            stage_seconds=1.5,
        )
    for name in ("seconds", "overload_seconds", "devices", "payload_bytes", "processes"):
        if getattr(a, name) is not None:
            setattr(o, name, getattr(a, name))
    for name in (
        "scale_devices",
        "scale_payloads",
        "scale_seconds",
        "spool_tx",
        "lookups",
        "limits",
        "limit_seconds",
        "stage_seconds",
    ):
        if getattr(a, name) is not None:
            setattr(o, name, getattr(a, name))
    if a.batch_max_tx is not None:
        o.batch_max_tx = a.batch_max_tx
    if a.batch_max_age is not None:
        o.batch_max_age_s = a.batch_max_age
    if a.intake_processes is not None:
        o.intake_processes = a.intake_processes
    o.workdir = a.workdir
    o.profile = a.profile
    o.profile_gil = a.profile_gil
    o.tls = a.tls
    if o.seconds <= 0 or o.devices < 1 or o.processes < 1 or o.payload_bytes < 16:
        p.error("--seconds, --devices, --processes and --payload-bytes must be positive")
    return o


def run(opts: Options) -> dict[str, Any]:
    root = opts.workdir or Path(tempfile.mkdtemp(prefix="edge-gateway-bench-"))
    points: list[tuple[str, int, int]] = [("main", opts.devices, opts.payload_bytes)]
    points += [(f"d{d}", d, opts.payload_bytes) for d in opts.scale_devices]
    points += [(f"p{b}", opts.devices, b) for b in opts.scale_payloads]
    gids = [f"bench-{n}" for n, _d, _b in points]
    if opts.spool_tx:
        gids.append("bench-spool")
    bench = Bench(opts, root)
    t_start = time.monotonic()
    try:
        say(f"setting up in {root}: SoftHSM token, mosquitto, {NODES} ledger nodes")
        bench.setup(gids)
        say(f"generator ceiling ({opts.processes} processes)")
        ceiling = bench.ceiling()
        say(f"  {ceiling:,.0f} msg/s")
        rows: list[tuple[str, Bare, EndToEnd]] = []
        limits: list[Bare] = []
        for name, devices, payload in points:
            main = name == "main"
            secs = opts.seconds if main else opts.scale_seconds
            bare_s = opts.bare_seconds if main else max(3.0, min(opts.bare_seconds, secs))
            say(f"[{name}] bare consumer: {devices} devices, {_size(payload)}")
            b = bench.bare(devices, payload, bare_s)
            say(f"  {b.msg_per_s:,.0f} msg/s")
            if main:
                for kind in opts.limits:
                    say(f"[{name}] limit: {kind} consumer")
                    try:
                        lim = bench.bare(devices, payload, opts.limit_seconds, kind)
                    except FileNotFoundError as missing:
                        say(f"  skipped: {missing}")
                        continue
                    say(f"  {lim.msg_per_s:,.0f} msg/s, {lim.cpu_us_per_msg:.1f} µs CPU/msg")
                    limits.append(lim)
            say(f"[{name}] gateway end to end: {secs:g} s saturated, then latency")
            e = bench.end_to_end(
                f"bench-{name}",
                devices,
                payload,
                secs,
                opts.warmup if main else min(opts.warmup, 3.0),
                opts.latency_seconds if main else max(3.0, opts.latency_seconds / 2),
                opts.profile if main else None,
                opts.overload_seconds if main else 0.0,
                opts.stage_seconds if main else 0.0,
            )
            say(
                f"  {e.tx_per_s:,.0f} tx/s committed (ratio {_ratio(e, b):.2f}); "
                f"p50 {e.p50_ms:.0f} ms, p99 {e.p99_ms:.0f} ms at {e.latency_rate:,.0f} tx/s"
            )
            rows.append((name, b, e))
        big = None
        if opts.spool_tx:
            say(f"[spool] {opts.spool_tx:,} transactions through Spool, Batcher and Signer")
            big = bench.big_spool("bench-spool", opts.spool_tx, 10_000, opts.lookups)
        say("HSM signing ceiling")
        hsm_rate = bench.hsm_ceiling("bench-main", 1.0 if opts.quick else 3.0)
    finally:
        bench.close()
        if opts.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return report(opts, ceiling, rows, limits, big, hsm_rate, time.monotonic() - t_start)


def _terminate(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # the same clean-up path as Ctrl-C


def run_main(
    name: str, run: Callable[[], dict[str, Any]], failures: tuple[type[Exception], ...]
) -> int:
    """A bench's command: its figures as JSON on stdout and 0; on Ctrl-C or SIGTERM, 130
    once every process it started is stopped; on one of `failures`, one line and 1."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        figures = run()
    except KeyboardInterrupt:
        print(f"{name}: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    except failures as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(figures, sort_keys=True), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    # OSError: ConnectionError, TimeoutError
    return run_main("bench", lambda: run(opts), (GatewayError, OSError))


if __name__ == "__main__":
    sys.exit(main())
