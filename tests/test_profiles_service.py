"""Firmware profiles in the running gateway: routed by topic, committed, reloaded on SIGHUP."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from gateway._pb.edgegateway.v1 import transaction_pb2
from gateway.lab import demo, simulate
from gateway.lab.sandbox import TEST_PIN, Sandbox
from tests.conftest import deploy

pytestmark = pytest.mark.integration


def wait_for(text: str, log: callable, timeout: float = 20) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    while text not in log():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{text!r} not logged"
        time.sleep(0.1)


def test_profiles_decode_commit_and_hot_reload(sandbox: Sandbox, tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for name in ("lte-m-tracker", "cdr-usage"):
        shutil.copy(demo.PROFILES_DIR / f"{name}.toml", profiles)
    key = tmp_path / "pseudonym.key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    extra = (
        f'\n[profiles]\ndir = "{profiles}"\nkeys_dir = "{keys_dir}"\npseudonym_key_file = "{key}"\n'
    )
    d = deploy(sandbox, extra=extra, batch="max_tx = 500\nmax_age_s = 0.5")
    gw = d.start_gateway()

    def publish(*names: str) -> simulate.SimulateResult:
        opts = simulate.SimulateOptions(
            port=d.broker.port,
            devices=20,
            count=5,
            rate=2000,
            seconds=60,
            start_seq=int(time.time() * 1000),
            profiles=names,
            profiles_dir=demo.PROFILES_DIR,
        )
        simulate.provision_keys(opts, keys_dir)
        return asyncio.run(simulate.run(sandbox.simulate_options(opts)))

    r = publish("lte-m-tracker", "cdr-usage")
    assert r.acknowledged == 100
    demo.wait_drained(gw, 100, timeout=60)
    assert demo.committed_by_profile(gw.spool) == {"cdr-usage@1": 50, "lte-m-tracker@1": 50}

    # Subscriber identities reach the ledger only as pseudonyms (HMAC under the gateway key).
    conn = sqlite3.connect(f"file:{gw.spool}?mode=ro", uri=True)
    cdrs = [
        json.loads(tx.fields)
        for tx in (
            transaction_pb2.Transaction.FromString(r[0])
            for r in conn.execute("SELECT leaf FROM tx")
        )
        if tx.profile == "cdr-usage@1"
    ]
    conn.close()
    assert len(cdrs) == 50
    for f in cdrs:
        assert re.fullmatch("[0-9a-f]{64}", f["imsi"])
        assert "msisdn" not in f or re.fullmatch("[0-9a-f]{64}", f["msisdn"])

    # A broken profile file: the reload fails, the running set keeps working.
    (profiles / "broken.toml").write_text('name = "broken"\nversion = "one"\n')
    gw.proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_for("profiles reload failed", gw.proc.log_text)
    (profiles / "broken.toml").unlink()
    r = publish("lte-m-tracker")
    assert r.acknowledged == 100
    demo.wait_drained(gw, 200, timeout=60)

    # A new device family added without a restart: SIGHUP loads it and subscribes its topics.
    shutil.copy(demo.PROFILES_DIR / "cellsite-power.toml", profiles)
    gw.proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_for("profiles reloaded", gw.proc.log_text)
    time.sleep(0.5)
    r = publish("cellsite-power")
    assert r.acknowledged == 100
    demo.wait_drained(gw, 300, timeout=60)
    assert demo.committed_by_profile(gw.spool)["cellsite-power@1"] == 100
    assert gw.proc.alive()
    assert gw.proc.terminate(30) == 0
    # No subscriber identity (15-digit IMSI, MSISDN) and no PIN in any log line.
    log = gw.proc.log_text()
    # (A run of digits inside a hex key_id is not an identity: hex neighbours excluded.)
    assert not re.search(r"(?<![0-9a-fA-F])\d{10,15}(?![0-9a-fA-F])", log), log[-2000:]
    assert TEST_PIN not in log
