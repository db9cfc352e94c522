"""Receipts to devices end to end: a sandbox gateway with a profile opted in, three ledger
nodes cosigning as witnesses (quorum 2), a real Mosquitto, SoftHSM2 and SQLite.

A device subscribed to its receipt topic gets a receipt for each of its committed
transactions, and each verifies with the reference device verifier against the gateway's
public key and the witnesses' vkeys; later a ledger node's consistency proof shows the
receipt's checkpoint is a prefix of a newer one. While the broker is down receipts wait
in the spool, and they go out once it is back; a restart resumes from the spool.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from gateway._pb.edgegateway.v1 import ledger_pb2, ledger_pb2_grpc
from gateway.common import resources
from gateway.edge import receipts as edge_receipts
from gateway.edge.config import load_gateway_config
from gateway.formats import device_verifier, receipt
from gateway.lab import demo
from gateway.lab.receipts import ReceiptSubscriber, opt_in, tracker_payload, trust
from gateway.lab.sandbox import GatewayProc, Sandbox
from tests.conftest import Deployment, deploy

pytestmark = pytest.mark.integration

WAIT_S = 60.0
DEVICES = ("trk-a", "trk-b", "trk-c")


def spool_rows(spool: Path) -> dict[bytes, str]:
    """tx_id -> device of every transaction in the spool."""
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        return {bytes(t): d for t, d in conn.execute("SELECT tx_id, device_id FROM tx")}
    finally:
        conn.close()


def spool_mark(spool: Path) -> tuple[int | None, int]:
    """(receipts mark, committed log size) in the spool."""
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        return edge_receipts.read_mark(conn), edge_receipts.committed_size(conn)
    finally:
        conn.close()


def publish(sb: Sandbox, port: int, first_seq: int, count: int) -> None:
    """Each device publishes `count` positions QoS 1; every one acknowledged."""
    c = sb.mqtt_client("receipts-test-pub")
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    try:
        infos = [
            c.publish(f"trackers/{d}/position", tracker_payload(s), qos=1)
            for s in range(first_seq, first_seq + count)
            for d in DEVICES
        ]
        for i in infos:
            i.wait_for_publish(WAIT_S)
            assert i.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


def metric(gw: GatewayProc, name: str) -> float:
    listen = load_gateway_config(gw.config).metrics.listen
    assert listen is not None
    port = int(listen.rpartition(":")[2])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


@pytest.fixture
def opted_in(sandbox: Sandbox, tmp_path: Path) -> Deployment:
    profiles = opt_in(resources.profiles_dir(), tmp_path / "profiles", ["lte-m-tracker"])
    # Only the profiles without device keys: this test needs no key files.
    for path in profiles.glob("*.toml"):
        if path.stem not in ("lte-m-tracker", "cellsite-power"):
            path.unlink()
    d = deploy(
        sandbox,
        gateway_id="edge-receipts",
        batch="max_tx = 40\nmax_age_s = 0.2",
        extra=f'\n[profiles]\ndir = "{profiles}"\n',
    )
    return d


def test_devices_receive_receipts_that_verify_and_stay_consistent(opted_in: Deployment) -> None:
    d = opted_in
    sb = d.sandbox
    gw = d.start_gateway()
    device_trust = trust(
        load_gateway_config(d.config).log_origin,
        d.public_key,
        [lg.witness_vkey for lg in d.ledgers],
        quorum=2,
    )
    sub = ReceiptSubscriber(d.broker.port, "receipts-test-sub", sb.mqtt_tls(), session_s=600)
    assert sub.start(["receipts/+"]) == ["Granted QoS 1"]

    # Every committed transaction of the opted-in profile gets a verifying receipt on its
    # device's topic.
    publish(sb, d.broker.port, 1, 30)
    demo.wait_drained(gw, 90, timeout=WAIT_S)
    rows = spool_rows(gw.spool)
    assert len(rows) == 90
    assert sub.wait_for_tx_ids(set(rows), WAIT_S) == set()
    tally = sub.tally(device_trust)
    assert tally.failed == [] and tally.verified == tally.received >= 90
    for topic, data in sub.messages:
        v = device_verifier.verify_receipt(data, device_trust)
        assert topic.endswith(f"receipts/{rows[v.tx_id]}"), topic
        assert len(data) <= receipt.max_size(v.size, witnesses=3)
    first = min(sub.messages, key=lambda m: device_verifier.parse_receipt(m[1]).size)[1]
    old = device_verifier.verify_receipt(first, device_trust)

    # While the broker is down, committed transactions' receipts wait in the spool, and a
    # gateway stopped meanwhile resumes them from there once the broker is back.
    for lg in d.ledgers:
        lg.proc.terminate(15)
    publish(sb, d.broker.port, 31, 20)
    d.broker.terminate(15)
    for lg in d.ledgers:
        sb.restart(lg.proc)
    demo.wait_drained(gw, 150, timeout=WAIT_S)
    mark, committed = spool_mark(gw.spool)
    assert committed == 150 and mark is not None and mark < committed
    assert metric(gw, "edge_gateway_receipts_pending") > 0
    assert gw.proc.terminate(30) == 0
    assert spool_mark(gw.spool) == (mark, 150)
    subacks = len(sub.subacks)
    sb.restart(d.broker)
    assert sub.wait_subscribed(subacks + 1, WAIT_S)
    gw = d.start_gateway()
    rows = spool_rows(gw.spool)
    assert sub.wait_for_tx_ids(set(rows), WAIT_S) == set()
    tally = sub.tally(device_trust)
    assert tally.failed == [] and set(tally.tx_ids) == set(rows)
    deadline = time.monotonic() + WAIT_S
    while spool_mark(gw.spool)[0] != 150 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert spool_mark(gw.spool) == (150, 150)
    assert metric(gw, "edge_gateway_receipts_published_total") >= 60
    assert metric(gw, "edge_gateway_receipts_pending") == 0

    # Later: a ledger node's newest checkpoint extends the one in the first receipt.
    with d.ledgers[0].channel() as ch:
        stub = ledger_pb2_grpc.LedgerServiceStub(ch)
        answer = stub.GetConsistency(
            ledger_pb2.GetConsistencyRequest(gateway_id=d.gateway_id, old_size=old.size),
            timeout=10,
        )
        with pytest.raises(grpc.RpcError) as e:
            stub.GetConsistency(
                ledger_pb2.GetConsistencyRequest(gateway_id=d.gateway_id, old_size=10**9),
                timeout=10,
            )
        assert e.value.code() is grpc.StatusCode.OUT_OF_RANGE
    proof = list(answer.proof)
    size = device_verifier.verify_still_included(first, answer.checkpoint, proof, device_trust)
    assert size == 150 > old.size
    assert proof, "a proof between two different sizes is not empty"
    tampered = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
    with pytest.raises(device_verifier.ReceiptInvalid, match="does not extend"):
        device_verifier.verify_still_included(first, answer.checkpoint, tampered, device_trust)

    # New transactions get their receipts as before.
    publish(sb, d.broker.port, 51, 5)
    demo.wait_drained(gw, 165, timeout=WAIT_S)
    rows = spool_rows(gw.spool)
    assert sub.wait_for_tx_ids(set(rows), WAIT_S) == set()
    assert sub.tally(device_trust).failed == []
    sub.close()
    assert gw.proc.terminate(30) == 0
    assert all(dev not in gw.proc.log_text() for dev in DEVICES), "a device id in the log"
