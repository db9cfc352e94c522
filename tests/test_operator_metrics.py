"""The metrics an operator alerts on, scraped from a running gateway's /metrics: group
commit sizes (counted in the intake process, served by the main one), the signed and
committed seqs right after a restart, each ledger node's state, the quorum, the HSM,
build info and start time."""

from __future__ import annotations

import asyncio
import platform
import time
import tomllib
import urllib.request

import pytest

from gateway import __version__
from gateway.lab import demo, simulate
from gateway.lab.sandbox import GatewayProc, Sandbox
from tests.conftest import Deployment, deploy

pytestmark = pytest.mark.integration

STATES = ("connecting", "ok", "resyncing", "unreachable", "refused", "forked")


def scrape(d: Deployment) -> dict[str, float]:
    """Every sample of /metrics as {'name{labels}': value}."""
    listen = tomllib.loads(d.config.read_text())["metrics"]["listen"]
    text = urllib.request.urlopen(f"http://{listen}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def node_states(m: dict[str, float], node: str) -> dict[str, float]:
    return {s: m[f'edge_gateway_ledger_node_state{{node="{node}",state="{s}"}}'] for s in STATES}


def wait_metric(d: Deployment, want: dict[str, float], timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    m = scrape(d)
    while time.monotonic() < deadline:
        m = scrape(d)
        if all(m.get(k) == v for k, v in want.items()):
            return m
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {want}; got { {k: m.get(k) for k in want} }")


def load(d: Deployment, start_seq: int, count: int = 50) -> None:
    opts = simulate.SimulateOptions(
        port=d.broker.port, devices=4, count=count, rate=5000, seconds=60, start_seq=start_seq
    )
    res = asyncio.run(simulate.run(d.sandbox.simulate_options(opts)))
    assert res.acknowledged == 4 * count, res.line()


def ok_nodes(gw: GatewayProc) -> int:
    return sum(1 for n in demo.gateway_status(gw).ledger_nodes if n.state == "ok")


def test_metrics_an_operator_alerts_on(sandbox: Sandbox) -> None:
    d = deploy(sandbox)
    started = time.time()
    gw = d.start_gateway()
    load(d, 1)
    demo.wait_drained(gw, 200, timeout=60)
    # Group commits happen in the intake process; the main process serves their sizes
    # (handed over every half second), every stored transaction in exactly one group.
    m = wait_metric(
        d,
        {"edge_gateway_ledger_nodes_ok": 3.0, "edge_gateway_group_commit_size_sum": 200.0},
        timeout=30,
    )
    assert m["edge_gateway_group_commit_size_count"] > 0
    assert (
        m['edge_gateway_group_commit_size_bucket{le="+Inf"}']
        == m["edge_gateway_group_commit_size_count"]
    )
    assert m["edge_gateway_forwarder_quorum"] == 2
    for node in ("ledger-1", "ledger-2", "ledger-3"):
        assert node_states(m, node) == {s: float(s == "ok") for s in STATES}
    assert m["edge_gateway_hsm_up"] == 1
    python = platform.python_version()
    info = f'edge_gateway_build_info{{python="{python}",version="{__version__}"}}'
    assert m[info] == 1
    assert started - 1 <= m["edge_gateway_start_time_seconds"] <= time.time()

    # A node down: its state follows, nodes ok drops; back up, it is logged once.
    d.ledgers[2].proc.terminate()
    load(d, 1000)
    m = wait_metric(
        d,
        {
            'edge_gateway_ledger_node_state{node="ledger-3",state="unreachable"}': 1.0,
            'edge_gateway_ledger_node_state{node="ledger-3",state="ok"}': 0.0,
            "edge_gateway_ledger_nodes_ok": 2.0,
        },
        timeout=30,
    )
    assert sum(node_states(m, "ledger-3").values()) == 1
    assert ok_nodes(gw) == 2
    sandbox.restart(d.ledgers[2].proc)
    wait_metric(d, {"edge_gateway_ledger_nodes_ok": 3.0}, timeout=30)
    deadline = time.monotonic() + 10
    while "reachable again" not in gw.proc.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    again = [ln for ln in gw.proc.log_text().splitlines() if "reachable again" in ln]
    assert len(again) == 1, again
    assert "ledger node ledger-3 reachable again at" in again[0]
    assert "level=info" in again[0]
    st = demo.wait_drained(gw, 400, timeout=60)

    # Right after a restart, before anything new is signed: the seqs from the spool.
    assert gw.proc.terminate(30) == 0
    sandbox.start_gateway_again(gw)
    st = demo.gateway_status(gw)
    assert st.last_signed_seq >= 1 and st.last_committed_seq == st.last_signed_seq
    m = scrape(d)
    assert m["edge_gateway_last_signed_seq"] == st.last_signed_seq
    assert m["edge_gateway_last_committed_seq"] == st.last_committed_seq
    assert gw.proc.terminate(30) == 0


def test_status_json_and_exit_code_follow_the_gateway_health(sandbox: Sandbox) -> None:
    """`status --json` is one object of the status fields; exit 0 healthy, 2 degraded
    (the reasons on one stderr line), 69 unreachable."""
    import json
    import subprocess
    import sys

    d = deploy(sandbox)
    gw = d.start_gateway()

    def status(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "status",
                "--address",
                gw.api_address,
                *gw.cli_args("reader"),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=sandbox.env,
        )

    deadline = time.monotonic() + 30
    while ok_nodes(gw) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    out = status("--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["gateway_id"] == d.gateway_id and doc["quorum"] == 2
    assert doc["last_signed_seq"] == -1 and doc["mqtt_connected"] is True
    assert [n["state"] for n in doc["ledger_nodes"]] == ["ok", "ok", "ok"]
    assert out.stderr == ""

    d.broker.terminate()
    deadline = time.monotonic() + 30
    while demo.gateway_status(gw).mqtt_connected and time.monotonic() < deadline:
        time.sleep(0.2)
    out = status()
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "degraded" in lines[0] and "mqtt disconnected" in lines[0]
    assert "mqtt" in out.stdout and "disconnected" in out.stdout  # the table still printed

    assert gw.proc.terminate(30) == 0
    out = status("--json")
    assert out.returncode == 69, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "unreachable" in out.stderr
    assert out.stdout == ""
