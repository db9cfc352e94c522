"""The gateway end to end on real Mosquitto, SoftHSM2, gRPC ledger nodes and SQLite."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.edge import client
from gateway.edge.config import load_gateway_config
from gateway.formats import batchformat, note
from gateway.lab import demo, logaudit, simulate
from gateway.lab.sandbox import TEST_PIN, Sandbox
from tests.conftest import Deployment, deploy, every_leaf_included
from tests.test_receipts import metric

pytestmark = pytest.mark.integration


def publish_load(
    d: Deployment, devices: int, count: int, start_seq: int = 1, **kw: object
) -> simulate.SimulateResult:
    """Device load on the deployment's broker, over TLS with the device certificate."""
    opts = simulate.SimulateOptions(
        port=d.broker.port,
        devices=devices,
        count=count,
        rate=100_000,
        seconds=600,
        start_seq=start_seq,
        **kw,
    )  # type: ignore[arg-type]
    return asyncio.run(simulate.run(d.sandbox.simulate_options(opts)))


def ledger_device_seqs(d: Deployment) -> list[set[tuple[str, int]]]:
    out = []
    for lg in d.ledgers:
        _n, dups, held = demo.check_ledger(lg, d.public_key, d.gateway_id)
        assert dups == 0, f"{lg.node_id} applied {dups} transactions twice"
        out.append(held)
    return out


def test_ten_thousand_transactions_committed_exactly_once_with_verifying_proofs(
    deployment: Deployment,
) -> None:
    d = deployment
    gw = d.start_gateway()
    res = publish_load(d, devices=100, count=100)
    assert res.acknowledged == 10_000 and res.failed == 0, res.line()

    st = demo.wait_drained(gw, 10_000, timeout=120, all_nodes=True)
    assert st.transactions_stored == 10_000
    stored, committed, batches, _lat, ids = demo.spool_figures(gw.spool)
    assert stored == committed == 10_000
    assert batches == st.last_signed_seq + 1

    expected = {(f"dev-{i:05d}", s) for i in range(100) for s in range(1, 101)}
    for held in ledger_device_seqs(d):
        assert held == expected

    # Every transaction's inclusion proof against the latest signed checkpoint, offline;
    # through the API, a tenth of them as tlog-proof bundles that verify.
    origin = load_gateway_config(d.config).log_origin
    assert (
        every_leaf_included(
            gw.spool, logaudit.log_verifiers(origin, d.public_key.read_bytes()), origin
        )
        == 10_000
    )
    ok, bad = demo.verify_proofs(gw, ids, 1000)
    assert (ok, bad) == (1000, 0)
    assert gw.proc.terminate(30) == 0


def test_batch_signature_verifies_with_openssl(deployment: Deployment, tmp_path: Path) -> None:
    """A batch's one signature is its checkpoint's (C2SP signed note, type 0x02: DER ECDSA
    over SHA-256 of the note text, after a 4-byte key ID): openssl checks it with nothing
    but the gateway's public key."""
    d = deployment
    gw = d.start_gateway()
    publish_load(d, devices=5, count=10)
    demo.wait_drained(gw, 50, timeout=60)
    origin = load_gateway_config(d.config).log_origin
    with gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        b = stub.GetBatch(gateway_pb2.GetBatchRequest(seq=0), timeout=10)
    assert b.seq == 0 and b.first_index == 0 and b.tx_count > 0 and b.committed
    signed_note = note.parse_note(b.checkpoint)
    assert signed_note.text.startswith(origin + "\n")
    own = [sig for sig in signed_note.signatures if sig.name == origin]
    assert len(own) == 1  # the gateway's one signature; the rest are cosignatures
    assert len(signed_note.signatures) >= 1 + 2  # the quorum's cosignatures beside it
    signed = tmp_path / "note.txt"
    signed.write_bytes(signed_note.text.encode())
    sig = tmp_path / "sig.der"
    sig.write_bytes(own[0].signature)

    def openssl_verify(data: Path) -> subprocess.CompletedProcess[str]:
        argv = ["openssl", "dgst", "-sha256", "-verify", str(d.public_key)]
        argv += ["-signature", str(sig), str(data)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    out = openssl_verify(signed)
    assert out.returncode == 0 and "Verified OK" in out.stdout, out.stdout + out.stderr
    tampered = tmp_path / "tampered.txt"
    tampered.write_bytes(signed.read_bytes()[:-2] + bytes([signed.read_bytes()[-2] ^ 1]) + b"\n")
    assert openssl_verify(tampered).returncode != 0


def test_a_batch_costs_exactly_one_hsm_signature(sandbox: Sandbox) -> None:
    """Outside a key rotation, the gateway's SoftHSM makes one signature (one C_Sign) per
    batch it stores: the checkpoint's, nothing else."""
    d = deploy(sandbox, batch="max_tx = 40\nmax_age_s = 0.3")
    gw = d.start_gateway()
    publish_load(d, devices=10, count=40)
    st = demo.wait_drained(gw, 400, timeout=60)
    _stored, committed, batches, _lat, _ids = demo.spool_figures(gw.spool)
    assert committed == 400 and batches >= 10
    assert batches == st.last_signed_seq + 1
    assert metric(gw, "edge_gateway_batches_signed_total") == batches
    assert metric(gw, "edge_gateway_hsm_signatures_total") == batches
    assert gw.proc.terminate(30) == 0


def test_unacknowledged_message_comes_back_after_kill(sandbox: Sandbox) -> None:
    # A tiny depth limit and a long batch age make intake pause after 20 transactions:
    # the rest stay unacknowledged, in the gateway's hands or the broker's.
    d = deploy(sandbox, batch="max_tx = 100000\nmax_age_s = 3600", spool_extra="max_depth = 20")
    gw = d.start_gateway()
    res = publish_load(d, devices=10, count=10)
    assert res.acknowledged == 100
    deadline = time.monotonic() + 30
    while demo.gateway_status(gw).transactions_stored < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # the monitor has paused intake by now
    st = demo.gateway_status(gw)
    assert st.intake_paused and 20 <= st.transactions_stored < 100, st
    gw.proc.kill()

    # Restart without the limit: the broker re-sends everything not acknowledged.
    cfg = (
        d.config.read_text()
        .replace("max_depth = 20\n", "")
        .replace("max_tx = 100000\nmax_age_s = 3600", "max_tx = 500\nmax_age_s = 0.5")
    )
    d.config.write_text(cfg)
    sandbox.start_gateway_again(gw)
    st = demo.wait_drained(gw, 100, timeout=60, all_nodes=True)
    assert st.transactions_stored == 100
    stored, committed, _b, _l, _ids = demo.spool_figures(gw.spool)
    assert stored == committed == 100
    for held in ledger_device_seqs(d):
        assert len(held) == 100


def test_kill_during_load_loses_nothing_acknowledged(deployment: Deployment) -> None:
    d = deployment
    gw = d.start_gateway()
    result: dict[str, simulate.SimulateResult] = {}

    def load() -> None:
        result["r"] = publish_load(d, devices=50, count=60)

    t = threading.Thread(target=load)
    t.start()
    time.sleep(1.0)
    gw.proc.kill()
    time.sleep(0.5)
    d.sandbox.start_gateway_again(gw)
    t.join(120)
    assert result["r"].acknowledged == 3000
    st = demo.wait_drained(gw, 3000, timeout=90, all_nodes=True)
    assert st.transactions_stored == 3000
    stored, committed, _b, _l, _ids = demo.spool_figures(gw.spool)
    assert stored == committed == 3000
    for held in ledger_device_seqs(d):
        assert len(held) == 3000


def test_bad_payloads_go_to_dead_letter_topic_and_pipeline_keeps_serving(
    deployment: Deployment,
) -> None:
    d = deployment
    gw = d.start_gateway()
    got: list[dict[str, object]] = []
    sub = d.sandbox.mqtt_client("dlq-watcher")
    sub.on_message = lambda _c, _u, m: got.append(json.loads(m.payload))
    sub.connect("127.0.0.1", d.broker.port)
    sub.subscribe("devices/rejected/#", qos=1)
    sub.loop_start()
    try:
        time.sleep(0.5)
        pub = d.sandbox.mqtt_client("bad-device")
        pub.connect("127.0.0.1", d.broker.port)
        pub.loop_start()
        cases = [
            ("devices/m1/tx", b"not json", "not_decodable"),
            ("devices/m1/tx", b'{"time": 5}', "missing_field"),
            ("devices/m1/tx", b"\xff\xfe", "bad_encoding"),
            ("devices/m1/tx", b'{"seq": 1, "seq": 2}', "not_decodable"),
            ("devices/m1/tx", b"[" * 100_000, "too_large"),
            ("devices/m1/tx", b'{"seq": 1, "v": 1e999}', "out_of_range"),
            ("devices/m1/tx", b'{"seq": -1}', "out_of_range"),
            ("devices/m1/tx", b'{"seq": 7, "time": 99999999999999}', "clock_skew"),
            ("devices/m1/tx", b'{"seq": 8, "v": 1}', None),
            ("devices/m1/tx", b'{"seq": 8, "v": 2}', "conflicting_duplicate"),
            ("devices/m1/tx", b'{"seq": 8, "v": 1}', None),  # same content again: absorbed
        ]
        for topic, body, _ in cases:
            pub.publish(topic, body, qos=1).wait_for_publish(10)
        want = [r for _, _, r in cases if r]
        deadline = time.monotonic() + 30
        while len(got) < len(want) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(str(m["reason"]) for m in got) == sorted(want)
        for m in got:
            assert m["device"] == "m1" and len(str(m["payload_sha256"])) == 64
        pub.loop_stop()
        pub.disconnect()
        publish_load(d, devices=3, count=5)
        st = demo.wait_drained(gw, 16, timeout=60)
        assert st.transactions_stored == 16  # 15 good + seq 8 once
        assert st.transactions_rejected == len(want)
        assert gw.proc.alive()
    finally:
        sub.loop_stop()
        sub.disconnect()


def test_grpc_submit_dedup_status_health_and_reflection(deployment: Deployment) -> None:
    d = deployment
    gw = d.start_gateway()
    with gw.channel("admin") as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        req = gateway_pb2.SubmitTransactionsRequest(
            payloads=[
                gateway_pb2.DevicePayload(
                    device_id="oss-1", payload=b'{"seq": 1, "kind": "bss.usage", "mb": 3}'
                ),
                gateway_pb2.DevicePayload(
                    device_id="oss-1", payload=b'{"seq": 2, "kind": "bss.usage", "mb": 4}'
                ),
                gateway_pb2.DevicePayload(device_id="oss-1", payload=b"{oops"),
            ]
        )
        r1 = stub.SubmitTransactions(req, timeout=10)
        outcomes = [gateway_pb2.SubmitResult.Outcome.Name(r.outcome) for r in r1.results]
        assert outcomes == ["STORED", "STORED", "REJECTED"]
        assert r1.results[2].reason == "not_decodable"
        r2 = stub.SubmitTransactions(req, timeout=10)
        assert [r.outcome for r in r2.results[:2]] == [gateway_pb2.SubmitResult.DUPLICATE] * 2
        assert [r.tx_id for r in r2.results[:2]] == [r.tx_id for r in r1.results[:2]]
        conflict = stub.SubmitTransactions(
            gateway_pb2.SubmitTransactionsRequest(
                payloads=[
                    gateway_pb2.DevicePayload(device_id="oss-1", payload=b'{"seq": 1, "mb": 99}')
                ]
            ),
            timeout=10,
        )
        assert conflict.results[0].reason == "conflicting_duplicate"

        tx_id = r1.results[0].tx_id
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            tx = stub.GetTransaction(gateway_pb2.GetTransactionRequest(tx_id=tx_id), timeout=10)
            if tx.state == gateway_pb2.GetTransactionResponse.COMMITTED:
                break
            time.sleep(0.1)
        assert tx.state == gateway_pb2.GetTransactionResponse.COMMITTED
        # Its proof is the log's: the checkpoint signed by the gateway's key and cosigned
        # by the quorum of ledger nodes, each under its witness vkey.
        trust = client.LogTrust(witnesses=tuple(lg.witness_vkey for lg in d.ledgers), quorum=2)
        key = batchformat.load_public_keys(d.public_key.read_bytes())
        proved = client.verify_log_proof(tx, key, trust)
        assert len(proved.cosigned_by) >= 2 and proved.index == tx.log_index
        with pytest.raises(grpc.RpcError) as e:
            stub.GetTransaction(gateway_pb2.GetTransactionRequest(tx_id="00" * 32), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND

        st = stub.GetStatus(gateway_pb2.GetStatusRequest(), timeout=10)
        assert st.gateway_id == d.gateway_id and st.key_id == d.key_id
        assert st.mqtt_connected and st.hsm_state == "ok"
        assert {n.node_id for n in st.ledger_nodes} == {"ledger-1", "ledger-2", "ledger-3"}
        assert sum(n.log_size >= 2 for n in st.ledger_nodes) >= 2  # they cosigned the batch

        hs = health_pb2_grpc.HealthStub(ch)
        for name in ("", "edgegateway.v1.GatewayService"):
            resp = hs.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "status",
            "--address",
            gw.api_address,
            *gw.cli_args("reader"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and d.gateway_id in out.stdout, out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "proof",
            tx_id,
            "--address",
            gw.api_address,
            *gw.cli_args("admin"),
            "--public-key",
            str(d.public_key),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "inclusion proof verified" in out.stdout, out.stdout + out.stderr


def test_graceful_stop_signs_the_open_batch_and_exits_zero(sandbox: Sandbox) -> None:
    d = deploy(sandbox, batch="max_tx = 100000\nmax_age_s = 3600")
    gw = d.start_gateway()
    publish_load(d, devices=4, count=25)
    deadline = time.monotonic() + 30
    while demo.gateway_status(gw).transactions_stored < 100 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert demo.gateway_status(gw).last_signed_seq == -1  # nothing cut yet
    t0 = time.monotonic()
    assert gw.proc.terminate(30) == 0
    assert time.monotonic() - t0 < 25
    stored, committed, batches, _l, _ids = demo.spool_figures(gw.spool)
    assert stored == committed == 100 and batches == 1
    for held in ledger_device_seqs(d):
        assert len(held) == 100


def test_wrong_pin_stops_with_one_line_and_exit_77(deployment: Deployment) -> None:
    d = deployment
    d.hsm.pin_file.write_text("000000\n")
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(d.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=d.sandbox.env,
    )
    assert out.returncode == 77
    assert "refused the PIN" in out.stderr and "Traceback" not in out.stderr + out.stdout
    assert "000000" not in out.stderr + out.stdout


def test_pin_never_appears_in_logs(deployment: Deployment) -> None:
    d = deployment
    gw = d.start_gateway()
    publish_load(d, devices=2, count=5)
    demo.wait_drained(gw, 10, timeout=60)
    assert gw.proc.terminate(30) == 0
    text = gw.proc.log_text()
    assert "ready" in text and TEST_PIN not in text


def test_bad_config_names_key_value_and_allowed(tmp_path: Path) -> None:
    cfg = tmp_path / "g.toml"
    cfg.write_text(
        '[gateway]\nid = "g1"\n[hsm]\ntoken_label = "t"\npin_file = "/nonexistent"\n'
        '[mqtt]\nplaintext = true\n[spool]\npath = "/tmp/x.db"\n[batch]\nmax_tx = -5\n'
        '[forwarder]\nplaintext = true\nnodes = [{id = "a", address = "127.0.0.1:1"}]\n'
        "[api]\nplaintext = true\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 78
    assert "batch.max_tx = -5" in out.stderr and "from 1 to" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_demo_json_summary(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "demo",
            "--seconds",
            "8",
            "--devices",
            "200",
            "--rate",
            "1000",
            "--json",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    for key in (
        "published",
        "acknowledged",
        "committed",
        "duplicates_applied",
        "batches",
        "proofs_verified",
        "logs_verified",
        "tx_per_s",
        "p99_ms",
    ):
        assert key in summary
    assert summary["duplicates_applied"] == 0 and summary["logs_verified"] == 3
    assert summary["committed"] == summary["acknowledged"] - summary["rejected_published"]
    assert summary["proofs_verified"] > 0
    # The log: a checkpoint per batch, cosigned by every node, successive ones consistent.
    assert summary["checkpoints"] == summary["batches"] and summary["log_errors"] == []
    assert sorted(summary["cosigned_by_node"]) == ["ledger-1", "ledger-2", "ledger-3"]
    assert all(n > 0 for n in summary["cosigned_by_node"].values())
    assert summary["consistent_pairs"] > 0
    # The log key rotated a third of the way through: the entry covered by an old-key
    # checkpoint, then the overlap's checkpoints signed by both keys, then the new key
    # alone; every proof, receipt and cosigned checkpoint above verified across it.
    assert summary["rotation_ok"] is True and summary["rotation_errors"] == []
    assert re.fullmatch(
        r"rotation 1 done: entry at tree size [1-9]\d*; checkpoints signed by the old key "
        r"[1-9]\d*, by both 5, by the new key [1-9]\d*",
        summary["rotation_line"],
    ), summary["rotation_line"]
    assert summary["receipts_verified"] == summary["receipts_received"] > 0
