"""Intake never dies quietly: a device id no profile allows is refused before anything is
built from it, a dead letter never goes to a topic MQTT would refuse, and a bug in intake
stops the gateway (exit 70, logged once) instead of stalling it, with the message that
caused it set aside as `poison` after two failures. Real Mosquitto, SoftHSM, ledger node."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time

import grpc
import psutil
import pytest

from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.edge.profiles import REASONS
from gateway.edge.spool import now_ms
from gateway.lab.demo import gateway_status, wait_drained
from gateway.lab.sandbox import GatewayProc, Sandbox, SandboxError
from tests.conftest import deploy
from tests.mqttkit import REJECT_PREFIX, dead_letters, device, spool_rows, wait_until
from tests.test_intake_process import INTAKE_NAME, intake_of

pytestmark = pytest.mark.integration

INVALID_TOPIC = f"{REJECT_PREFIX}/_invalid"


def tx(seq: int, **extra: object) -> bytes:
    return json.dumps({"seq": seq, "kw": 1, **extra}).encode()


def test_a_65000_character_device_id_is_refused_and_intake_keeps_serving(
    sandbox: Sandbox,
) -> None:
    d = deploy(sandbox, nodes=1, quorum=1, batch="max_tx = 100\nmax_age_s = 0.3")
    gw = d.start_gateway()
    # 65,000 characters, and the longest id a topic can carry to the gateway (65,535 bytes in
    # all, with the broker's mount point if its device listener has one), whose
    # `<prefix>/<id>` dead-letter topic would be past MQTT's limit.
    login = getattr(sandbox, "broker_logins", {}).get(d.broker.port)
    mount = len(getattr(login, "mount_point", ""))
    longest = 65_535 - len("devices//tx") - mount
    assert mount + len(f"{REJECT_PREFIX}/") + longest > 65_535
    ids = ["d" * 65_000, "e" * longest]
    with dead_letters(sandbox, d.broker.port) as dl, device(sandbox, d.broker.port) as dev:
        for long_id in ids:
            dev.publish(f"devices/{long_id}/tx", tx(1))
        for seq in range(1, 21):
            dev.publish("devices/dev-after/tx", tx(seq))
        letters = dl.wait_for(lambda _t, doc: doc["reason"] == "bad_device_id", count=2)
        assert len(letters) == 2
        for long_id, (topic, letter, size) in zip(ids, letters, strict=True):
            assert topic == INVALID_TOPIC
            assert letter["device"] == "_invalid"
            assert letter["device_sha256"] == hashlib.sha256(long_id.encode()).hexdigest()
            assert letter["device_prefix"] == long_id[:64]
            assert letter["device_size"] == len(long_id)
            assert len(letter["topic"]) == 256
            assert letter["topic_size"] == len(long_id) + len("devices//tx")
            assert size < 2048, f"a dead letter of {size} bytes"
        # Later messages are committed: intake kept serving.
        st = wait_drained(gw, 20, timeout=60)
        assert st.transactions_stored == 20 and st.transactions_rejected == 2
        assert st.mqtt_connected
    # What the spool keeps of them is bounded too.
    rows = spool_rows(gw.spool, "SELECT device_id, topic, length(message) FROM reject")
    assert [(r[0], r[1]) for r in rows] == [("_invalid", INVALID_TOPIC)] * 2
    assert all(r[2] < 2048 for r in rows)
    t0 = time.monotonic()
    assert gw.proc.terminate(30) == 0
    assert time.monotonic() - t0 < 10, "the stop was not graceful"
    log = gw.proc.log_text()
    assert "Traceback" not in log and "internal error" not in log


def test_wildcards_nul_and_over_long_device_ids_over_grpc_are_refused_per_item(
    sandbox: Sandbox,
) -> None:
    d = deploy(sandbox, nodes=1, quorum=1, batch="max_tx = 100\nmax_age_s = 0.3")
    gw = d.start_gateway()
    assert gw.proc.proc is not None
    intake = intake_of(gw.proc.proc.pid)
    hostile = ["+", "#", "dev+1", "a/#", "nul\x00id", "x" * 129, "y" * 65_000, "new\nline", " "]
    with dead_letters(sandbox, d.broker.port) as dl, gw.channel("admin") as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        payloads = [gateway_pb2.DevicePayload(device_id=i, payload=tx(1)) for i in hostile]
        payloads.append(gateway_pb2.DevicePayload(device_id="grpc-ok-1", payload=tx(1)))
        resp = stub.SubmitTransactions(
            gateway_pb2.SubmitTransactionsRequest(payloads=payloads), timeout=30
        )
        *refused, ok = resp.results
        assert ok.outcome == gateway_pb2.SubmitResult.STORED, ok
        for dev_id, r in zip(hostile, refused, strict=True):
            assert r.outcome == gateway_pb2.SubmitResult.REJECTED, (dev_id[:20], r)
            assert r.reason == "bad_device_id", (dev_id[:20], r)
            assert len(r.detail) < 200
        # Every one on the fixed topic, none lost, the intake process (which publishes
        # them) alive and still connected.
        letters = dl.wait_for(lambda t, _d: t == INVALID_TOPIC, count=len(hostile))
        assert len(letters) == len(hostile)
        sha = {hashlib.sha256(i.encode()).hexdigest() for i in hostile}
        assert {doc["device_sha256"] for _t, doc, _n in letters} == sha
        assert intake.is_running() and intake.status() != psutil.STATUS_ZOMBIE
        # The same ids as a topic's device level, and the call once more: still serving.
        resp = stub.SubmitTransactions(
            gateway_pb2.SubmitTransactionsRequest(
                payloads=[gateway_pb2.DevicePayload(device_id="grpc-ok-2", payload=tx(1))]
            ),
            timeout=30,
        )
        assert resp.results[0].outcome == gateway_pb2.SubmitResult.STORED
        with device(sandbox, d.broker.port) as dev:
            dev.publish("devices/mqtt-after/tx", tx(1))
        st = wait_drained(gw, 3, timeout=60)
        assert st.transactions_stored == 3 and st.mqtt_connected
    assert [p for p in psutil.Process(gw.proc.proc.pid).children() if p.name() == INTAKE_NAME]
    assert gw.proc.terminate(30) == 0
    assert "Traceback" not in gw.proc.log_text()


def start_or_exit(sb: Sandbox, gw: GatewayProc) -> int | None:
    """Start the gateway again, as systemd's Restart= would: None once it is ready, or its
    exit code if it stopped before."""
    try:
        sb.start_gateway_again(gw)
    except SandboxError:
        assert gw.proc.proc is not None
        return gw.proc.proc.wait(10)
    return None


def test_a_bug_in_the_writer_path_stops_the_gateway_with_70_and_its_message_becomes_poison(
    sandbox: Sandbox,
) -> None:
    # The test-only fault hook: a payload holding these bytes raises in the spool writer's
    # callback, after its transaction is committed, before it is acknowledged.
    sandbox.env["EDGE_GATEWAY_TEST_FAULT"] = "crash-me"
    d = deploy(sandbox, nodes=1, quorum=1, batch="max_tx = 100\nmax_age_s = 0.3")
    gw = d.start_gateway()
    assert gw.proc.proc is not None
    crashes = gw.spool.parent / "spool.db.crashes"
    with dead_letters(sandbox, d.broker.port) as dl, device(sandbox, d.broker.port) as dev:
        for seq in range(1, 6):
            dev.publish("devices/dev-p/tx", tx(seq))
        wait_drained(gw, 5, timeout=60)
        # 1. The bug: the gateway stops within seconds, exit 70, the traceback logged once.
        mark = len(gw.proc.log_text())
        t0 = time.monotonic()
        dev.publish("devices/dev-p/tx", tx(6, note="crash-me"))
        assert gw.proc.proc.wait(30) == 70
        assert time.monotonic() - t0 < 15
        first = gw.proc.log_text()[mark:]
        assert first.count("Traceback") == 1, first[-3000:]
        assert "injected fault in the spool writer path" in first
        assert "failed intake 1 time(s)" in first
        assert json.loads(crashes.read_text())["messages"]

        # 2. The supervisor restarts it; the broker delivers the message again; it fails
        # again (before or after READY), recorded a second time.
        mark = len(gw.proc.log_text())
        code = start_or_exit(sandbox, gw)
        if code is None:
            code = gw.proc.proc.wait(30)
        assert code == 70
        second = gw.proc.log_text()[mark:]
        assert second.count("Traceback") == 1 and "failed intake 2 time(s)" in second

        # 3. The next start sets it aside: dead-lettered as poison and acknowledged; the
        # gateway serves, later messages are committed.
        mark = len(gw.proc.log_text())
        assert start_or_exit(sandbox, gw) is None
        [(topic, letter, _n)] = dl.wait_for(lambda _t, doc: doc["reason"] == "poison")
        assert topic == f"{REJECT_PREFIX}/dev-p" and letter["device"] == "dev-p"
        assert letter["reason"] in REASONS
        dev.publish("devices/dev-p/tx", tx(7))
        wait_until("seq 7 stored", lambda: gateway_status(gw).transactions_stored >= 7)
        time.sleep(1.0)
        assert gw.proc.alive()
    third = gw.proc.log_text()[mark:]
    assert "Traceback" not in third and "internal error" not in third
    rows = spool_rows(gw.spool, "SELECT reason FROM reject")
    assert rows == [("poison",)]
    assert gw.proc.terminate(30) == 0


def test_grpc_submit_of_the_poison_is_refused_too(sandbox: Sandbox) -> None:
    """The same fault over gRPC: the call is answered, the gateway stops with exit 70 and
    after a second failure the payload is refused as poison, the process serving."""
    sandbox.env["EDGE_GATEWAY_TEST_FAULT"] = "crash-me"
    d = deploy(sandbox, nodes=1, quorum=1, batch="max_tx = 100\nmax_age_s = 0.3")
    gw = d.start_gateway()
    assert gw.proc.proc is not None
    request = gateway_pb2.SubmitTransactionsRequest(
        payloads=[gateway_pb2.DevicePayload(device_id="grpc-p", payload=tx(1, note="crash-me"))]
    )
    for attempt in (1, 2):
        with gw.channel("admin") as ch, pytest.raises(grpc.RpcError):
            # The failing item is never answered STORED: the call ends with the stop.
            gateway_pb2_grpc.GatewayServiceStub(ch).SubmitTransactions(request, timeout=30)
        assert gw.proc.proc.wait(30) == 70, attempt
        if attempt == 1:
            assert start_or_exit(sandbox, gw) is None
    assert start_or_exit(sandbox, gw) is None
    with gw.channel("admin") as ch:
        resp = gateway_pb2_grpc.GatewayServiceStub(ch).SubmitTransactions(request, timeout=30)
    assert resp.results[0].outcome == gateway_pb2.SubmitResult.REJECTED
    assert resp.results[0].reason == "poison"
    assert gw.proc.log_text().count("Traceback") == 2
    assert gw.proc.terminate(30) == 0


def test_dead_letters_recorded_with_a_bad_topic_by_an_older_gateway_cost_no_reconnects(
    sandbox: Sandbox,
) -> None:
    """An upgraded gateway may find unpublished rejects whose topic was built from a raw id
    (a NUL, a wildcard, past MQTT's limit): they go to the fixed topic, and the connection
    that publishes them is never dropped for them."""
    d = deploy(sandbox, nodes=1, quorum=1)
    gw = d.start_gateway()
    assert gw.proc.terminate(30) == 0
    bad = [f"{REJECT_PREFIX}/a\x00b", f"{REJECT_PREFIX}/+", f"{REJECT_PREFIX}/#", "x" * 70_000]
    conn = sqlite3.connect(gw.spool)
    with conn:
        conn.executemany(
            "INSERT INTO reject (received_ms, reason, device_id, topic, message)"
            " VALUES (?, ?, ?, ?, ?)",
            [
                (now_ms(), "bad_device_id", t[-8:], t, json.dumps({"n": i}).encode())
                for i, t in enumerate(bad)
            ],
        )
    conn.close()
    mark = len(gw.proc.log_text())
    with dead_letters(sandbox, d.broker.port) as dl:
        sandbox.start_gateway_again(gw)
        letters = dl.wait_for(lambda t, _d: t == INVALID_TOPIC, count=len(bad))
        assert sorted(doc["n"] for _t, doc, _n in letters) == list(range(len(bad)))
        time.sleep(1.0)
        assert gateway_status(gw).mqtt_connected
    unpublished = spool_rows(gw.spool, "SELECT count(*) FROM reject WHERE published = 0")
    assert unpublished == [(0,)]
    assert gw.proc.terminate(30) == 0
    after = gw.proc.log_text()[mark:]
    assert after.count("mqtt connected") == 1 and "reconnecting" not in after
