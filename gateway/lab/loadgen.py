"""Benchmark load: several publisher processes and bare counting consumers.

Each publisher process speaks MQTT 3.1.1 QoS 1 straight on its socket (one write
per chunk of PUBLISH packets, PUBACKs counted in bulk), keeps up to
`max_inflight` messages unacknowledged, and owns its own devices, so every
(device, seq) is unique across the run. Payloads are the json@1 shape the
gateway decodes, pre-built per device to the requested size; only `seq` and
`time` (the publish time in ms, for publish-to-commit latency) are filled in
when a chunk is sent. The pace is one of: as fast as possible, a fixed total
rate, or credit (publish up to a total the controller raises as the consumer
takes messages), which keeps a consumer saturated without building an
unbounded broker queue.

The bare consumers are the limits the gateway is compared with: a paho QoS 1
subscriber (what a Python MQTT intake costs with the usual client), a bulk
parser on a plain socket (the fastest Python intake found: one read, every
PUBLISH in it counted, one write of all their PUBACKs), and `mosquitto_sub`
(a C client, its output to /dev/null, counted by its write system calls).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import queue
import random
import select
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MODE_MAX = "max"
MODE_RATE = "rate"
MODE_CREDIT = "credit"
# Messages built and sent between two looks at the clock, credit and PUBACKs.
CHUNK = 64
# A publisher's clock ("time") has 13 digits until the year 2286.
TIME_DIGITS = 13
ACK_DRAIN_S = 30.0
CONNECT_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class Tls:
    """Client TLS for the broker: its CA and, for mutual TLS, a client certificate."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def apply(self, client: mqtt.Client) -> None:
        client.tls_set(
            ca_certs=self.ca_file,
            certfile=self.cert_file,
            keyfile=self.key_file,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )


@dataclass(frozen=True, slots=True)
class Job:
    """One load phase, the same for every publisher process."""

    port: int
    devices: int
    payload_bytes: int
    seconds: float
    start_seq: int
    mode: str = MODE_MAX
    rate: float = 0.0  # total msg/s over all processes (MODE_RATE)
    max_inflight: int = 256  # per process
    topic_prefix: str = "devices"
    device_prefix: str = "bench"
    host: str = "127.0.0.1"
    run_id: str = "run"
    tls: Tls | None = None


@dataclass(frozen=True, slots=True)
class WorkerResult:
    index: int
    published: int
    acknowledged: int
    first_publish: float  # monotonic
    last_publish: float
    error: str = ""


@dataclass(frozen=True, slots=True)
class LoadResult:
    published: int
    acknowledged: int
    seconds: float  # first to last publish over all processes
    errors: tuple[str, ...]
    published_by_index: tuple[int, ...] = ()  # per publisher process, by its index

    @property
    def msg_per_s(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0


def device_ids(devices: int, prefix: str = "bench") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(devices)]


def published_pairs(job: Job, published_by_index: tuple[int, ...]) -> set[tuple[str, int]]:
    """Every (device, seq) a phase published, from each process's count: a process sends
    its devices round robin, the seq of each device rising by one a round."""
    processes = len(published_by_index)
    out: set[tuple[str, int]] = set()
    for index, count in enumerate(published_by_index):
        names = [
            f"{job.device_prefix}-{d:05d}" for d in owned_devices(index, processes, job.devices)
        ]
        n_dev = len(names)
        out.update((names[i % n_dev], job.start_seq + i // n_dev) for i in range(count))
    return out


def owned_devices(index: int, processes: int, devices: int) -> list[int]:
    """Device numbers publisher `index` owns: disjoint, so (device, seq) never repeats."""
    return list(range(index, devices, processes))


def payload_tail(rng: random.Random, size: int, head_len: int) -> bytes:
    """Everything after `time`: kind, three readings and, if needed, padding up to `size`."""
    tail = (
        f',"kind":"meter.reading","energy_wh":{rng.randint(1_000_000, 9_999_999)},'
        f'"voltage_dv":{rng.randint(2100, 2500)},"rsrp_dbm":-{rng.randint(60, 130)}'
    )
    base = head_len + TIME_DIGITS + len(tail) + 1
    pad = size - base - len(',"pad":""')
    if pad > 0:
        tail += ',"pad":"' + "x" * pad + '"'
    return (tail + "}").encode()


def payload_head(seq: int) -> bytes:
    return b'{"seq":' + str(seq).encode() + b',"time":'


def build_payload(seq: int, time_ms: int, tail: bytes) -> bytes:
    return payload_head(seq) + str(time_ms).encode() + tail


def sample_payload(size: int, seq: int = 1_000_000_001) -> bytes:
    """What a publisher sends at `size` bytes (for reports and tests)."""
    tail = payload_tail(random.Random(1), size, len(payload_head(seq)))
    return build_payload(seq, time.time_ns() // 1_000_000, tail)


# ---- publisher process -------------------------------------------------------


class _RawPublisher:
    """MQTT 3.1.1 QoS 1 publishing straight on a socket: one sendall per chunk of
    PUBLISH packets, PUBACKs counted in bulk. It costs a few microseconds a message
    where paho's publish path costs tens, so the generator leaves the shared cores
    to the broker and the consumer it measures."""

    def __init__(self, host: str, port: int, client_id: str, tls: Tls | None) -> None:
        raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = raw if tls is None else tls.context().wrap_socket(raw, server_hostname=host)
        cid = client_id.encode()
        # Protocol "MQTT" level 4, clean session, keepalive 0 (off: the load never pauses).
        var = b"\x00\x04MQTT\x04\x02\x00\x00" + len(cid).to_bytes(2, "big") + cid
        self.sock.sendall(b"\x10" + _varlen(len(var)) + var)
        connack = b""
        while len(connack) < 4:
            chunk = self.sock.recv(4 - len(connack))
            if not chunk:
                raise ConnectionError(f"broker {host}:{port} closed the connection")
            connack += chunk
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"broker {host}:{port} refused the connection: {connack!r}")
        self.sock.settimeout(None)
        self.mid = 0
        self.acked = 0
        self._buf = b""

    def packet(self, topic_head: bytes, payload: bytes) -> bytes:
        self.mid = self.mid % 65535 + 1
        body_len = len(topic_head) + 2 + len(payload)
        return b"\x32" + _varlen(body_len) + topic_head + self.mid.to_bytes(2, "big") + payload

    def send(self, packets: list[bytes]) -> None:
        self.sock.sendall(b"".join(packets))

    def _readable(self, timeout: float) -> bool:
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True  # decrypted bytes already buffered: select would not see them
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)

    def poll(self, timeout: float) -> None:
        """Count the PUBACKs that arrived, waiting up to `timeout` for the first."""
        while self._readable(timeout):
            timeout = 0.0
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("broker closed the connection")
            buf = self._buf + data
            i = 0
            while i + 2 <= len(buf):
                size = buf[i + 1]  # PUBACK and PINGRESP are short: one length byte
                if i + 2 + size > len(buf):
                    break
                if buf[i] & 0xF0 == 0x40:
                    self.acked += 1
                i += 2 + size
            self._buf = buf[i:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")
        self.sock.close()


def _varlen(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _publish_job(
    index: int,
    processes: int,
    job: Job,
    t0: float,
    counters: Any,
    credit: Any,
    stop: Any,
) -> WorkerResult:
    mine = owned_devices(index, processes, job.devices)
    if not mine:
        return WorkerResult(index, 0, 0, t0, t0)
    share = len(mine) / job.devices
    rng = random.Random(job.start_seq * 7919 + index)
    heads = []
    for d in mine:
        topic = f"{job.topic_prefix}/{job.device_prefix}-{d:05d}/tx".encode()
        heads.append(len(topic).to_bytes(2, "big") + topic)
    head_len = len(payload_head(job.start_seq))
    tails = [payload_tail(rng, job.payload_bytes, head_len) for _ in range(min(len(mine), 64))]
    n_dev = len(mine)
    client = _RawPublisher(job.host, job.port, f"loadgen-{job.run_id}-{index}", job.tls)
    rate = job.rate * share
    published = 0
    first = last = 0.0
    deadline = t0 + job.seconds
    delay = t0 - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    packet = client.packet
    try:
        while not stop.value:
            now = time.monotonic()
            if now >= deadline:
                break
            if job.mode == MODE_RATE:
                allowed = int(rate * (now - t0)) + 1
            elif job.mode == MODE_CREDIT:
                allowed = int(credit.value * share)
            else:
                allowed = published + CHUNK
            room = min(allowed - published, job.max_inflight - (published - client.acked), CHUNK)
            if room <= 0:
                client.poll(0.001)
                counters[2 * index + 1] = client.acked
                continue
            tb = str(time.time_ns() // 1_000_000).encode()
            if not first:
                first = now
            packets = []
            for _ in range(room):
                k = published % n_dev
                seq = job.start_seq + published // n_dev
                body = b'{"seq":' + str(seq).encode() + b',"time":' + tb + tails[k % 64]
                packets.append(packet(heads[k], body))
                published += 1
            client.send(packets)
            last = time.monotonic()
            counters[2 * index] = published
            client.poll(0)
            counters[2 * index + 1] = client.acked
        drain_until = time.monotonic() + ACK_DRAIN_S
        while client.acked < published and time.monotonic() < drain_until:
            client.poll(0.01)
        counters[2 * index + 1] = client.acked
        acked = client.acked
        error = "" if acked == published else f"{published - acked} PUBACKs missing"
    finally:
        client.close()
    return WorkerResult(index, published, acked, first or t0, last or t0, error)


def _worker(
    index: int,
    processes: int,
    jobs: Any,
    results: Any,
    counters: Any,
    credit: Any,
    stop: Any,
) -> None:
    while True:
        item = jobs.get()
        if item is None:
            return
        job, t0 = item
        try:
            res = _publish_job(index, processes, job, t0, counters, credit, stop)
        except (OSError, ConnectionError, ValueError) as e:
            res = WorkerResult(index, 0, 0, t0, t0, f"{type(e).__name__}: {e}")
        results.put(res)


class LoadGenerator:
    """A pool of publisher processes, started once and given one Job per phase."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._ctx = mp.get_context("spawn")
        self._counters = self._ctx.RawArray("q", 2 * processes)
        self._credit = self._ctx.RawValue("d", 0.0)
        self._stop = self._ctx.RawValue("i", 0)
        self._results: Any = self._ctx.Queue()
        self._jobs: list[Any] = []
        self._procs: list[BaseProcess] = []

    def start(self) -> None:
        for i in range(self.processes):
            q = self._ctx.Queue()
            p = self._ctx.Process(
                target=_worker,
                args=(
                    i,
                    self.processes,
                    q,
                    self._results,
                    self._counters,
                    self._credit,
                    self._stop,
                ),
                name=f"loadgen-{i}",
                daemon=True,
            )
            p.start()
            self._jobs.append(q)
            self._procs.append(p)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def begin(self, job: Job, delay: float = 0.3) -> float:
        """Start a phase on every process; returns its common monotonic start time."""
        for i in range(2 * self.processes):
            self._counters[i] = 0
        self._stop.value = 0
        self._credit.value = 0.0
        t0 = time.monotonic() + delay
        for q in self._jobs:
            q.put((job, t0))
        return t0

    def set_credit(self, total: float) -> None:
        self._credit.value = total

    def published(self) -> int:
        return int(sum(self._counters[0::2]))

    def acknowledged(self) -> int:
        return int(sum(self._counters[1::2]))

    def stop(self) -> None:
        self._stop.value = 1

    def wait(self, timeout: float) -> LoadResult:
        got: list[WorkerResult] = []
        deadline = time.monotonic() + timeout
        while len(got) < self.processes:
            try:
                got.append(self._results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{self.processes - len(got)} publisher(s) did not finish in {timeout} s"
                    ) from None
        active = [r for r in got if r.published]
        first = min((r.first_publish for r in active), default=0.0)
        last = max((r.last_publish for r in active), default=0.0)
        by_index = [0] * self.processes
        for r in got:
            by_index[r.index] = r.published
        return LoadResult(
            published=sum(r.published for r in got),
            acknowledged=sum(r.acknowledged for r in got),
            seconds=max(0.0, last - first),
            errors=tuple(r.error for r in got if r.error),
            published_by_index=tuple(by_index),
        )

    def close(self) -> None:
        self._stop.value = 1
        for q in self._jobs:
            with contextlib.suppress(OSError, ValueError):
                q.put(None)
        for p in self._procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
        self._procs.clear()
        self._jobs.clear()


# ---- the bare consumer ---------------------------------------------------------


def _consume(
    port: int,
    topic: str,
    receive_maximum: int,
    count: Any,
    ready: Any,
    stop: Any,
    host: str,
    tls: Tls | None,
) -> None:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bare-consumer-{time.time_ns()}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    if tls is not None:
        tls.apply(client)
    n = 0

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        nonlocal n
        n += 1
        count.value = n

    def on_subscribe(*_a: Any) -> None:
        ready.value = 1

    def on_connect(c: mqtt.Client, *_a: Any) -> None:
        c.subscribe(topic, qos=1)

    def watch() -> None:
        while not stop.value:
            time.sleep(0.05)
        client.disconnect()

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = receive_maximum
    client.connect(host, port, keepalive=60, clean_start=True, properties=props)
    threading.Thread(target=watch, daemon=True).start()
    client.loop_forever()


class _CountingProcess:
    """A consumer in a process of its own that counts into shared memory: started, its
    pid measured, its count read, and stopped the same way whatever it parses with."""

    def __init__(self, target: Callable[..., None], name: str, *args: object) -> None:
        ctx = mp.get_context("spawn")
        self._count = ctx.RawValue("q", 0)
        self._ready = ctx.RawValue("i", 0)
        self._stop = ctx.RawValue("i", 0)
        port, topic, receive_maximum, tls, *extra = args
        self._proc = ctx.Process(
            target=target,
            args=(
                port,
                topic,
                receive_maximum,
                self._count,
                self._ready,
                self._stop,
                "127.0.0.1",
                tls,
                *extra,
            ),
            name=name,
            daemon=True,
        )

    def start(self, timeout: float = 20.0) -> None:
        self._proc.start()
        deadline = time.monotonic() + timeout
        while not self._ready.value:
            if not self._proc.is_alive() or time.monotonic() > deadline:
                raise ConnectionError(f"the {self._proc.name} did not subscribe")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def count(self) -> int:
        return int(self._count.value)

    def close(self) -> None:
        self._stop.value = 1
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)


class BareConsumer(_CountingProcess):
    """A paho QoS 1 subscriber in its own process that only counts: Python MQTT intake."""

    name = "paho (Python)"

    def __init__(
        self,
        port: int,
        tls: Tls | None = None,
        topic: str = "devices/+/tx",
        receive_maximum: int = 1000,
    ) -> None:
        super().__init__(_consume, "bare consumer", port, topic, receive_maximum, tls)


class Consumer(Protocol):
    """What the bench needs of a bare consumer: it runs in a process of its own (`pid`, for
    its CPU) and says how many messages it has taken."""

    def start(self, timeout: float = 20.0) -> None: ...

    @property
    def pid(self) -> int: ...

    def count(self) -> int: ...

    def close(self) -> None: ...


# ---- the bulk consumer: the fastest Python intake measured ---------------------------

BULK_READ_BYTES = 1 << 18
# After each read the bulk consumer sleeps this long, so the next read finds many packets:
# fewer wake-ups for it and for the broker, which writes larger chunks.
BULK_READ_PAUSE_S = 0.001


def _mqtt5_connect(client_id: str, receive_maximum: int) -> bytes:
    """CONNECT, MQTT 5, clean start, keepalive off, Receive Maximum as given."""
    cid = client_id.encode()
    props = b"\x21" + receive_maximum.to_bytes(2, "big")
    var = b"\x00\x04MQTT\x05\x02\x00\x00" + _varlen(len(props)) + props
    var += len(cid).to_bytes(2, "big") + cid
    return b"\x10" + _varlen(len(var)) + var


def _mqtt5_subscribe(topic: str, qos: int = 1) -> bytes:
    t = topic.encode()
    body = b"\x00\x01\x00" + len(t).to_bytes(2, "big") + t + bytes([qos])
    return b"\x82" + _varlen(len(body)) + body


def _bulk_consume(
    port: int,
    topic: str,
    receive_maximum: int,
    count: Any,
    ready: Any,
    stop: Any,
    host: str,
    tls: Tls | None,
    pause_s: float,
) -> None:
    raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = raw if tls is None else tls.context().wrap_socket(raw, server_hostname=host)
    sock.sendall(_mqtt5_connect(f"bulk-consumer-{time.time_ns()}", receive_maximum))
    sock.sendall(_mqtt5_subscribe(topic))
    sock.settimeout(0.2)
    buf = b""
    n = 0
    recv = sock.recv
    while not stop.value:
        try:
            data = recv(BULK_READ_BYTES)
        except TimeoutError:
            continue
        if not data:
            break
        buf = buf + data if buf else data
        size = len(buf)
        i = 0
        acks: list[bytes] = []
        while i + 2 <= size:
            head = buf[i]
            # Remaining length: a variable byte integer of up to 4 bytes.
            j = i + 1
            length = 0
            shift = 0
            while j < size:
                b = buf[j]
                j += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if b < 0x80:
                    break
            else:
                break
            end = j + length
            if end > size:
                break
            kind = head & 0xF0
            if kind == 0x30:
                n += 1
                if head & 0x06:  # QoS 1: PUBACK with the packet id after the topic
                    p = j + 2 + ((buf[j] << 8) | buf[j + 1])
                    acks.append(b"\x40\x02" + buf[p : p + 2])
            elif kind == 0x90:
                ready.value = 1
            elif kind == 0x20 and buf[j + 1] != 0:
                raise ConnectionError(f"broker refused the bulk consumer: reason {buf[j + 1]}")
            i = end
        buf = buf[i:]
        if acks:
            sock.sendall(b"".join(acks))
        count.value = n
        if pause_s:
            time.sleep(pause_s)
    with contextlib.suppress(OSError):
        sock.sendall(b"\xe0\x00")
    sock.close()


class BulkConsumer(_CountingProcess):
    """An MQTT 5 QoS 1 subscriber on a plain socket that only counts, in its own process:
    each read is parsed in one pass and all its PUBACKs go out in one write. The fastest
    Python MQTT intake measured here, the Python limit the gateway's intake could reach."""

    name = "bulk Python parser"

    def __init__(
        self,
        port: int,
        tls: Tls | None = None,
        topic: str = "devices/+/tx",
        receive_maximum: int = 1000,
        pause_s: float = BULK_READ_PAUSE_S,
    ) -> None:
        super().__init__(_bulk_consume, "bulk consumer", port, topic, receive_maximum, tls, pause_s)


# ---- mosquitto_sub: a C client --------------------------------------------------------

# mosquitto_sub makes three write system calls per QoS 1 message with its output on
# /dev/null: the PUBACK, the payload and the line end (measured with 2.0.11). The bench
# checks it after each phase: every published message has then been delivered.
MOSQUITTO_SUB_WRITES_PER_MESSAGE = 3


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def mosquitto_sub_path() -> str | None:
    for candidate in (shutil.which("mosquitto_sub"), "/usr/bin/mosquitto_sub"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _write_syscalls(pid: int) -> int:
    """The process's write system calls so far (/proc/PID/io, syscw)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise OSError(f"no syscw in /proc/{pid}/io")


class MosquittoSubConsumer:
    """`mosquitto_sub -q 1` (MQTT 5, the gateway's receive maximum) writing each payload to
    /dev/null: what a C client costs. It prints no count, so its messages are counted from
    the kernel's tally of its write system calls; `writes_per_message` is checked against
    the published total after a phase."""

    name = "mosquitto_sub (C)"

    def __init__(
        self,
        port: int,
        tls: Tls | None = None,
        topic: str = "devices/+/tx",
        receive_maximum: int = 1000,
    ) -> None:
        exe = mosquitto_sub_path()
        if exe is None:
            raise FileNotFoundError(
                "mosquitto_sub not found: install the Debian package mosquitto-clients"
            )
        self.port = port
        self.writes_per_message = float(MOSQUITTO_SUB_WRITES_PER_MESSAGE)
        self.argv = [exe, "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-q", "1"]
        self.argv += ["-t", topic, "-i", f"mosquitto-sub-{time.time_ns()}", "-k", "60"]
        self.argv += ["-D", "connect", "receive-maximum", str(receive_maximum)]
        if tls is not None:
            self.argv += ["--cafile", tls.ca_file]
            if tls.cert_file is not None:
                self.argv += ["--cert", tls.cert_file, "--key", str(tls.key_file)]
        self._proc: subprocess.Popen[bytes] | None = None
        self._base = 0

    def start(self, timeout: float = 20.0) -> None:
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        # Connected and subscribed: CONNECT and SUBSCRIBE written, then quiet.
        last, quiet_since = -1, time.monotonic()
        while True:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise ConnectionError("mosquitto_sub did not connect and subscribe")
            now_writes = _write_syscalls(self._proc.pid)
            if now_writes != last:
                last, quiet_since = now_writes, time.monotonic()
            elif now_writes >= 2 and time.monotonic() - quiet_since > 0.3:
                break
            time.sleep(0.02)
        self._base = last

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def writes(self) -> int:
        try:
            return _write_syscalls(self.pid) - self._base
        except OSError:
            return 0

    def count(self) -> int:
        return int(self.writes() / self.writes_per_message)

    def close(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)


def make_consumer(kind: str, port: int, tls: Tls | None = None) -> Consumer:
    """A bare consumer by kind: "paho", "bulk" or "mosquitto_sub"."""
    if kind == "paho":
        return BareConsumer(port, tls)
    if kind == "bulk":
        return BulkConsumer(port, tls)
    if kind == "mosquitto_sub":
        return MosquittoSubConsumer(port, tls)
    raise ValueError(f"unknown consumer {kind!r}")


def clear_session(
    port: int, client_id: str, tls: Tls | None = None, host: str = "127.0.0.1"
) -> None:
    """Drop a persistent session (and what the broker queued for it): clean start, expiry 0."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    if tls is not None:
        tls.apply(client)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    client.connect(host, port, keepalive=30, clean_start=True, properties=props)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while not client.is_connected() and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    client.disconnect()
