"""`edge-gateway simulate --profile`: real MQTT traffic that the profiles decode.

Mosquitto on a loopback port; the simulator publishes three firmware profiles
at once with malformed payloads mixed in; a subscriber decodes everything it
receives through a ProfileSet bound to the keys provision_keys() wrote. Every
good payload is accepted, every malformed one rejected with a listed reason.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from gateway.common.errors import Rejected
from gateway.edge.profiles import REASONS, ProfileSet
from gateway.lab import simulate
from gateway.lab.sandbox import Sandbox

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_simulated_profiles_decode_and_their_malformed_payloads_are_rejected(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    broker = sandbox.mosquitto()
    opts = simulate.SimulateOptions(
        port=broker.port,
        devices=12,
        rate=600,
        seconds=0,
        count=15,
        bad_ratio=0.2,
        profiles=("nbiot-meter", "cellsite-power", "esim-lifecycle", "cdr-usage"),
        profiles_dir=ROOT / "firmware_profiles",
        start_seq=int(time.time() * 1000),
    )
    ids = simulate.device_ids(opts)
    assert [len(v) for v in ids.values()] == [3, 3, 3, 3]
    written = simulate.provision_keys(opts, tmp_path / "keys")
    assert {p.name for p in written} == {"nbiot-meter.toml", "esim-lifecycle.toml"}
    pk = tmp_path / "pseudonym.key"
    pk.write_text(os.urandom(32).hex())
    pk.chmod(0o600)
    ps = ProfileSet.load(
        ROOT / "firmware_profiles",
        gateway_id="edge-sim-01",
        keys_dir=tmp_path / "keys",
        pseudonym_key_file=pk,
        fallback=None,
    )

    received: list[tuple[str, bytes, int]] = []
    lock = threading.Lock()
    sub = sandbox.mqtt_client("profile-sub")
    ready = threading.Event()
    sub.on_connect = lambda c, *_: (c.subscribe([(f, 1) for f in ps.subscriptions()]), ready.set())

    # Mosquitto 2.0.11 leaves the devices' listener's mount point on delivered topics.
    mount = sandbox.broker_logins[broker.port].mount_point

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic.removeprefix(mount)
        with lock:
            received.append((topic, bytes(msg.payload), time.time_ns() // 1_000_000))

    sub.on_message = on_message
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    try:
        assert ready.wait(10)
        time.sleep(0.3)
        result = asyncio.run(simulate.run(sandbox.simulate_options(opts)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(received) < result.published:
            time.sleep(0.05)
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert result.failed == 0 and result.published == 12 * 15
    assert len(received) == result.published
    outcomes: Counter[str] = Counter()
    by_profile: Counter[str] = Counter()
    for topic, payload, at in received:
        try:
            inc = ps.decode(None, topic, payload, at, "mqtt")
        except Rejected as r:
            assert r.reason in REASONS
            outcomes[r.reason] += 1
        else:
            outcomes["ok"] += 1
            by_profile[ps.select(topic)[0]] += 1
            assert inc.device_id in {d for v in ids.values() for d in v}
    assert outcomes["ok"] == result.published - result.bad_published
    assert sum(by_profile.values()) == sum(result.by_profile.values())
    assert set(by_profile) == {
        "nbiot-meter@1",
        "cellsite-power@1",
        "esim-lifecycle@1",
        "cdr-usage@1",
    }
    assert len(outcomes) >= 4, outcomes
    assert "cellsite-power@1" in result.line()
