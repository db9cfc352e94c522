"""The gateway as a service: sd_notify protocol, watchdog, metrics and log hygiene."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.lab import demo, simulate
from gateway.lab.sandbox import TEST_PIN, Proc, Sandbox
from tests.conftest import deploy

pytestmark = pytest.mark.integration

LOGFMT = re.compile(
    r'^ts=\S+Z level=(debug|info|warning|error) logger=\S+ msg=("([^"\\]|\\.)*"|\S+)'
)


def recv_until(sock: socket.socket, want: str, timeout: float, seen: list[str]) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            continue
        seen.append(msg)
        if want in msg.split("\n"):
            return msg
    raise AssertionError(f"no {want!r} within {timeout} s; got {seen[-5:]}")


def test_notify_protocol_watchdog_metrics_and_logs(sandbox: Sandbox, tmp_path: Path) -> None:
    d = deploy(sandbox, batch="max_tx = 500\nmax_age_s = 0.5")
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    env = dict(sandbox.env, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="2000000")
    proc = Proc(
        "gw",
        [sandbox.python, "-m", "gateway", "run", "--config", str(d.config)],
        tmp_path / "gw.log",
        env,
    )
    proc.start()
    sandbox.procs.append(proc)
    seen: list[str] = []
    try:
        ready = recv_until(sock, "READY=1", 60, seen)
        assert "STATUS=" in ready
        assert not any("WATCHDOG=1" in m for m in seen[:-1]), "pinged before ready"
        recv_until(sock, "WATCHDOG=1", 5, seen)
        t0 = time.monotonic()
        recv_until(sock, "WATCHDOG=1", 5, seen)
        assert time.monotonic() - t0 < 2.5  # half of WATCHDOG_USEC, as systemd advises

        opts = simulate.SimulateOptions(
            port=d.broker.port,
            devices=10,
            count=20,
            rate=2000,
            seconds=60,
            bad_ratio=0.1,
            start_seq=1,
        )
        res = asyncio.run(simulate.run(sandbox.simulate_options(opts)))
        deadline = time.monotonic() + 60
        status = ""
        while time.monotonic() < deadline:
            msg = sock.recv(4096).decode() if _readable(sock) else ""
            if msg.startswith("STATUS=stored ") and "committed seq" in msg:
                status = msg
                if "depth 0" in msg and f"stored {res.acknowledged - res.bad_published}" in msg:
                    break
        assert status, "no STATUS= summary line"

        import tomllib

        listen = tomllib.loads(d.config.read_text())["metrics"]["listen"]
        text = urllib.request.urlopen(f"http://{listen}/metrics", timeout=10).read().decode()
        for name in (
            'edge_gateway_stored_total{channel="mqtt"}',
            'edge_gateway_rejected_total{channel="mqtt",reason=',
            "edge_gateway_batch_transactions_bucket",
            "edge_gateway_hsm_sign_seconds_count",
            'edge_gateway_forward_seconds_count{node="ledger-1"}',
            "edge_gateway_publish_to_commit_seconds_bucket",
            "edge_gateway_spool_depth",
            "edge_gateway_oldest_pending_seconds",
            "edge_gateway_process_rss_bytes",
            "edge_gateway_process_open_fds",
            "edge_gateway_spool_disk_free_bytes",
            "edge_gateway_mqtt_connected 1.0",
        ):
            assert name in text, f"{name} missing from /metrics"
        stored = float(re.search(r'edge_gateway_stored_total\{channel="mqtt"\} (\S+)', text)[1])  # type: ignore[index]
        assert stored == res.acknowledged - res.bad_published

        proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        recv_until(sock, "RELOADING=1", 10, seen)
        recv_until(sock, "READY=1", 10, seen)
        proc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        recv_until(sock, "STOPPING=1", 10, seen)
        assert proc.proc.wait(30) == 0  # type: ignore[union-attr]
    finally:
        sock.close()
        if proc.alive():
            proc.kill()

    lines = proc.log_text().splitlines()
    assert lines
    for line in lines:
        assert LOGFMT.match(line), f"not a logfmt event: {line!r}"
        assert TEST_PIN not in line
    assert demo.spool_figures  # the spool is the only place payload fields live


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0.2)[0])
