"""MQTT intake's flow window and depth pause on a real Mosquitto and spool file: messages
past the window wait unacknowledged, and are let in (in arrival order, each stored once)
when a batch cut moves the cursor or intake resumes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.common.tomlconfig import TlsClient
from gateway.edge import mqttrx
from gateway.edge.config import SpoolConfig
from gateway.edge.ingest import MqttIngest
from gateway.edge.profiles import ProfileSet
from gateway.edge.spool import Spool
from gateway.lab.sandbox import Sandbox, loopback_mqtt_config
from tests.mqttkit import Publisher

WINDOW = 40


def wait_for(what: str, ok: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Rig:
    """MqttIngest over a real broker and spool; the test plays the batcher's cursor."""

    def __init__(
        self, sb: Sandbox, tmp: Path, max_depth: int = 0, receive_maximum: int = 1000
    ) -> None:
        self.broker = sb.mosquitto()
        self.spool = Spool(SpoolConfig(tmp / "spool.db", 1000, 2.0, 10_000, 0, 600, 0), "gw-window")
        self.spool.open()
        self.cursor = 0
        # The sandbox's broker: the gateway logs in on the gateways' listener.
        login = sb.broker_logins[self.broker.port]
        pki = sb.pki
        assert pki is not None
        cfg = loopback_mqtt_config(
            login.gateway_port,
            "gw-window",
            session_expiry_s=3600,
            reconnect_min_s=0.2,
            reconnect_max_s=2.0,
            username=login.username,
            password_file=login.password_file,
            tls=TlsClient(pki.ca.cert, pki["gateway"].cert, pki["gateway"].key),
            mount_point=login.mount_point,
            receive_maximum=receive_maximum,
        )
        self.mqtt = MqttIngest(
            cfg,
            self.spool,
            ProfileSet(gateway_id="gw-window"),
            lambda: max(0, self.spool.max_rowid - self.cursor),
            max_depth,
            window=WINDOW,
        )
        self.mqtt.start()
        wait_for("the subscription", self.mqtt.subscribed.is_set)
        self.device = Publisher(sb, self.broker.port, "window-device")

    def publish(self, first: int, n: int, pad: int = 0) -> None:
        tail = b',"pad":"%s"}' % (b"x" * pad) if pad else b"}"
        self.device.publish_many(
            (f"devices/d{s % 3}/tx", b'{"seq":%d,"v":1' % s + tail) for s in range(first, first + n)
        )

    def stored(self) -> list[tuple[str, int]]:
        q = "SELECT device_id, device_seq FROM tx ORDER BY rowid"
        return self.spool.read(lambda c: c.execute(q).fetchall()).result()

    def stored_at_least(self, n: int) -> Callable[[], bool]:
        return lambda: len(self.stored()) >= n

    def close(self) -> None:
        self.device.close()
        self.mqtt.stop()
        self.spool.close()


@pytest.fixture
def rig(sandbox: Sandbox, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(sandbox, tmp_path, max_depth=10_000)
    yield r
    r.close()


def test_held_messages_are_let_in_in_order_as_batches_are_cut(rig: Rig) -> None:
    rig.publish(0, 150)
    wait_for("the window to fill", lambda: len(rig.stored()) == WINDOW)
    wait_for("the rest to be held", lambda: len(rig.mqtt._held) == 150 - WINDOW)
    time.sleep(0.3)
    assert len(rig.stored()) == WINDOW  # nothing past the window while no batch is cut
    for cut in (WINDOW, 2 * WINDOW, 3 * WINDOW, 150):
        rig.cursor = cut
        rig.mqtt.release()
        want = min(150, cut + WINDOW)
        wait_for(f"{want} stored", rig.stored_at_least(want))
    wait_for("every PUBACK", lambda: rig.mqtt.acks == 150)
    assert rig.stored() == [(f"d{s % 3}", s) for s in range(150)]
    assert rig.mqtt._held == [] and rig.mqtt.inflight == 0


def test_a_paused_intake_holds_everything_and_resume_lets_in_up_to_the_depth_limit(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    rig = Rig(sandbox, tmp_path, max_depth=30)  # below the window: the depth limit binds
    try:
        rig.mqtt.pause()
        rig.publish(0, 300)
        wait_for("every message to be held", lambda: len(rig.mqtt._held) == 300)
        assert rig.stored() == []
        rig.mqtt.resume()
        wait_for("the depth limit", lambda: len(rig.stored()) == 30)
        rig.mqtt.resume()  # still at the limit: nothing more, still paused
        time.sleep(0.3)
        assert rig.mqtt.paused and len(rig.mqtt._held) == 270 and len(rig.stored()) == 30
        rig.cursor = 10**9  # batches cut: the spool's depth is back to zero

        def resumed() -> bool:
            rig.mqtt.resume()  # as the service's control loop does while paused
            return len(rig.stored()) == 300

        wait_for("the rest", resumed)
        assert not rig.mqtt.paused and rig.mqtt._held == []
        assert rig.stored() == [(f"d{s % 3}", s) for s in range(300)]
    finally:
        rig.close()


def test_intake_stops_reading_at_its_read_limit_when_the_broker_sends_past_its_window(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Mosquitto 2.0.11 sends past the receive maximum once PUBACKs flow: withholding them
    does not bound what arrives. Intake stops reading the socket at its read limit (4 x
    the receive maximum) instead: what it holds stays under the limit plus one read,
    and everything comes in, in order, once the window opens."""
    n, pad = 300, 30_000
    rig = Rig(sandbox, tmp_path, max_depth=10_000, receive_maximum=10)
    try:
        assert rig.mqtt.read_limit == 40
        rig.publish(0, n, pad)
        wait_for("the window to fill", lambda: len(rig.stored()) == WINDOW)
        wait_for("reads to stop", lambda: rig.mqtt._client.read_pauses > 0)
        time.sleep(0.5)  # PUBACKs of the window have gone; the broker sends what it will
        one_read = mqttrx.READ_BYTES // pad + 1
        assert rig.mqtt.most_unanswered <= rig.mqtt.read_limit + one_read
        assert len(rig.mqtt._held) <= rig.mqtt.read_limit + one_read
        cut = WINDOW
        deadline = time.monotonic() + 60
        while len(rig.stored()) < n:
            assert time.monotonic() < deadline, f"{len(rig.stored())} of {n} stored"
            cut = len(rig.stored())
            rig.cursor = cut
            rig.mqtt.release()
            time.sleep(0.02)
        wait_for("every PUBACK", lambda: rig.mqtt.acks == n)
        assert rig.stored() == [(f"d{s % 3}", s) for s in range(n)]
        assert rig.mqtt.most_unanswered <= rig.mqtt.read_limit + one_read
    finally:
        rig.close()
