"""Receipts to devices through the broker configuration the project ships: each device reads
its own receipt topic only, and no device can write a receipt.

A gateway (SoftHSM key, one reference ledger node that cosigns as a witness) with the
lte-m-tracker profile opted in to receipts, behind a real Mosquitto configured by
`edge-gateway broker config` from the gateway's configuration in its production form.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.common import resources
from gateway.edge.config import load_gateway_config
from gateway.formats import device_verifier
from gateway.lab import demo
from gateway.lab.receipts import trust
from gateway.lab.sandbox import Sandbox, free_port
from tests.hostile.conftest import issue
from tests.hostile.test_mqtt_broker import Client

pytestmark = pytest.mark.integration

WAIT_S = 60.0
TRACKER = "lte-m-tracker.toml"


def tracker_payload(seq: int) -> bytes:
    return json.dumps(
        {
            "seq": seq,
            "ts": int(time.time() * 1000),
            "pos": {"lat": 22.5 + seq / 1e4, "lon": 114.05},
            "speed": 12.5,
            "batt": {"mv": 3712},
            "cell": {"mcc": "001", "mnc": "01", "tac": 4321, "eci": 123456789},
        }
    ).encode()


def opted_in_profiles(root: Path) -> Path:
    d = root / "profiles"
    d.mkdir(parents=True)
    text = (resources.profiles_dir() / TRACKER).read_text()
    (d / TRACKER).write_text(text + '\n[receipts]\nenabled = true\ntopic = "receipts/{device}"\n')
    return d


def tx_ids_of(spool: Path, device: str) -> set[bytes]:
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT tx_id FROM tx WHERE device_id = ?", (device,)).fetchall()
    finally:
        conn.close()
    return {bytes(r[0]) for r in rows}


def test_a_device_reads_its_own_receipts_only_and_they_verify(tmp_path: Path) -> None:
    sb = Sandbox(tmp_path / "sb")
    try:
        gid = "edge-receipts-acl"
        hsm = sb.hsm()
        broker = sb.mosquitto()
        ledger_port = free_port()
        profiles = opted_in_profiles(tmp_path)
        cfg = sb.gateway_config(
            gid,
            hsm,
            broker.port,
            [("ledger-1", f"127.0.0.1:{ledger_port}")],
            quorum=1,
            batch="max_tx = 50\nmax_age_s = 0.2",
            extra=f'\n[profiles]\ndir = "{profiles}"\n',
        )
        done = sb.configure_broker(broker, [cfg])  # production form
        acl = (sb.root / broker.name / "conf.d" / "devices.acl").read_text()
        assert "pattern read edge-devices/receipts/%u" in acl, acl
        gw_acl = (sb.root / broker.name / "conf.d" / "gateways.acl").read_text()
        assert "topic write edge-devices/receipts/+" in gw_acl, gw_acl
        assert "LAB ONLY" not in done.stdout
        pem = sb.root / f"{gid}.pem"
        sb.hsm_init(cfg, pem)
        ledger = sb.ledger("ledger-1", {gid: pem}, port=ledger_port)
        gw = sb.gateway(gid, cfg, pem)
        device_trust = trust(load_gateway_config(cfg).log_origin, pem, [ledger.witness_vkey], 1)

        victim, other = "trk-victim", "trk-other"
        victim_files, other_files = issue(sb, victim), issue(sb, other)
        # The broker names each client after its certificate (one connection per device):
        # first the writes, each on a connection of its own. A receipt may not be written
        # by a device, to another's receipt topic nor to its own.
        for files, cid in ((other_files, other), (victim_files, victim)):
            forger = Client(files, cid, broker.port, persistent=False)
            assert forger.connect() == "Success"
            mid = forger.publish(f"receipts/{victim}", b"\x01forged")
            assert forger.wait_pubacks([mid]) == {mid: "Not authorized"}
            forger.close()

        # The other device tries to read the victim's receipts, and every receipt.
        spy = Client(other_files, other, broker.port, persistent=False)
        assert spy.connect() == "Success"
        spy.subscribe([f"receipts/{victim}", "receipts/#", "#"])
        dev = Client(victim_files, victim, broker.port, persistent=False)
        assert dev.connect() == "Success"
        assert dev.subscribe([f"receipts/{victim}"]) == ["Granted QoS 1"]
        mids = [
            dev.publish(f"trackers/{victim}/position", tracker_payload(s)) for s in range(1, 41)
        ]
        assert set(dev.wait_pubacks(mids).values()) == {"Success"}
        demo.wait_drained(gw, 40, timeout=WAIT_S)

        want = tx_ids_of(gw.spool, victim)
        assert len(want) == 40
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not want <= {d[1:33] for _t, d in dev.received}:
            time.sleep(0.1)
        got = list(dev.received)
        # Mosquitto 2.0 delivers with the mount point in the topic, as for dead letters.
        assert {t for t, _d in got} == {f"edge-devices/receipts/{victim}"}
        tally = [device_verifier.verify_receipt(d, device_trust) for _t, d in got]
        assert {v.tx_id for v in tally} == want  # each verifies, one per transaction at least
        # A receipt with one byte changed does not verify.
        bad = bytearray(got[0][1])
        bad[60] ^= 1
        with pytest.raises(device_verifier.ReceiptInvalid):
            device_verifier.verify_receipt(bytes(bad), device_trust)

        time.sleep(1.0)
        assert spy.received == [], [t for t, _ in spy.received[:5]]
        for c in (spy, dev):
            c.close()
        assert gw.proc.terminate(30) == 0
        log = gw.proc.log_text()
        assert victim not in log and other not in log, "a device id in the gateway's log"
    finally:
        sb.close()
