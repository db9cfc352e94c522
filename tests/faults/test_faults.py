"""Zero loss under faults: each scenario injects a fault under load, heals it, drains,
then audits end to end: every acknowledged transaction committed at the quorum exactly
once, every ledger chain and inclusion proof verifying."""

from __future__ import annotations

import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest

from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.lab.sandbox import GatewayProc, Sandbox, SandboxError, free_port
from tests.conftest import Deployment, deploy
from tests.faults import harness
from tests.faults.conftest import FAULT_BATCH

pytestmark = pytest.mark.integration

FAST_RETRY = "call_timeout_s = 5"


def setup(sb: Sandbox, **kw: object) -> Deployment:
    kw.setdefault("batch", FAULT_BATCH)
    d = deploy(sb, **kw)  # type: ignore[arg-type]
    text = d.config.read_text().replace("call_timeout_s = 5", "call_timeout_s = 2")
    d.config.write_text(text)
    return d


def load_in_background(pub: harness.Publisher, total: int, rate: float) -> threading.Thread:
    t = threading.Thread(target=pub.publish, args=(total, rate), daemon=True)
    t.start()
    return t


def test_gateway_killed_repeatedly_under_load(sandbox: Sandbox) -> None:
    d = setup(sandbox)
    gw = d.start_gateway()
    pub = harness.Publisher(d.broker.port, "kill-load", devices=200, tls=d.sandbox.mqtt_tls())
    t = load_in_background(pub, 50_000, rate=2500)
    rng = random.Random(11)
    kills = 0
    while t.is_alive() and kills < 8:
        time.sleep(rng.uniform(0.7, 2.5))
        gw.proc.kill()
        kills += 1
        time.sleep(rng.uniform(0.0, 0.5))
        sandbox.start_gateway_again(gw)
    t.join(300)
    pub.close()
    assert kills >= 5
    t0 = time.monotonic()
    harness.wait_committed(gw, d.ledgers, pub.acked, timeout=120)
    a = harness.audit(gw, d.ledgers, pub.acked)
    assert a.acknowledged >= 49_000
    harness.record(f"gateway SIGKILL x{kills} during 50k", a, time.monotonic() - t0)


def test_sigterm_flushes_signs_and_exits_zero_within_bound(sandbox: Sandbox) -> None:
    d = setup(sandbox, batch="max_tx = 100000\nmax_age_s = 3600")
    gw = d.start_gateway()
    pub = harness.Publisher(d.broker.port, "term-load", devices=50, tls=d.sandbox.mqtt_tls())
    pub.publish(2000, rate=4000)
    pub.wait_acked()
    deadline = time.monotonic() + 30
    while harness.status(gw).transactions_stored < len(pub.acked) and time.monotonic() < deadline:
        time.sleep(0.1)
    t0 = time.monotonic()
    assert gw.proc.terminate(30) == 0
    took = time.monotonic() - t0
    assert took < 20
    sandbox.start_gateway_again(gw)
    a = harness.audit(gw, d.ledgers, pub.acked)
    pub.close()
    harness.record("gateway SIGTERM with open batch", a, took)


def test_one_of_three_ledger_nodes_down(sandbox: Sandbox) -> None:
    d = setup(sandbox)
    d.ledgers[2].proc.terminate()
    gw = d.start_gateway()
    pub = harness.Publisher(d.broker.port, "one-down", devices=100, tls=d.sandbox.mqtt_tls())
    pub.publish(5000, rate=3000)
    pub.close()
    t0 = time.monotonic()
    harness.wait_committed(gw, d.ledgers, pub.acked, timeout=60)
    st = harness.status(gw)
    assert {n.node_id: n.state for n in st.ledger_nodes}["ledger-3"] == "unreachable"
    # The node comes back and catches up from its head.
    sandbox.restart(d.ledgers[2].proc)
    harness.wait_all_nodes(gw, d.ledgers, pub.acked)
    a = harness.audit(gw, d.ledgers, pub.acked)
    assert a.per_node["ledger-3"] == len(pub.acked)
    harness.record("1 of 3 ledger nodes down", a, time.monotonic() - t0)


def test_all_ledger_nodes_down_for_20_seconds(sandbox: Sandbox) -> None:
    d = setup(sandbox)
    gw = d.start_gateway()
    for lg in d.ledgers:
        lg.proc.terminate()
    pub = harness.Publisher(d.broker.port, "all-down", devices=100, tls=d.sandbox.mqtt_tls())
    t = load_in_background(pub, 4000, rate=1000)
    proc = psutil.Process(gw.proc.proc.pid)  # type: ignore[union-attr]
    time.sleep(5)  # the load has finished by now; only the forwarder works
    t.join(30)
    cpu0 = sum(proc.cpu_times()[:2])
    time.sleep(10)
    idle_cpu = sum(proc.cpu_times()[:2]) - cpu0
    st = harness.status(gw)
    assert st.transactions_stored >= len(pub.acked) and st.last_committed_seq == -1
    assert all(n.state == "unreachable" for n in st.ledger_nodes)
    # No busy loop: backoff keeps the gateway nearly idle while nothing can be delivered.
    assert idle_cpu < 1.0, f"gateway used {idle_cpu:.2f} CPU s in 10 s with all ledgers down"
    time.sleep(4)
    for lg in d.ledgers:
        sandbox.restart(lg.proc)
    t0 = time.monotonic()
    harness.wait_committed(gw, d.ledgers, pub.acked, timeout=90)
    pub.close()
    harness.wait_all_nodes(gw, d.ledgers, pub.acked)
    a = harness.audit(gw, d.ledgers, pub.acked)
    assert all(v == len(pub.acked) for v in a.per_node.values())
    harness.record("all ledger nodes down 20 s", a, time.monotonic() - t0)


def test_ledger_node_returns_empty_and_is_resent_from_its_head(sandbox: Sandbox) -> None:
    d = setup(sandbox)
    gw = d.start_gateway()
    pub = harness.Publisher(d.broker.port, "empty-node", devices=100, tls=d.sandbox.mqtt_tls())
    pub.publish(3000, rate=3000)
    pub.wait_acked()
    harness.wait_committed(gw, d.ledgers, pub.acked, timeout=60)
    lg = d.ledgers[1]
    lg.proc.terminate()
    for suffix in ("", "-wal", "-shm"):
        Path(str(lg.db) + suffix).unlink(missing_ok=True)
    t0 = time.monotonic()
    sandbox.restart(lg.proc)
    pub.publish(2000, rate=3000)
    pub.close()
    harness.wait_committed(gw, d.ledgers, pub.acked, timeout=60)
    harness.wait_all_nodes(gw, d.ledgers, pub.acked)
    a = harness.audit(gw, d.ledgers, pub.acked)
    assert a.per_node["ledger-2"] == len(pub.acked)
    harness.record("ledger node lost its data", a, time.monotonic() - t0)


def test_a_split_view_at_a_ledger_node_is_reported_and_never_rewrites_the_log(
    sandbox: Sandbox,
) -> None:
    d = setup(sandbox)
    # A second process with this gateway's id and key but its own spool has ledger-3
    # alone cosign a different log: the split view a cloned box or restored backup makes.
    rogue = d.config.parent / "rogue.toml"
    text = d.config.read_text()
    spool_line = next(x for x in text.splitlines() if x.startswith("path = "))
    other_nodes = [lg for lg in d.ledgers[:2]]
    for lg in other_nodes:
        text = text.replace(f'{{ id = "{lg.node_id}", address = "{lg.address}" }},\n', "")
        text = text.replace(f'"{lg.node_id}" = "{lg.witness_vkey}"\n', "")
    text = (
        text.replace(spool_line, f'path = "{d.config.parent / "rogue-spool.db"}"')
        .replace("quorum = 2", "quorum = 1")
        .replace('topics = ["devices/+/tx"]', 'topics = ["rogue/+/tx"]')
        .replace('client_id = "edge-test-01"', 'client_id = "rogue"')
    )
    import re

    text = re.sub(
        r'listen = "127.0.0.1:\d+"', lambda _m: f'listen = "127.0.0.1:{free_port()}"', text
    )
    rogue.write_text(text)
    r = sandbox.gateway(d.gateway_id + "-rogue", rogue, d.public_key)
    with r.channel("admin") as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        stub.SubmitTransactions(
            gateway_pb2.SubmitTransactionsRequest(
                payloads=[
                    gateway_pb2.DevicePayload(device_id="x", payload=f'{{"seq": {i}}}'.encode())
                    for i in range(10)
                ]
            ),
            timeout=10,
        )
        deadline = time.monotonic() + 30
        while stub.GetStatus(gateway_pb2.GetStatusRequest(), timeout=5).last_committed_seq < 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert r.proc.terminate() == 0

    gw = d.start_gateway()
    pub = harness.Publisher(d.broker.port, "fork-load", devices=50, tls=d.sandbox.mqtt_tls())
    pub.publish(3000, rate=3000)
    pub.close()
    t0 = time.monotonic()
    harness.wait_committed(gw, d.ledgers, pub.acked, timeout=60)
    states = {n.node_id: n.state for n in harness.status(gw).ledger_nodes}
    assert states == {"ledger-1": "ok", "ledger-2": "ok", "ledger-3": "forked"}
    assert "LEDGER SPLIT VIEW" in gw.proc.log_text()
    a = harness.audit(gw, d.ledgers[:2], pub.acked)
    harness.record("ledger node cosigned a split view", a, time.monotonic() - t0)


def test_broker_restarted_mid_run(sandbox: Sandbox) -> None:
    d = setup(sandbox)
    gw = d.start_gateway()
    pub = harness.Publisher(d.broker.port, "broker-restart", devices=100, tls=d.sandbox.mqtt_tls())
    pub.publish(3000, rate=3000)
    pub.wait_acked()
    assert d.broker.terminate() == 0
    time.sleep(1.0)
    sandbox.restart(d.broker)
    t0 = time.monotonic()
    pub.publish(3000, rate=3000)
    pub.close()
    harness.wait_committed(gw, d.ledgers, pub.acked, timeout=60)
    a = harness.audit(gw, d.ledgers, pub.acked)
    harness.record("mosquitto restarted mid-run", a, time.monotonic() - t0)


def test_broker_unreachable_at_gateway_start(sandbox: Sandbox) -> None:
    d = setup(sandbox)
    d.broker.terminate()
    result: dict[str, object] = {}

    def start() -> None:
        try:
            result["gw"] = d.start_gateway()
        except SandboxError as e:
            result["error"] = e

    t = threading.Thread(target=start)
    t0 = time.monotonic()
    t.start()
    time.sleep(4)
    assert t.is_alive(), "the gateway must not be ready without its broker subscription"
    sandbox.restart(d.broker)
    t.join(60)
    assert "gw" in result, result
    gw = result["gw"]
    pub = harness.Publisher(d.broker.port, "late-broker", devices=20, tls=d.sandbox.mqtt_tls())
    pub.publish(1000, rate=2000)
    pub.close()
    harness.wait_committed(gw, d.ledgers, pub.acked, timeout=60)  # type: ignore[arg-type]
    a = harness.audit(gw, d.ledgers, pub.acked)  # type: ignore[arg-type]
    harness.record("broker unreachable at start", a, time.monotonic() - t0)


def test_hsm_token_missing_and_wrong_pin_stop_the_start(sandbox: Sandbox) -> None:
    d = setup(sandbox)
    cfg = d.config.read_text()
    bad = d.config.parent / "no-token.toml"
    bad.write_text(cfg.replace('token_label = "edge-gateway"', 'token_label = "absent"'))
    out = sandbox.run_gateway_once(bad)
    assert out.returncode == 69 and "no such token" in out.stderr
    assert "Traceback" not in out.stderr
    d.hsm.pin_file.write_text("999999\n")
    t0 = time.monotonic()
    out = sandbox.run_gateway_once(d.config)
    assert out.returncode == 77 and "not retried" in out.stderr
    assert time.monotonic() - t0 < 30  # one attempt, no retry loop


def test_spool_disk_nearly_full_pauses_intake_until_space_returns(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    mnt = tmp_path / "spoolfs"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert mounted.returncode == 0, (
        "the disk-full scenario mounts a 64 MiB tmpfs and needs root: " + mounted.stderr
    )
    try:
        d = setup(sandbox, spool_extra="min_free_bytes = 16777216")
        text = d.config.read_text()
        spool_line = next(x for x in text.splitlines() if x.startswith("path = "))
        d.config.write_text(text.replace(spool_line, f'path = "{mnt / "spool.db"}"'))
        gw = d.start_gateway()
        pub = harness.Publisher(d.broker.port, "disk-full", devices=50, tls=d.sandbox.mqtt_tls())
        pub.publish(1000, rate=2000)
        pub.wait_acked()
        harness.wait_committed(gw, d.ledgers, pub.acked, timeout=60)
        filler = mnt / "filler"
        free = shutil.disk_usage(mnt).free
        with filler.open("wb") as f:
            f.write(b"\0" * (free - 12 * 1024 * 1024))
        deadline = time.monotonic() + 15
        while not harness.status(gw).intake_paused and time.monotonic() < deadline:
            time.sleep(0.2)
        st = harness.status(gw)
        assert st.intake_paused and "disk" in st.intake_paused_reason
        with gw.channel("admin") as ch:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            h = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="edgegateway.v1.Intake"), timeout=5
            )
            assert h.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as e:
                gateway_pb2_grpc.GatewayServiceStub(ch).SubmitTransactions(
                    gateway_pb2.SubmitTransactionsRequest(
                        payloads=[gateway_pb2.DevicePayload(device_id="g", payload=b'{"seq": 1}')]
                    ),
                    timeout=5,
                )
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stored_before = harness.status(gw).transactions_stored
        pub.publish(1000, rate=2000)  # the broker holds these
        time.sleep(2)
        assert harness.status(gw).transactions_stored <= stored_before + 1000  # held, not lost
        t0 = time.monotonic()
        filler.unlink()
        harness.wait_committed(gw, d.ledgers, pub.acked, timeout=60)
        pub.close()
        a = harness.audit(gw, d.ledgers, pub.acked)
        assert not harness.status(gw).intake_paused
        harness.record("spool disk nearly full", a, time.monotonic() - t0)
        gw.proc.terminate()
    finally:
        sandbox.close()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_corrupt_spool_stops_the_start_with_exit_65(sandbox: Sandbox) -> None:
    d = setup(sandbox)
    gw = d.start_gateway()
    pub = harness.Publisher(d.broker.port, "corrupt", devices=20, tls=d.sandbox.mqtt_tls())
    pub.publish(2000, rate=3000)
    pub.close()
    harness.wait_committed(gw, d.ledgers, pub.acked, timeout=60)
    assert gw.proc.terminate() == 0
    subprocess.run(["sqlite3", "--version"], capture_output=True)  # informational only
    data = bytearray(gw.spool.read_bytes())
    for off in range(4096 * 2, len(data), 331):
        data[off] ^= 0x5A
    gw.spool.write_bytes(bytes(data))
    before = gw.spool.read_bytes()
    out = sandbox.run_gateway_once(d.config)
    assert out.returncode == 65, out.stderr
    assert "left untouched" in out.stderr and "Traceback" not in out.stderr
    assert gw.spool.read_bytes() == before


def _proxied(sandbox: Sandbox) -> tuple[Deployment, list[harness.Proxy]]:
    d = setup(sandbox)
    proxies = []
    text = d.config.read_text()
    for lg in d.ledgers[:2]:
        p = harness.Proxy(free_port(), lg.proc.port)
        p.start()
        proxies.append(p)
        text = text.replace(f'address = "{lg.address}"', f'address = "127.0.0.1:{p.listen_port}"')
    d.config.write_text(text)
    return d, proxies


def _ledger_fault_then_heal(
    sandbox: Sandbox,
    name: str,
    mode: str,
    count: int,
    fault_s: float,
    cut_after: int = 0,
    while_faulty: Callable[[GatewayProc], None] | None = None,
) -> None:
    """Publish `count` with the proxies in front of two ledger nodes in `mode` for `fault_s`,
    heal them, drain, audit and record the scenario as `name`."""
    d, proxies = _proxied(sandbox)
    try:
        gw = d.start_gateway()
        for p in proxies:
            p.set_mode(mode, cut_after=cut_after)
        pub = harness.Publisher(d.broker.port, mode, devices=50, tls=d.sandbox.mqtt_tls())
        pub.publish(count, rate=count)
        pub.wait_acked()
        time.sleep(fault_s)
        if while_faulty:
            while_faulty(gw)
        t0 = time.monotonic()
        for p in proxies:
            p.set_mode("pass")
        pub.close()
        harness.wait_committed(gw, d.ledgers, pub.acked, timeout=60)
        a = harness.audit(gw, d.ledgers, pub.acked)
        harness.record(name, a, time.monotonic() - t0)
    finally:
        for p in proxies:
            p.stop()


def test_ledger_calls_that_hang_hit_their_deadline_and_retry(sandbox: Sandbox) -> None:
    def nothing_committed_and_deadlines_seen(gw: GatewayProc) -> None:
        st = harness.status(gw)
        assert st.last_committed_seq == -1
        assert any("DEADLINE_EXCEEDED" in n.last_error for n in st.ledger_nodes), st

    # 5 s of hanging: several 2 s deadlines pass.
    _ledger_fault_then_heal(
        sandbox,
        "ledger calls hang (deadline)",
        "hang",
        count=2000,
        fault_s=5,
        while_faulty=nothing_committed_and_deadlines_seen,
    )


def test_connections_cut_mid_call_are_retried_and_absorbed(sandbox: Sandbox) -> None:
    _ledger_fault_then_heal(
        sandbox, "connections cut mid-call", "cut", count=3000, fault_s=3, cut_after=3000
    )


def test_same_device_seq_racing_on_grpc_and_mqtt_is_stored_once(sandbox: Sandbox) -> None:
    d = setup(sandbox)
    gw = d.start_gateway()
    bodies = [(f"race-{i % 20:02d}", i // 20 + 1) for i in range(2000)]

    def payload(dev: str, seq: int) -> bytes:
        return f'{{"seq": {seq}, "time": 1700000000000, "wh": {seq * 3}}}'.encode()

    c = sandbox.mqtt_client("race-mqtt")
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", d.broker.port)
    c.loop_start()
    acked_grpc: set[tuple[str, int]] = set()

    def via_grpc() -> None:
        with gw.channel("admin") as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            for k in range(0, len(bodies), 100):
                chunk = bodies[k : k + 100]
                resp = stub.SubmitTransactions(
                    gateway_pb2.SubmitTransactionsRequest(
                        payloads=[
                            gateway_pb2.DevicePayload(device_id=dv, payload=payload(dv, s))
                            for dv, s in chunk
                        ]
                    ),
                    timeout=30,
                )
                for (dv, s), r in zip(chunk, resp.results, strict=True):
                    assert r.outcome in (
                        gateway_pb2.SubmitResult.STORED,
                        gateway_pb2.SubmitResult.DUPLICATE,
                    )
                    acked_grpc.add((dv, s))

    t = threading.Thread(target=via_grpc)
    t.start()
    infos = [c.publish(f"devices/{dv}/tx", payload(dv, s), qos=1) for dv, s in bodies]
    for i in infos:
        i.wait_for_publish(30)
    t.join(60)
    c.disconnect()
    c.loop_stop()
    acked = set(bodies)
    assert acked_grpc == acked
    t0 = time.monotonic()
    harness.wait_committed(gw, d.ledgers, acked, timeout=60)
    st = harness.status(gw)
    assert st.transactions_stored == len(acked) and st.transactions_rejected == 0
    a = harness.audit(gw, d.ledgers, acked)
    harness.record("same (device, seq) on gRPC and MQTT", a, time.monotonic() - t0)
