"""One gateway per spool: a second `run` on the same configuration stops at once with
exit 75 and one line, before it reads the PIN, opens the spool or binds a port."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import psutil
import pytest

from gateway.edge.intakeproc import PROCESS_NAME
from gateway.lab import demo, simulate
from gateway.lab.sandbox import Sandbox
from tests.conftest import Deployment, deploy

pytestmark = pytest.mark.integration


def spool_files(spool: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of the spool and its WAL: what a second writer would change."""
    out = {}
    for p in (spool, Path(f"{spool}-wal")):
        if p.exists():
            st = p.stat()
            out[p.name] = (st.st_size, st.st_mtime_ns)
    return out


def holds(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open."""
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd) == str(path):
                return True
        except FileNotFoundError:
            continue
    return False


def load(d: Deployment, start_seq: int) -> simulate.SimulateResult:
    opts = simulate.SimulateOptions(
        port=d.broker.port, devices=5, count=20, rate=5000, seconds=60, start_seq=start_seq
    )
    return asyncio.run(simulate.run(d.sandbox.simulate_options(opts)))


def test_second_gateway_on_the_same_spool_exits_75_and_the_first_keeps_serving(
    sandbox: Sandbox,
) -> None:
    d = deploy(sandbox)
    gw = d.start_gateway()
    assert gw.proc.proc is not None
    first_pid = gw.proc.proc.pid
    assert load(d, 1).acknowledged == 100
    before = demo.wait_drained(gw, 100, timeout=60)
    assert before.last_signed_seq >= 0
    files = spool_files(gw.spool)

    t0 = time.monotonic()
    out = sandbox.run_gateway_once(d.config, timeout=30)
    took = time.monotonic() - t0

    assert out.returncode == 75, out.stdout[-2000:] + out.stderr[-2000:]
    assert took < 10
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert str(gw.spool) in lines[0] and f"pid {first_pid}" in lines[0]
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stdout == ""  # stopped before logging anything: no HSM, spool or API

    # The first gateway still serves, its spool untouched by the second.
    assert gw.proc.alive()
    assert spool_files(gw.spool) == files
    after = demo.gateway_status(gw)
    assert (after.transactions_stored, after.last_signed_seq) == (
        before.transactions_stored,
        before.last_signed_seq,
    )
    assert load(d, 1000).acknowledged == 100
    assert demo.wait_drained(gw, 200, timeout=60).transactions_stored == 200

    # The lock is the main process's alone: the intake process never holds it, so a
    # gateway killed with SIGKILL leaves nothing behind that keeps the next start out.
    lock = Path(f"{gw.spool}.instance")
    assert holds(first_pid, lock)
    intakes = [
        p
        for p in psutil.Process(first_pid).children(recursive=True)
        if p.name() == PROCESS_NAME.decode()
    ]
    assert intakes and not any(holds(p.pid, lock) for p in intakes)
    gw.proc.kill()
    sandbox.start_gateway_again(gw)
    assert gw.proc.proc.pid != first_pid
    assert demo.gateway_status(gw).transactions_stored == 200
    assert gw.proc.terminate(30) == 0
