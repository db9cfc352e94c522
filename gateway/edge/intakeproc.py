"""MQTT intake in a process of its own.

Python runs one process's work on one core at a time. MQTT intake (paho's
parsing, decoding by firmware profile, the group commit, PUBACKs) is most of
the gateway's cost per message, so it runs in a child process beside the
parent that batches, signs, forwards and serves the API. The two share only
the spool, as DESIGN.md draws the stages: the child appends transactions and
acknowledges them once durable (promise 1 is unchanged, it lives in the spool
writer); the parent reads what is pending and cuts it into batches. SQLite's
WAL lets both write (the child transactions, the parent batches and receipts),
one transaction at a time; rowids stay monotonic across both.

The pipe between them carries small tuples.

child -> parent: ("started",) | ("fatal", exit_code, message) (at start, or an internal
    error later: the gateway stops with that code) | ("beat",) about every second while
    intake turns (its writer answers and messages in hand complete) |
    ("committed", max_rowid) after each group commit that stored rows |
    ("state", connected, subscribed, paused, inflight, stored, rejects) |
    ("counters", {(metric, labels): delta}) | ("groups", {group commit size: count}) |
    ("stopped",)
parent -> child: ("cursor", last batched rowid) | ("pause",) | ("resume",) |
    ("reload",) | ("dead_letter", reject_id, topic, message) | ("stop",)

The child dies with its parent (PR_SET_PDEATHSIG, and the pipe's end of file),
so a kill -9 of the gateway leaves no intake behind still holding the broker
session. It ignores SIGTERM, SIGINT and SIGHUP, which systemd sends to the whole
control group: the parent decides, and the child stops when told, after its
last group commit and PUBACKs.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from gateway.common import gctune
from gateway.common.errors import EXIT_SOFTWARE, GatewayError
from gateway.edge import metrics
from gateway.edge.config import GatewayConfig
from gateway.edge.poison import CrashRecord, Guard, exit_after

log = logging.getLogger("gateway.intake")
PROCESS_NAME = b"edge-gw-intake"
STATE_EVERY_S = 0.1
COUNTERS_EVERY_S = 0.5
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
BEAT_EVERY_S = 1.0
# Messages in hand that complete nothing for this long: intake is not turning, no beat.
IN_HAND_STUCK_S = 30.0
# After an internal error the child stops gracefully, or exits this much later anyway.
FATAL_EXIT_AFTER_S = 15.0
# Test-only fault hook, read by the intake processes and the gRPC intake: a payload holding
# these bytes raises in the spool writer path, so tests/hostile/test_intake_hostile.py can
# check that a bug stops the gateway (exit 70) and that the message is set aside as poison
# after two failures. Never set in production.
FAULT_ENV = "EDGE_GATEWAY_TEST_FAULT"
# Metrics the child counts; the parent adds the child's increments to its own.
CHILD_COUNTERS = (
    "received",
    "stored",
    "duplicates",
    "rejected",
    "rejects_not_stored",
    "dead_letters_published",
)


def crash_record(cfg: GatewayConfig) -> CrashRecord:
    """Where the gateway's processes record the messages intake failed with."""
    return CrashRecord(Path(f"{cfg.spool.path}.crashes"))


def fault_hook() -> bytes | None:
    """The test-only fault hook's bytes (FAULT_ENV), or None."""
    value = os.environ.get(FAULT_ENV)
    return value.encode("utf-8") if value else None


def profile_topics(cfg: GatewayConfig, profiles: Any) -> tuple[str, ...]:
    share = cfg.profiles.share_group if cfg.profiles else None
    return tuple(profiles.subscriptions(share))


def shared(topics: tuple[str, ...], group: str) -> tuple[str, ...]:
    """Filters as one MQTT 5 shared subscription: the broker hands each message to
    one session of the group."""
    return tuple(t if t.startswith("$share/") else f"$share/{group}/{t}" for t in topics)


def child_config(cfg: GatewayConfig, index: int) -> GatewayConfig:
    """Intake process `index` of mqtt.intake_processes: with more than one, each has its
    own persistent session (client id suffixed -0, -1, ...) in one shared subscription
    (profiles.share_group, or the gateway id)."""
    n = cfg.mqtt.intake_processes
    if n == 1:
        return cfg
    group = (cfg.profiles.share_group if cfg.profiles else None) or cfg.gateway_id
    mqtt = dataclasses.replace(
        cfg.mqtt, client_id=f"{cfg.mqtt.client_id}-{index}", topics=shared(cfg.mqtt.topics, group)
    )
    profiles = cfg.profiles
    if profiles is not None and profiles.share_group is None:
        profiles = dataclasses.replace(profiles, share_group=group)
    return dataclasses.replace(cfg, mqtt=mqtt, profiles=profiles)


# ---- child ------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, PROCESS_NAME)  # PR_SET_NAME: what ps, top and journald show
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(0)


def _counter_values() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for name in CHILD_COUNTERS:
        counter = getattr(metrics, name)
        for fam in counter.collect():
            for s in fam.samples:
                if s.name.endswith("_total"):
                    values[(name, tuple(sorted(s.labels.items())))] = s.value
    return values


class _Child:
    def __init__(self, cfg: GatewayConfig, conn: Connection, cursor: int, window: int) -> None:
        from gateway.edge.ingest import MqttIngest
        from gateway.edge.profiles import ProfileSet
        from gateway.edge.spool import Spool

        self.cfg = cfg
        self.conn = conn
        self.cursor = cursor
        self._send_lock = threading.Lock()
        self.failed = threading.Event()
        self.guard = Guard(crash_record(cfg), self._fatal, "intake")
        # Any thread of this process that dies of an exception is an intake failure.
        threading.excepthook = self.guard.thread_hook
        self.spool = Spool(cfg.spool, cfg.gateway_id)
        self.spool.on_fatal(self.guard.spool_hook)
        # The parent checked the file's integrity and schema before starting us.
        self.spool.open(check_integrity=False)
        self._stored0 = self.spool.stored
        self._rejects0 = self.spool.rejects
        self._groups_sent: dict[int, int] = {}
        self.profiles = ProfileSet.from_config(cfg)
        spool = self.spool
        self.mqtt = MqttIngest(
            cfg.mqtt,
            spool,
            self.profiles,
            lambda: max(0, spool.max_rowid - self.cursor),
            cfg.spool.max_depth,
            extra_topics=profile_topics(cfg, self.profiles),
            window=window,
            rejects=cfg.rejects,
            guard=self.guard,
            fault=fault_hook(),
        )
        spool.on_commit(lambda max_rowid: self.send(("committed", max_rowid)))
        self._probe: Future[None] | None = None
        self._next_beat = 0.0
        self._completed = -1
        self._turned_at = time.monotonic()

    def _fatal(self, message: str) -> None:
        """The guard's stop: tell the gateway (it stops, exit 70), then stop this intake
        gracefully from the control loop; exit anyway if that hangs."""
        with contextlib.suppress(OSError, ValueError):
            self.send(("fatal", EXIT_SOFTWARE, message))
        self.failed.set()
        exit_after(FATAL_EXIT_AFTER_S)

    def _beat(self) -> None:
        """("beat",) about every BEAT_EVERY_S while intake turns: the writer answered the
        last probe (an empty write, behind everything queued before it), and messages in
        hand completed within IN_HAND_STUCK_S. Idle, with nothing in hand, is turning."""
        now = time.monotonic()
        if now < self._next_beat:
            return
        self._next_beat = now + BEAT_EVERY_S
        m = self.mqtt
        if m.completed != self._completed or m.inflight == 0:
            self._completed = m.completed
            self._turned_at = now
        probe = self._probe
        if probe is not None and not probe.done():
            return
        self._probe = self.spool.write(lambda _c: None)
        if probe is not None and probe.exception() is not None:
            return
        if now - self._turned_at <= IN_HAND_STUCK_S:
            self.send(("beat",))

    def send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def _state(self) -> tuple[Any, ...]:
        m = self.mqtt
        return (
            "state",
            m.connected,
            m.subscribed.is_set(),
            m.paused,
            m.load() - max(0, self.spool.max_rowid - self.cursor),
            self.spool.stored - self._stored0,
            self.spool.rejects - self._rejects0,
        )

    def run(self) -> None:
        self.mqtt.start()
        self.send(("started",))
        last_state: tuple[Any, ...] = ()
        sent_counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        next_counters = 0.0
        while True:
            try:
                ready = self.conn.poll(STATE_EVERY_S)
                msg = self.conn.recv() if ready else None
            except (EOFError, OSError):
                log.error("gateway process gone; intake stops")
                self.mqtt.stop()
                return
            if msg is not None:
                kind = msg[0]
                if kind == "stop":
                    break
                self._handle(kind, msg)
            if self.failed.is_set():
                break
            self.mqtt.intake.flush_summaries()
            self._beat()
            state = self._state()
            if state != last_state:
                self.send(state)
                last_state = state
            if time.monotonic() >= next_counters:
                next_counters = time.monotonic() + COUNTERS_EVERY_S
                sent_counters = self._send_counters(sent_counters)
        # Graceful stop: take no new messages, let the last group commit and its PUBACKs
        # go out on this connection, then disconnect (paho writes them before DISCONNECT).
        # Rejects counted but not yet summarised are summarised now (published next start).
        self.mqtt.pause()
        self.mqtt.intake.flush_summaries(force=True)
        with contextlib.suppress(Exception):
            self.spool.write(lambda _c: None).result(STOP_TIMEOUT_S)
        self.mqtt.stop()
        self.spool.close(checkpoint=False)  # the parent, closing last, checkpoints
        self.send(self._state())
        self._send_counters(sent_counters)
        self.send(("stopped",))

    def _send_counters(
        self, sent: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        now = _counter_values()
        delta = {k: v - sent.get(k, 0.0) for k, v in now.items() if v != sent.get(k, 0.0)}
        if delta:
            self.send(("counters", delta))
        # Group commits happen here; the main process's histogram is the one scraped.
        groups = dict(self.spool.group_sizes)  # one C-level copy: the writer thread adds
        new = {n: c - self._groups_sent.get(n, 0) for n, c in groups.items()}
        new = {n: c for n, c in new.items() if c > 0}
        if new:
            self.send(("groups", new))
            self._groups_sent = groups
        return now

    def _handle(self, kind: str, msg: tuple[Any, ...]) -> None:
        if kind == "cursor":
            self.cursor = max(self.cursor, int(msg[1]))
            self.mqtt.release()
        elif kind == "pause":
            self.mqtt.pause()
        elif kind == "resume":
            self.mqtt.resume()
        elif kind == "reload":
            if self.profiles.try_reload(log):
                self.mqtt.resubscribe(profile_topics(self.cfg, self.profiles))
        elif kind == "dead_letter":
            self.mqtt.publish_dead_letter(int(msg[1]), str(msg[2]), bytes(msg[3]))


def child_main(
    cfg: GatewayConfig, conn: Connection, parent_pid: int, cursor: int, window: int
) -> None:
    _die_with_parent(parent_pid)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    from gateway.common import logs

    logs.configure(cfg.log_level)
    try:
        child = _Child(cfg, conn, cursor, window)
    except GatewayError as e:
        conn.send(("fatal", e.exit_code, str(e)))
        return
    gctune.settle_heap()
    child.run()


# ---- parent -----------------------------------------------------------------


class IntakeProcess:
    """The parent's handle on the intake child: what the service's monitor, drain and
    status read and call (load, paused, pause, resume, release, connected, stop)."""

    def __init__(
        self,
        cfg: GatewayConfig,
        index: int,
        cursor: Callable[[], int],
        depth: Callable[[], int],
        on_commit: Callable[[int], None],
        on_exit: Callable[[int, str], None],
        window: int,
    ) -> None:
        self.cfg = cfg
        self._cursor = cursor
        self._depth = depth
        self._on_commit = on_commit
        self._on_exit = on_exit
        self._window = window
        self.connected = False
        self.subscribed = threading.Event()
        self.paused = False
        self.inflight = 0
        self.stored = 0
        self.rejects = 0
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._stopping = False
        self._fatal: tuple[int, str] | None = None
        self.last_beat = time.monotonic()
        self._send_lock = threading.Lock()
        self._last_cursor = -1
        self._counters: dict[str, Counter] = {n: getattr(metrics, n) for n in CHILD_COUNTERS}
        ctx = multiprocessing.get_context("spawn")
        self._conn, self._child_conn = ctx.Pipe()
        self._proc = ctx.Process(
            target=child_main,
            args=(child_config(cfg, index), self._child_conn, os.getpid(), cursor(), window),
            name=f"edge-gateway-intake-{index}",
            daemon=True,
        )
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Start the child. Call from the main thread: the child's PR_SET_PDEATHSIG
        fires when the thread that started it ends."""
        self.last_beat = time.monotonic()
        self._proc.start()
        # multiprocessing's own exit hook would SIGTERM (ignored) and join forever.
        atexit.register(self._kill_if_alive)
        self._child_conn.close()
        self._reader = threading.Thread(target=self._read, name="intake-pipe", daemon=True)
        self._reader.start()

    def wait_started(self) -> None:
        """Block until the child runs (raises its start-up error, exit code and all)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._started.wait(0.05):
            if self._fatal is not None:
                code, message = self._fatal
                err = GatewayError(message)
                err.exit_code = code
                raise err
            if not self._proc.is_alive() and self._stopped.is_set():
                raise GatewayError(f"intake process exited at start (code {self._proc.exitcode})")
            if time.monotonic() > deadline:
                raise GatewayError(f"intake process did not start within {START_TIMEOUT_S:.0f} s")

    def _kill_if_alive(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "committed":
                self._on_commit(int(msg[1]))
            elif kind == "state":
                (_k, connected, subscribed, paused, inflight, stored, rejects) = msg
                self.connected = connected
                if subscribed:
                    self.subscribed.set()
                else:
                    self.subscribed.clear()
                self.paused = paused
                self.inflight = inflight
                self.stored = stored
                self.rejects = rejects
            elif kind == "counters":
                for (name, labels), delta in msg[1].items():
                    counter = self._counters[name]
                    (counter.labels(**dict(labels)) if labels else counter).inc(delta)
            elif kind == "groups":
                for size, count in msg[1].items():
                    for _ in range(int(count)):
                        metrics.group_commit_size.observe(int(size))
            elif kind == "beat":
                self.last_beat = time.monotonic()
            elif kind == "started":
                self._started.set()
            elif kind == "fatal":
                self._fatal = (int(msg[1]), str(msg[2]))
                if self._started.is_set() and not self._stopping:
                    # An internal error in intake (logged there, with its traceback): the
                    # gateway stops with its code; the child stops when told.
                    self._on_exit(*self._fatal)
            elif kind == "stopped":
                break
        self._stopped.set()
        self.connected = False
        self.subscribed.clear()
        if not self._stopping and self._started.is_set() and self._fatal is None:
            self._proc.join(5)
            code = self._proc.exitcode
            self._on_exit(EXIT_SOFTWARE, f"intake process exited unexpectedly (code {code})")

    def _send(self, msg: tuple[Any, ...]) -> None:
        if self._stopped.is_set():
            return
        with self._send_lock, contextlib.suppress(OSError, ValueError):
            self._conn.send(msg)

    # ---- what the service calls ----------------------------------------

    def load(self) -> int:
        """Transactions spooled but not batched, plus those on their way to the spool."""
        return self.load_of(self.inflight)

    def heartbeat(self) -> float:
        """When the child last said intake turns (monotonic)."""
        return self.last_beat

    def load_of(self, inflight: int) -> int:
        return self._depth() + inflight

    def pause(self) -> None:
        self.paused = True
        self._send(("pause",))

    def resume(self) -> None:
        self._send(("resume",))

    def release(self) -> None:
        """Tell the child where batching stands, so held messages can come in."""
        cursor = self._cursor()
        if cursor != self._last_cursor:
            self._last_cursor = cursor
            self._send(("cursor", cursor))

    def reload(self) -> None:
        self._send(("reload",))

    def dead_letter(self, reject_id: int, topic: str, message: bytes) -> None:
        """A reject the parent recorded (a gRPC submit): the child, which holds the
        broker connection, publishes it on the dead-letter topic and marks it published.
        If it cannot now, the row stays unpublished in the spool for the next connect."""
        self._send(("dead_letter", reject_id, topic, message))

    def stop_begin(self) -> None:
        """Ask the child to stop; stop() waits for it."""
        if not self._stopping:
            self._stopping = True
            if self._proc.is_alive():
                self._send(("stop",))

    def stop(self) -> None:
        """Stop intake: the child disconnects after its last group commit and PUBACKs;
        what it has not acknowledged stays with the broker."""
        if self._reader is None:  # never started (a later start step failed)
            self._stopping = True
            self._stopped.set()
            for conn in (self._conn, self._child_conn):
                with contextlib.suppress(OSError):
                    conn.close()
            return
        if self._stopping and not self._proc.is_alive():
            self._stopped.wait(STOP_TIMEOUT_S)
            return
        self.stop_begin()
        if self._proc.is_alive():
            if not self._stopped.wait(STOP_TIMEOUT_S):
                log.error("intake process did not stop within %.0f s; killing it", STOP_TIMEOUT_S)
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._conn.close()


class _AllSet:
    def __init__(self, events: list[threading.Event]) -> None:
        self._events = events

    def is_set(self) -> bool:
        return all(e.is_set() for e in self._events)


class IntakePool:
    """mqtt.intake_processes intake processes, seen by the service as one."""

    def __init__(self, procs: list[IntakeProcess]) -> None:
        self.procs = procs
        self.subscribed = _AllSet([p.subscribed for p in procs])

    @classmethod
    def create(
        cls,
        cfg: GatewayConfig,
        cursor: Callable[[], int],
        depth: Callable[[], int],
        on_commit: Callable[[int], None],
        on_exit: Callable[[int, str], None],
        window: int,
    ) -> IntakePool:
        n = cfg.mqtt.intake_processes
        return cls(
            [IntakeProcess(cfg, i, cursor, depth, on_commit, on_exit, window) for i in range(n)]
        )

    def start(self) -> None:
        for p in self.procs:
            p.start()

    def wait_started(self) -> None:
        for p in self.procs:
            p.wait_started()

    @property
    def connected(self) -> bool:
        return all(p.connected for p in self.procs)

    @property
    def paused(self) -> bool:
        return any(p.paused for p in self.procs)

    @property
    def stored(self) -> int:
        return sum(p.stored for p in self.procs)

    @property
    def rejects(self) -> int:
        return sum(p.rejects for p in self.procs)

    def load(self) -> int:
        return self.procs[0].load_of(sum(p.inflight for p in self.procs))

    def heartbeat(self) -> float:
        """The oldest of the intake processes' beats: one stuck process is enough."""
        return min(p.heartbeat() for p in self.procs)

    def pause(self) -> None:
        for p in self.procs:
            p.pause()

    def resume(self) -> None:
        for p in self.procs:
            p.resume()

    def release(self) -> None:
        for p in self.procs:
            p.release()

    def reload(self) -> None:
        for p in self.procs:
            p.reload()

    def dead_letter(self, reject_id: int, topic: str, message: bytes) -> None:
        self.procs[0].dead_letter(reject_id, topic, message)

    def stop(self) -> None:
        for p in self.procs:
            p.stop_begin()
        for p in self.procs:
            p.stop()
