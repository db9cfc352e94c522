"""The MQTT intake process: it lives and dies with the gateway, never on its own."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import psutil

from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.lab import simulate
from gateway.lab.sandbox import GatewayProc, Sandbox
from tests.conftest import deploy

INTAKE_NAME = "edge-gw-intake"


def intake_of(pid: int) -> psutil.Process:
    found = [p for p in psutil.Process(pid).children(recursive=True) if p.name() == INTAKE_NAME]
    assert len(found) == 1, f"expected one {INTAKE_NAME} child of {pid}, found {found}"
    return found[0]


def settled(gw: GatewayProc, stored: int, timeout: float = 60) -> gateway_pb2.GatewayStatus:
    """Status once at least `stored` transactions are spooled and every batch committed."""
    deadline = time.monotonic() + timeout
    with gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        while True:
            st: gateway_pb2.GatewayStatus = stub.GetStatus(
                gateway_pb2.GetStatusRequest(), timeout=5
            )
            if st.transactions_stored >= stored and st.last_committed_seq == st.last_signed_seq:
                return st
            assert time.monotonic() < deadline, f"not all committed: {st}"
            time.sleep(0.2)


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    return list(alive)


def test_kill_9_of_the_gateway_takes_its_intake_process_along(sandbox: Sandbox) -> None:
    """A kill -9 of the gateway must not leave an intake behind, holding the broker
    session and writing to the spool the next gateway opens."""
    d = deploy(sandbox)
    gw = d.start_gateway()
    assert gw.proc.proc is not None
    parent = psutil.Process(gw.proc.proc.pid)
    intake = intake_of(parent.pid)
    children = parent.children(recursive=True)
    gw.proc.kill()
    left = wait_gone(children, 10)
    assert not left, f"children outlived a SIGKILLed gateway: {left}"
    assert not intake.is_running()


def test_intake_death_stops_the_gateway_for_a_restart_and_loses_nothing(
    sandbox: Sandbox,
) -> None:
    d = deploy(sandbox, batch="max_tx = 100\nmax_age_s = 0.3")
    gw = d.start_gateway()
    assert gw.proc.proc is not None
    opts = simulate.SimulateOptions(
        port=d.broker.port, devices=20, count=50, rate=2000, seconds=60, start_seq=1
    )
    first = asyncio.run(simulate.run(sandbox.simulate_options(opts)))
    assert first.acknowledged == 1000
    intake_of(gw.proc.proc.pid).kill()
    gw.proc.proc.wait(30)
    assert gw.proc.proc.returncode == 70, gw.proc.log_text()[-2000:]
    assert "intake process exited unexpectedly" in gw.proc.log_text()
    assert "Traceback" not in gw.proc.log_text()

    # The next start (systemd's Restart=on-failure) carries on from the spool.
    gw2 = d.start_gateway()
    more = dataclasses.replace(opts, start_seq=51)
    second = asyncio.run(simulate.run(sandbox.simulate_options(more)))
    assert second.acknowledged == 1000
    assert settled(gw2, 2000).transactions_stored == 2000
    assert gw2.proc.terminate() == 0


def test_two_intake_processes_share_the_subscription_and_store_each_message_once(
    sandbox: Sandbox,
) -> None:
    d = deploy(sandbox, batch="max_tx = 200\nmax_age_s = 0.3")
    d.config.write_text(
        d.config.read_text().replace("intake_processes = 1", "intake_processes = 2")
    )
    gw = d.start_gateway()
    assert gw.proc.proc is not None
    intakes = [
        p
        for p in psutil.Process(gw.proc.proc.pid).children(recursive=True)
        if p.name() == INTAKE_NAME
    ]
    assert len(intakes) == 2
    opts = simulate.SimulateOptions(
        port=d.broker.port, devices=50, count=60, rate=3000, seconds=60, start_seq=1
    )
    res = asyncio.run(simulate.run(sandbox.simulate_options(opts)))
    assert res.acknowledged == 3000
    # Each message reached one of the two sessions and was stored once.
    assert settled(gw, 3000).transactions_stored == 3000
    assert gw.proc.terminate() == 0
    log = gw.proc.log_text()
    assert "Traceback" not in log


def test_a_start_that_fails_after_the_intake_is_made_exits_at_once(sandbox: Sandbox) -> None:
    """The API port is taken: the start fails after the intake processes were set up but
    before they started; the gateway says so and exits 78 without waiting on them."""
    import socket
    import tomllib

    d = deploy(sandbox)
    port = int(tomllib.loads(d.config.read_text())["api"]["listen"].rpartition(":")[2])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        t0 = time.monotonic()
        out = sandbox.run_gateway_once(d.config)
    assert out.returncode == 78, out.stdout[-2000:] + out.stderr[-2000:]
    assert time.monotonic() - t0 < 15
    assert "address in use" in out.stderr and "Traceback" not in out.stderr + out.stdout
