"""The gateway's CPU per transaction by stage, for the bench.

The kernel counts CPU time per thread exactly (psutil); a sampling profiler
(py-spy, attached from outside without pausing the gateway) says what each
thread's Python stack was doing. Each thread's measured CPU is split over the
stages in proportion to its samples, so the figures add up to what the
processes really used. Threads with no Python frames (gRPC's C core, for one)
are never sampled: their CPU is reported as such, not guessed at.

A sample's stage is the innermost frame that belongs to a known part of the
gateway or of its MQTT client, so a JSON parse called from a firmware profile
counts as decode, and a SQLite commit called from the spool as spool.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# Innermost matching frame wins; checked in this order for each frame. Helpers (hashing,
# canonical JSON, checkpoint notes) count for the stage that called them, if any did.
DECODE = "decode"
SPOOL = "spool"
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (DECODE, ("/gateway/edge/profiles/",)),
    (SPOOL, ("/gateway/edge/spool.py",)),
    ("batch, Merkle, sign", ("/gateway/edge/batcher.py", "/gateway/edge/signer.py", "/pkcs11/")),
    ("forward", ("/gateway/edge/forwarder.py",)),
    ("API, metrics", ("/gateway/edge/api.py", "/gateway/edge/metrics.py", "/prometheus_client/")),
    ("MQTT client library", ("/paho/", "/aiomqtt/", "/gateway/edge/mqttrx.py")),
    (
        "intake hand-off",
        ("/gateway/edge/ingest.py", "/gateway/edge/intakeproc.py", "/gateway/edge/poison.py"),
    ),
    ("other gateway code", ("/gateway/",)),
)
# Where every thread starts: alone on a stack they say nothing about the stage (an event
# loop waiting or scheduling, a pool thread between tasks).
ENTRY_POINTS = ("/gateway/edge/service.py", "/gateway/cli.py", "/gateway/__main__.py")
HELPERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (DECODE, ("/gateway/formats/canonical.py",)),
    (
        "batch, Merkle, sign",
        (
            "/gateway/formats/merkle.py",
            "/gateway/formats/checkpoint.py",
            "/gateway/formats/note.py",
            "/gateway/formats/batchformat.py",
        ),
    ),
)
# The spool's writer thread (group commit) apart from callers queueing rows for it.
SPOOL_WRITER_THREAD = "spool-writer"
SPOOL_READER_THREADS = "spool-read"
RUNTIME = "runtime (event loop, gRPC, threads)"
NATIVE = "threads without Python frames"

_FRAME_FILE = re.compile(r"\((/[^:()]*):\d+\)$")
_LINE = re.compile(r"^((?:process \d+:\"[^\"]*\";)+)thread \((\d+)\): ([^;]*)(.*) (\d+)$")
_PROCESS = re.compile(r"process (\d+):")


def _match(path: str, table: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    for stage, parts in table:
        if any(part in path for part in parts):
            return stage
    return None


def stage_of(frames: list[str], thread: str = "") -> str:
    """The stage of one stack, frames from the outermost to the innermost."""
    helper: str | None = None
    for frame in reversed(frames):
        m = _FRAME_FILE.search(frame)
        if m is None:
            continue
        path = m.group(1)
        if any(entry in path for entry in ENTRY_POINTS):
            continue
        as_helper = _match(path, HELPERS)
        if as_helper is not None:
            helper = helper or as_helper
            continue
        stage = _match(path, STAGES)
        if stage is None:
            continue
        if stage == SPOOL:
            if thread == SPOOL_WRITER_THREAD:
                return "spool writer (insert, commit)"
            if thread.startswith(SPOOL_READER_THREADS):
                return "spool reads"
            return "spool calls (queueing rows, answers)"
        return stage
    return helper or RUNTIME


def parse_raw(text: str) -> dict[tuple[int, int], Counter[str]]:
    """py-spy's raw output (--threads --subprocesses) -> samples by (pid, tid) and stage."""
    out: dict[tuple[int, int], Counter[str]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        pid = int(_PROCESS.findall(m.group(1))[-1])
        tid = int(m.group(2))
        frames = [f for f in m.group(4).split(";") if f]
        stage = stage_of(frames, m.group(3))
        out.setdefault((pid, tid), Counter())[stage] += int(m.group(5))
    return out


def thread_cpu(pids: list[int]) -> dict[tuple[int, int], float]:
    """CPU seconds of every thread of these processes, by (pid, tid)."""
    out: dict[tuple[int, int], float] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for t in psutil.Process(pid).threads():
                out[(pid, t.id)] = t.user_time + t.system_time
    return out


def py_spy_path() -> str | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return exe if os.access(exe, os.X_OK) else None


@dataclass
class StageProfile:
    """CPU seconds by process role and stage over one window."""

    seconds: float = 0.0
    by_role: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: int = 0
    note: str = ""

    def per_tx_us(self, transactions: int) -> dict[str, dict[str, float]]:
        if transactions <= 0:
            return {}
        return {
            role: {
                stage: round(cpu / transactions * 1e6, 1)
                for stage, cpu in sorted(stages.items(), key=lambda kv: -kv[1])
            }
            for role, stages in self.by_role.items()
        }


class StageSampler:
    """Samples the gateway (and its child processes) between start() and stop()."""

    def __init__(self, pid: int, roles: dict[int, str], out: Path, rate_hz: int = 100) -> None:
        self.pid = pid
        self.roles = roles  # pid -> "main" / "intake" / "other"
        self.out = out
        self.rate_hz = rate_hz
        self._proc: subprocess.Popen[bytes] | None = None
        self._t0 = 0.0
        self._cpu0: dict[tuple[int, int], float] = {}

    def start(self, seconds: float) -> bool:
        exe = py_spy_path()
        if exe is None:
            return False
        argv = [exe, "record", "-p", str(self.pid), "-d", str(max(1, round(seconds)))]
        argv += ["-r", str(self.rate_hz), "--threads", "--subprocesses", "--nonblocking"]
        argv += ["--full-filenames", "--format", "raw", "-o", str(self.out)]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._t0 = time.monotonic()
        self._cpu0 = thread_cpu(list(self.roles))
        return True

    def stop(self, timeout: float = 30.0) -> StageProfile:
        cpu1 = thread_cpu(list(self.roles))
        span = time.monotonic() - self._t0
        prof = StageProfile(seconds=span)
        if self._proc is None:
            prof.note = "py-spy not installed"
            return prof
        try:
            _out, err = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.send_signal(signal.SIGINT)
            _out, err = self._proc.communicate(timeout=10)
        try:
            samples = parse_raw(self.out.read_text())
        except OSError:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
            prof.note = "py-spy wrote no profile" + (f": {tail[0]}" if tail else "")
            samples = {}
        prof.samples = sum(sum(c.values()) for c in samples.values())
        for key, cpu in cpu1.items():
            used = cpu - self._cpu0.get(key, 0.0)
            if used <= 0:
                continue
            role = self.roles.get(key[0], "other")
            stages = prof.by_role.setdefault(role, {})
            seen = samples.get(key)
            total = sum(seen.values()) if seen else 0
            if not seen or total == 0:
                stages[NATIVE] = stages.get(NATIVE, 0.0) + used
                continue
            for stage, n in seen.items():
                stages[stage] = stages.get(stage, 0.0) + used * n / total
        return prof

    def close(self) -> None:
        """End py-spy if it still runs (a window cut short)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
