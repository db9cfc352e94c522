"""`make bench-peers`: this gateway beside ThingsBoard IoT Gateway, on the same load.

One run, everything on 127.0.0.1, with the generator, broker and payloads of
`make bench` (gateway.lab.bench, gateway.lab.loadgen):

1. the bare paho QoS 1 consumer (the ratio's denominator) and this gateway,
   committed at a 2-of-3 ledger quorum, each saturated by credit;
2. ThingsBoard IoT Gateway (PyPI thingsboard-gateway, installed in a venv of its
   own and started by scripts/tb-gateway-peer, which keeps it on loopback) with
   its sqlite storage, then with its memory storage. Its MQTT connector takes the
   same device topics; its "ThingsBoard server" is a second Mosquitto, where a
   stand-in answers the session-limits request it waits for and counts the
   readings delivered, by (device, seq), since its converter can merge two
   readings of one device. Each device first publishes PRIME_ROUNDS readings
   at a low rate, all of which must reach the server (the peer does start-up
   work per new device that a box in service has done long ago); then it is
   saturated by credit on what reached the server;
3. for each storage, a run at a fixed rate during which the peer is killed with
   SIGKILL once and started again on the same persistent session: every
   (device, seq) the broker acknowledged to the devices is then looked for at
   the server, and what never arrives is what the kill lost.

It prints a table (system | delivered or committed per s | CPU s per 1,000) and
the kill-loss counts, then one JSON line. Every process it starts is stopped
before it returns, the peer with SIGKILL if it does not stop on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from gateway.common.errors import GatewayError
from gateway.lab import loadgen
from gateway.lab.bench import (
    CREDIT_WINDOW,
    OTHER_LOAD_WARN,
    Bench,
    Options,
    Watch,
    cpu_of,
    machine_busy,
    mosquitto_version,
    run_main,
    say,
)
from gateway.lab.sandbox import Proc

REPO = Path(__file__).resolve().parents[2]
PEER_SCRIPT = REPO / "scripts" / "tb-gateway-peer"
DEFAULT_PEER_PYTHON = REPO / ".venv-peers" / "bin" / "python"
PEER_PACKAGE = "thingsboard-gateway"
GATEWAY_ID = "peer-gw"
READY_TIMEOUT_S = 90.0
SETTLE_QUIET_S = 5.0  # no new reading at the server for this long: delivery has ended
SETTLE_TIMEOUT_S = 90.0
# Before the saturated window every device publishes PRIME_ROUNDS readings at PRIME_RATE:
# the peer does per-device work the first time it sees a device (it rewrites its
# connected_devices.json, about 190 KB at 1,000 devices, once per new device), which a box
# that has run for a while has long done. Without it a short window measures that start-up.
PRIME_ROUNDS = 2
PRIME_RATE = 1000.0
STOP_TIMEOUT_S = 10.0
PROBE_PREFIX = "probe"
# What the stand-in answers to getSessionLimits: no rate limits (as the peer's defaults
# are for a self-hosted server), its documented inflight and payload limits.
SESSION_LIMITS = {
    "maxPayloadSize": 65536,
    "maxInflightMessages": 100,
    "rateLimits": {},
    "gatewayRateLimits": {},
}
TELEMETRY_TOPIC = "v1/gateway/telemetry"
RPC_REQUEST = "v1/devices/me/rpc/request/"
RPC_RESPONSE = "v1/devices/me/rpc/response/"


@dataclass
class PeerOptions:
    seconds: float = 30.0
    warmup: float = 5.0
    bare_seconds: float = 12.0
    kill_seconds: float = 20.0
    kill_rate: float = 0.0  # msg/s of the kill run; 0: half the rate the peer reached
    devices: int = 1000
    payload_bytes: int = 120
    processes: int = 2
    storages: tuple[str, ...] = ("sqlite", "memory")
    peer_python: Path = DEFAULT_PEER_PYTHON
    gateway: bool = True
    workdir: Path | None = None


@dataclass
class Row:
    system: str
    per_s: float
    cpu_s_per_1k: float
    rss_peak_mb: float
    other_cpu_share: float
    what: str  # "delivered", "committed"
    note: str = ""


@dataclass
class KillLoss:
    storage: str
    rate: float
    published: int
    acknowledged: int
    delivered: int
    lost: int
    duplicates: int
    killed_at_s: float
    restarted_in_s: float
    lost_published_before_kill: int = 0  # of lost: published before the SIGKILL
    lost_in_last_s_before_kill: int = 0  # of those: in the last second before it
    sqlite_rows_at_kill: int | None = None
    notes: list[str] = field(default_factory=list)


# ---- the stand-in ThingsBoard server ---------------------------------------------------


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _readings(payload: bytes | bytearray) -> list[tuple[str, int]]:
    """(device, seq) of every reading in a v1/gateway/telemetry message:
    {"device": [{"ts": ms, "values": {...}}, ...], ...}."""
    try:
        data = json.loads(payload)
    except ValueError:
        return []
    out: list[tuple[str, int]] = []
    if not isinstance(data, dict):
        return out
    for device, entries in data.items():
        for entry in entries if isinstance(entries, list) else [entries]:
            values = entry.get("values", entry) if isinstance(entry, dict) else {}
            seq = values.get("seq") if isinstance(values, dict) else None
            if isinstance(seq, int | float | str):
                with contextlib.suppress(ValueError):
                    out.append((str(device), int(seq)))
    return out


def _serve(port: int, counters: Any, requests: Any, answers: Any) -> None:
    """counters: [readings, duplicates, session limits answered, telemetry messages]."""
    seen: set[tuple[str, int]] = set()
    lock = threading.Lock()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id="thingsboard-stand-in",
        protocol=MQTTProtocolVersion.MQTTv311,
    )

    def on_connect(c: mqtt.Client, *_a: Any) -> None:
        c.subscribe([(TELEMETRY_TOPIC, 1), (RPC_REQUEST + "+", 1)])

    def on_message(c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith(RPC_REQUEST):
            with contextlib.suppress(ValueError, AttributeError):
                if json.loads(msg.payload).get("method") == "getSessionLimits":
                    request_id = msg.topic[len(RPC_REQUEST) :]
                    c.publish(RPC_RESPONSE + request_id, json.dumps(SESSION_LIMITS), qos=1)
                    counters[2] += 1
            return
        counters[3] += 1
        with lock:
            for pair in _readings(msg.payload):
                if pair in seen:
                    counters[1] += 1
                else:
                    seen.add(pair)
                    counters[0] += 1

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    try:
        while True:
            item = requests.get()
            if item is None:
                break
            lo, hi = item
            with lock:
                answers.put([p for p in seen if lo <= p[1] < hi])
    finally:
        client.loop_stop()
        client.disconnect()


def publish_offset(job: loadgen.Job, processes: int, pair: tuple[str, int]) -> float:
    """When (s after the phase began) a fixed-rate phase published this (device, seq): each
    process sends its own devices round robin at its share of the rate."""
    number = int(pair[0].rpartition("-")[2])
    index, position = number % processes, number // processes
    owned = len(loadgen.owned_devices(index, processes, job.devices))
    i = (pair[1] - job.start_seq) * owned + position
    return i / (job.rate * owned / job.devices)


class StandIn:
    """The peer's ThingsBoard server: a subscriber on the second broker, in its own process."""

    def __init__(self, port: int) -> None:
        ctx = mp.get_context("spawn")
        self._counters = ctx.RawArray("q", 4)
        self._requests: Any = ctx.Queue()
        self._answers: Any = ctx.Queue()
        self._proc = ctx.Process(
            target=_serve,
            args=(port, self._counters, self._requests, self._answers),
            name="thingsboard-stand-in",
            daemon=True,
        )
        self._proc.start()

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def readings(self) -> int:
        return int(self._counters[0])

    def duplicates(self) -> int:
        return int(self._counters[1])

    def limits_answered(self) -> int:
        return int(self._counters[2])

    def pairs(self, lo: int, hi: int) -> set[tuple[str, int]]:
        """Readings delivered with lo <= seq < hi."""
        self._requests.put((lo, hi))
        return set(self._answers.get(timeout=60))

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._requests.put(None)
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)


# ---- the peer -----------------------------------------------------------------------


def peer_version(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({PEER_PACKAGE!r}))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise GatewayError(
            f"{PEER_PACKAGE} is not installed for {python}: run `make bench-peers`, which "
            f"installs it into .venv-peers"
        )
    return out.stdout.strip()


def peer_config(
    d: Path, python: Path, storage: str, source_port: int, server_port: int, client_id: str
) -> Path:
    """The peer's configuration directory: its shipped tb_gateway.json and logs.json with
    the server, storage and one MQTT connector for the generator's devices."""
    conf = d / "config"
    conf.mkdir(parents=True, exist_ok=True)
    shipped = subprocess.run(
        [
            str(python),
            "-c",
            "import thingsboard_gateway, os; "
            "print(os.path.join(os.path.dirname(thingsboard_gateway.__file__), 'config'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    main = json.loads((Path(shipped) / "tb_gateway.json").read_text())
    shutil.copy(Path(shipped) / "logs.json", conf / "logs.json")
    tb = main["thingsboard"]
    tb.update(
        host="127.0.0.1",
        port=server_port,
        remoteShell=False,
        remoteConfiguration=False,
        security={"type": "accessToken", "accessToken": "peer-bench"},
    )
    tb["statistics"] = {**tb.get("statistics", {}), "enable": False}
    if storage == "sqlite":
        main["storage"] = {
            "type": "sqlite",
            "data_file_path": "./data/",
            "messages_ttl_check_in_hours": 1,
            "messages_ttl_in_days": 7,
            "max_read_records_count": 1000,
            "writing_batch_size": 1000,
        }
    else:
        main["storage"] = {"type": "memory", "read_records_count": 100, "max_records_count": 100000}
    main["grpc"] = {**main.get("grpc", {}), "enabled": False}
    main["connectors"] = [{"type": "mqtt", "name": "devices", "configuration": "mqtt.json"}]
    ints = ("seq", "time", "energy_wh", "voltage_dv", "rsrp_dbm")
    connector = {
        "broker": {
            "host": "127.0.0.1",
            "port": source_port,
            "clientId": client_id,
            "version": 5,
            "maxMessageNumberPerWorker": 10,
            "maxNumberOfWorkers": 100,
            # A persistent session, as this gateway keeps: what the peer has not
            # acknowledged stays at the broker across a restart.
            "cleanSession": False,
            "cleanStart": False,
            "sessionExpiryInterval": 3600,
            "security": {"type": "anonymous"},
        },
        "mapping": [
            {
                "topicFilter": "devices/+/tx",
                "subscriptionQos": 1,
                "converter": {
                    "type": "json",
                    "deviceInfo": {
                        "deviceNameExpressionSource": "topic",
                        "deviceNameExpression": "(?<=devices/)(.*?)(?=/tx)",
                        "deviceProfileExpressionSource": "constant",
                        "deviceProfileExpression": "default",
                    },
                    "sendDataOnlyOnChange": False,
                    "timeout": 60000,
                    "attributes": [],
                    "timeseries": [
                        *({"type": "integer", "key": k, "value": "${" + k + "}"} for k in ints),
                        {"type": "string", "key": "kind", "value": "${kind}"},
                    ],
                },
            }
        ],
    }
    (conf / "tb_gateway.json").write_text(json.dumps(main, indent=2))
    (conf / "mqtt.json").write_text(json.dumps(connector, indent=2))
    return conf


class Peer:
    """One ThingsBoard IoT Gateway process (scripts/tb-gateway-peer), restartable."""

    def __init__(self, d: Path, python: Path, conf: Path) -> None:
        self.d = d
        self.python = python
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.d / f"stdout-{self.starts}.log").open("wb")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.d),
            "TB_GW_CONFIG_DIR": str(self.conf),
            "PYTHONUNBUFFERED": "1",
        }
        self.proc = subprocess.Popen(
            [str(self.python), str(PEER_SCRIPT)],
            cwd=self.d,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self) -> str:
        logs = sorted(self.d.glob("stdout-*.log")) + sorted((self.d / "logs").glob("*.log"))
        return "\n".join(p.read_text(errors="replace")[-1500:] for p in logs[-2:])

    def sqlite_rows(self) -> int | None:
        """Rows in its sqlite storage (read-only), if it has one."""
        import sqlite3

        dbs = sorted((self.d / "data").glob("*.db")) if (self.d / "data").is_dir() else []
        total = 0
        for db in dbs:
            try:
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
                try:
                    for (table,) in conn.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table'"
                    ).fetchall():
                        total += int(conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])
                finally:
                    conn.close()
            except sqlite3.Error:
                return None
        return total if dbs else None


# ---- the bench ------------------------------------------------------------------------


class PeerBench:
    def __init__(self, opts: PeerOptions, root: Path) -> None:
        self.opts = opts
        self.root = root
        self.bench = Bench(
            Options(
                seconds=opts.seconds,
                warmup=opts.warmup,
                devices=opts.devices,
                payload_bytes=opts.payload_bytes,
                processes=opts.processes,
                limits=(),
                stage_seconds=0.0,
                overload_seconds=0.0,
                spool_tx=0,
            ),
            root,
        )
        self.server: Proc | None = None
        self.standin: StandIn | None = None

    @property
    def port(self) -> int:
        return self.bench.port

    def setup(self) -> None:
        self.bench.setup([GATEWAY_ID])
        self.server = self.bench.sb.mosquitto(name="thingsboard-server")
        self.standin = StandIn(self.server.port)

    def close(self) -> None:
        if self.standin is not None:
            self.standin.close()
        self.bench.close()

    def _ours(self, peer: Peer) -> list[int]:
        b = self.bench
        assert b.broker is not None and b.broker.proc is not None
        assert self.server is not None and self.server.proc is not None
        assert self.standin is not None
        return [
            peer.pid,
            self.standin.pid,
            b.broker.proc.pid,
            self.server.proc.pid,
            *b.gen.pids,
            os.getpid(),
        ]

    # ---- this gateway and the bare consumer -------------------------------------------

    def gateway_rows(self) -> list[Row]:
        o = self.opts
        say(f"bare paho consumer: {o.devices} devices, {o.payload_bytes} B")
        bare = self.bench.bare(o.devices, o.payload_bytes, o.bare_seconds)
        say(f"  {bare.msg_per_s:,.0f} msg/s")
        rows = [
            Row(
                "bare paho QoS 1 consumer",
                bare.msg_per_s,
                bare.cpu_s_per_1k,
                bare.rss_peak_mb,
                bare.other_cpu_share,
                "delivered",
            )
        ]
        if not o.gateway:
            return rows
        say("this gateway end to end (committed at the ledger quorum)")
        e = self.bench.end_to_end(GATEWAY_ID, o.devices, o.payload_bytes, o.seconds, o.warmup, 3.0)
        say(f"  {e.tx_per_s:,.0f} tx/s")
        rows.append(
            Row(
                "this gateway, committed at a 2-of-3 ledger quorum",
                e.tx_per_s,
                e.cpu_s_per_1k,
                e.rss_peak_mb,
                e.other_cpu_share,
                "committed",
                "; ".join(e.errors),
            )
        )
        return rows

    # ---- the peer -------------------------------------------------------------------

    def _wait_ready(self, peer: Peer) -> float:
        """Until a probe message published to the source broker reaches the server."""
        assert self.standin is not None
        t0 = time.monotonic()
        deadline = t0 + READY_TIMEOUT_S
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"peer-probe-{time.time_ns()}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        client.connect("127.0.0.1", self.port, keepalive=30)
        client.loop_start()
        seq = 1
        base = self.standin.readings()
        try:
            while time.monotonic() < deadline:
                if not peer.alive():
                    raise GatewayError(f"the peer exited before it was ready:\n{peer.log_tail()}")
                payload = json.dumps({"seq": seq, "time": int(time.time() * 1000), "kind": "p"})
                client.publish(f"devices/{PROBE_PREFIX}-{peer.starts:05d}/tx", payload, qos=1)
                seq += 1
                until = time.monotonic() + 0.5
                while time.monotonic() < until:
                    if self.standin.readings() > base:
                        return time.monotonic() - t0
                    time.sleep(0.02)
        finally:
            client.loop_stop()
            client.disconnect()
        raise GatewayError(
            f"the peer forwarded nothing within {READY_TIMEOUT_S:.0f} s:\n{peer.log_tail()}"
        )

    def _settle(self) -> None:
        """Until the server has seen no new reading for SETTLE_QUIET_S (bounded)."""
        assert self.standin is not None
        last, quiet_since = self.standin.readings(), time.monotonic()
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.standin.readings()
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= SETTLE_QUIET_S:
                return

    def _prime(self) -> float:
        """Every device publishes PRIME_ROUNDS readings and the server has them all."""
        assert self.standin is not None
        o = self.opts
        b = self.bench
        t0 = time.monotonic()
        job = loadgen.Job(
            port=self.port,
            devices=o.devices,
            payload_bytes=o.payload_bytes,
            seconds=max(1.0, PRIME_ROUNDS * o.devices / PRIME_RATE),
            start_seq=b.next_seq(),
            mode=loadgen.MODE_RATE,
            rate=PRIME_RATE,
            run_id=f"peer-prime-{b.phase}",
        )
        b.gen.begin(job)
        res = b.gen.wait(120)
        self._settle()
        published = loadgen.published_pairs(job, res.published_by_index)
        missing = published - self.standin.pairs(job.start_seq, job.start_seq + 10**8)
        if missing:
            raise GatewayError(
                f"priming: {len(missing):,} of {len(published):,} readings did not reach "
                "the peer's server"
            )
        return time.monotonic() - t0

    def saturated(self, peer: Peer, label: str) -> Row:
        """Credit: the generator stays a window ahead of what reached the server."""
        assert self.standin is not None
        o = self.opts
        b = self.bench
        watch = Watch(peer.pid)
        job = loadgen.Job(
            port=self.port,
            devices=o.devices,
            payload_bytes=o.payload_bytes,
            seconds=o.warmup + o.seconds,
            start_seq=b.next_seq(),
            mode=loadgen.MODE_CREDIT,
            run_id=f"peer-{b.phase}",
        )
        base = self.standin.readings()
        t0 = b.gen.begin(job)
        ours = self._ours(peer)

        def look() -> tuple[float, int, float, float, float]:
            return (
                time.monotonic(),
                self.standin.readings() if self.standin else 0,
                watch.cpu(),
                cpu_of(ours),
                machine_busy(),
            )

        mark: tuple[float, int, float, float, float] | None = None
        next_print = t0 + 5
        try:
            while time.monotonic() < t0 + o.warmup + o.seconds - 0.05:
                if not peer.alive():
                    raise GatewayError(f"the peer exited under load:\n{peer.log_tail()}")
                n = self.standin.readings()
                b.gen.set_credit(n - base + CREDIT_WINDOW)
                now = time.monotonic()
                if mark is None and now >= t0 + o.warmup:
                    mark = look()
                if now >= next_print:
                    say(f"    t={now - t0:4.0f}s delivered {n - base:>8}")
                    next_print += 5
                time.sleep(0.02)
            end = look()
            res = b.gen.wait(120)
            self._settle()
        finally:
            watch.close()
        assert mark is not None
        span = end[0] - mark[0]
        count = end[1] - mark[1]
        note = "; ".join(res.errors)
        return Row(
            label,
            count / span,
            (end[2] - mark[2]) / count * 1000 if count else 0.0,
            round(watch.peak_rss / 2**20, 1),
            round(max(0.0, (end[4] - mark[4]) - (end[3] - mark[3])) / span, 2),
            "delivered",
            note,
        )

    def kill_run(self, peer: Peer, storage: str, rate: float) -> KillLoss:
        """A fixed rate, SIGKILL half way, the peer started again on its session; then
        every (device, seq) the broker acknowledged is looked for at the server."""
        assert self.standin is not None
        o = self.opts
        b = self.bench
        job = loadgen.Job(
            port=self.port,
            devices=o.devices,
            payload_bytes=o.payload_bytes,
            seconds=o.kill_seconds,
            start_seq=b.next_seq(),
            mode=loadgen.MODE_RATE,
            rate=rate,
            run_id=f"peer-kill-{b.phase}",
        )
        dups0 = self.standin.duplicates()
        t0 = b.gen.begin(job)
        kill_at = t0 + o.kill_seconds / 2
        while time.monotonic() < kill_at:
            if not peer.alive():
                raise GatewayError(f"the peer exited under load:\n{peer.log_tail()}")
            time.sleep(0.02)
        peer.kill()
        killed_at = time.monotonic() - t0
        rows_at_kill = peer.sqlite_rows() if storage == "sqlite" else None
        say(f"    killed (SIGKILL) at t={killed_at:.1f}s; starting it again")
        peer.start()
        restarted = self._wait_ready(peer)
        res = b.gen.wait(120 + o.kill_seconds)
        self._settle()
        published = loadgen.published_pairs(job, res.published_by_index)
        delivered = self.standin.pairs(job.start_seq, job.start_seq + 10**8)
        lost_pairs = published - delivered
        lost = len(lost_pairs)
        when = [publish_offset(job, o.processes, pair) - killed_at for pair in lost_pairs]
        return KillLoss(
            storage=storage,
            rate=round(rate, 1),
            published=res.published,
            acknowledged=res.acknowledged,
            delivered=len(published & delivered),
            lost=lost,
            duplicates=self.standin.duplicates() - dups0,
            killed_at_s=round(killed_at, 1),
            restarted_in_s=round(restarted, 1),
            lost_published_before_kill=sum(1 for t in when if t < 0),
            lost_in_last_s_before_kill=sum(1 for t in when if -1.0 <= t < 0),
            sqlite_rows_at_kill=rows_at_kill,
            notes=list(res.errors),
        )

    def peer_runs(self, version: str) -> tuple[list[Row], list[KillLoss]]:
        assert self.server is not None
        o = self.opts
        rows: list[Row] = []
        losses: list[KillLoss] = []
        for storage in o.storages:
            d = self.root / f"tb-{storage}"
            client_id = f"tb-peer-{storage}"
            conf = peer_config(d, o.peer_python, storage, self.port, self.server.port, client_id)
            peer = Peer(d, o.peer_python, conf)
            say(f"ThingsBoard IoT Gateway {version}, {storage} storage")
            try:
                peer.start()
                ready = self._wait_ready(peer)
                primed = self._prime()
                say(
                    f"  forwarding after {ready:.1f} s; every device seen after "
                    f"{primed:.1f} s more; {o.seconds:g} s saturated"
                )
                row = self.saturated(peer, f"ThingsBoard IoT Gateway {version}, {storage} storage")
                say(f"  {row.per_s:,.0f} readings/s delivered to its server")
                rows.append(row)
                if o.kill_seconds > 0:
                    rate = o.kill_rate or max(50.0, row.per_s / 2)
                    say(f"  kill run: {rate:,.0f} msg/s for {o.kill_seconds:g} s")
                    loss = self.kill_run(peer, storage, rate)
                    say(
                        f"  published {loss.published:,}, delivered {loss.delivered:,}, "
                        f"lost {loss.lost:,}, duplicates {loss.duplicates:,}"
                    )
                    losses.append(loss)
            finally:
                peer.stop()
                # Its persistent session would keep collecting the later phases' messages.
                loadgen.clear_session(self.port, client_id)
        return rows, losses


# ---- report ---------------------------------------------------------------------------


def machine_state() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def report(
    opts: PeerOptions,
    version: str,
    rows: list[Row],
    losses: list[KillLoss],
    before: str,
    after: str,
    elapsed: float,
) -> dict[str, Any]:
    say("")
    say(
        f"peer benchmark: {os.cpu_count()} cores shared by broker, generator and the system "
        f"measured; Python {sys.version.split()[0]}, mosquitto {mosquitto_version()}, "
        f"ThingsBoard IoT Gateway {version}"
    )
    say(
        f"{opts.devices} devices, {opts.payload_bytes} B json@1 payloads, QoS 1, saturated by "
        f"credit; {opts.seconds:g} s window after {opts.warmup:g} s; every device primed "
        f"({PRIME_ROUNDS} readings each) before the peer's window; plain text on loopback"
    )
    say(f"machine: before {before}; after {after}")
    say("")
    head = f"{'system':<52}{'per s':>10}{'':<11}{'CPU s/1k':>10}{'peak MB':>9}{'other':>7}"
    say(head)
    say("-" * len(head))
    for r in rows:
        say(
            f"{r.system:<52}{r.per_s:>10,.0f} {r.what:<10}{r.cpu_s_per_1k:>10.3f}"
            f"{r.rss_peak_mb:>9.0f}{r.other_cpu_share:>7.2f}"
        )
        if r.note:
            say(f"  ({r.note})")
    say("(other: cores kept busy by processes the bench did not start)")
    for r in rows:
        if r.other_cpu_share > OTHER_LOAD_WARN:
            say(f"  warning: [{r.system}] the machine was not quiet: figures are low")
    if losses:
        say("")
        say(
            "SIGKILL once mid-run, started again on its persistent session "
            "(acknowledged by the broker to the devices, then never delivered = lost):"
        )
        head = (
            f"{'storage':<10}{'msg/s':>8}{'published':>11}{'delivered':>11}{'lost':>8}"
            f"{'before kill':>13}{'last 1 s':>10}{'dups':>7}{'killed at':>11}{'back in':>9}"
            f"{'sqlite rows':>13}"
        )
        say(head)
        say("-" * len(head))
        for k in losses:
            rows_at = "-" if k.sqlite_rows_at_kill is None else f"{k.sqlite_rows_at_kill:,}"
            say(
                f"{k.storage:<10}{k.rate:>8,.0f}{k.published:>11,}{k.delivered:>11,}"
                f"{k.lost:>8,}{k.lost_published_before_kill:>13,}"
                f"{k.lost_in_last_s_before_kill:>10,}{k.duplicates:>7,}"
                f"{k.killed_at_s:>10.1f}s{k.restarted_in_s:>8.1f}s{rows_at:>13}"
            )
        say(
            "(before kill: lost readings published before the SIGKILL; last 1 s: of those, in "
            "the second before it; sqlite rows: in its storage file right after the kill)"
        )
        say(
            "this gateway under the same fault: `make faults` (SIGKILL eight times under "
            "load, then an end-to-end audit: lost 0, applied twice 0)"
        )
    say(f"bench took {elapsed:.0f} s")
    return {
        "peer_version": version,
        "rows": [
            {**asdict(r), "per_s": round(r.per_s, 1), "cpu_s_per_1k": round(r.cpu_s_per_1k, 3)}
            for r in rows
        ],
        "kill_loss": [asdict(k) for k in losses],
        "machine_before": before,
        "machine_after": after,
        "devices": opts.devices,
        "payload_bytes": opts.payload_bytes,
        "seconds": opts.seconds,
        "bench_seconds": round(elapsed, 1),
    }


# ---- command line ---------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> PeerOptions:
    p = argparse.ArgumentParser(
        prog="python -m gateway.lab.peerbench",
        description="This gateway beside ThingsBoard IoT Gateway on the same load, on loopback.",
    )
    p.add_argument("--quick", action="store_true", help="short windows: does the bench work?")
    p.add_argument("--seconds", type=float, help="saturated window (default 30)")
    p.add_argument("--kill-seconds", type=float, help="kill run length (default 20; 0: skip)")
    p.add_argument("--kill-rate", type=float, help="kill run msg/s (default: half the peak)")
    p.add_argument("--devices", type=int, help="devices (default 1000)")
    p.add_argument("--storages", help="comma list of sqlite,memory (default both)")
    p.add_argument("--no-gateway", action="store_true", help="skip this gateway's run")
    p.add_argument("--peer-python", type=Path, help=f"default {DEFAULT_PEER_PYTHON}")
    p.add_argument("--workdir", type=Path, help="keep everything here instead of a temp dir")
    a = p.parse_args(argv)
    o = PeerOptions()
    if a.quick:
        o = PeerOptions(seconds=5.0, warmup=3.0, bare_seconds=4.0, kill_seconds=8.0)
    if a.seconds is not None:
        o.seconds = a.seconds
    if a.kill_seconds is not None:
        o.kill_seconds = a.kill_seconds
    if a.kill_rate is not None:
        o.kill_rate = a.kill_rate
    if a.devices is not None:
        o.devices = a.devices
    if a.storages is not None:
        o.storages = tuple(s.strip() for s in a.storages.split(",") if s.strip())
        if not set(o.storages) <= {"sqlite", "memory"}:
            p.error("--storages: sqlite and/or memory")
    if a.peer_python is not None:
        # Absolute, not resolved: a venv's python is a symlink to the base interpreter.
        o.peer_python = a.peer_python.absolute()
    o.gateway = not a.no_gateway
    o.workdir = a.workdir
    if o.seconds <= 0 or o.devices < 1:
        p.error("--seconds and --devices must be positive")
    return o


def run(opts: PeerOptions) -> dict[str, Any]:
    version = peer_version(opts.peer_python)
    root = opts.workdir or Path(tempfile.mkdtemp(prefix="edge-gateway-peers-"))
    before = machine_state()
    t0 = time.monotonic()
    pb = PeerBench(opts, root)
    try:
        say(f"setting up in {root}: SoftHSM token, 2 mosquitto, 3 ledger nodes, stand-in server")
        pb.setup()
        rows = pb.gateway_rows()
        peer_rows, losses = pb.peer_runs(version)
        rows += peer_rows
    finally:
        pb.close()
        if opts.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return report(opts, version, rows, losses, before, machine_state(), time.monotonic() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    return run_main("peer bench", lambda: run(opts), (GatewayError, OSError, queue.Empty))


if __name__ == "__main__":
    sys.exit(main())
