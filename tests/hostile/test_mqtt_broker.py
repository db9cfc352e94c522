"""Devices with valid certificates against the broker configuration the project ships.

Each test runs a gateway (SoftHSM key, one reference ledger node) behind real Mosquitto
configured by `edge-gateway broker config` from the gateway's own configuration, in its
production form. Devices and intruders hold certificates from the same CA as everyone,
one per device, CN = device id. Each attack runs while honest devices publish; then
every message the broker acknowledged to them must be in the spool and committed at the
ledger, nothing the intruder sent may be there, and intake must still take new messages.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.edge.config import load_gateway_config
from gateway.lab import demo
from gateway.lab.sandbox import ClientFiles, GatewayProc, Ledger, Proc, Sandbox, free_port
from tests.hostile.conftest import issue

pytestmark = pytest.mark.integration

MOUNT = "edge-devices/"
WAIT_S = 30.0


@dataclass
class Site:
    sb: Sandbox
    broker: Proc
    gateway: GatewayProc
    ledger: Ledger
    config: Path
    client_id: str
    gateway_port: int

    @property
    def device_port(self) -> int:
        return self.broker.port


def start_site(root: Path, gateway_id: str, intake_processes: int = 1) -> tuple[Sandbox, Site]:
    """A gateway whose broker runs what `broker config` writes for its configuration."""
    sb = Sandbox(root)
    hsm = sb.hsm()
    broker = sb.mosquitto()
    ledger_port = free_port()
    cfg = sb.gateway_config(
        gateway_id,
        hsm,
        broker.port,
        [("ledger-1", f"127.0.0.1:{ledger_port}")],
        quorum=1,
        batch="max_tx = 100\nmax_age_s = 0.2",
        intake_processes=intake_processes,
    )
    done = sb.configure_broker(broker, [cfg])  # production form: no lab simulator
    assert "LAB ONLY" not in done.stdout, done.stdout
    conf = (sb.root / broker.name / "conf.d" / "edge-gateway.conf").read_text()
    assert "use_username_as_clientid true" in conf and f"mount_point {MOUNT}" in conf
    pem = sb.root / f"{gateway_id}.pem"
    sb.hsm_init(cfg, pem)
    ledger = sb.ledger("ledger-1", {gateway_id: pem}, port=ledger_port)
    gw = sb.gateway(gateway_id, cfg, pem)
    mqtt_cfg = load_gateway_config(cfg).mqtt
    return sb, Site(
        sb, broker, gw, ledger, cfg, mqtt_cfg.client_id, sb.broker_logins[broker.port].gateway_port
    )


@pytest.fixture
def site_factory(tmp_path: Path) -> Iterator[list[Sandbox]]:
    started: list[Sandbox] = []
    yield started
    for sb in started:
        sb.close()


@dataclass
class Client:
    """One MQTT client with its own certificate; remembers CONNACKs, SUBACKs, each
    PUBACK's reason code and every message it receives."""

    files: ClientFiles | None
    client_id: str
    port: int
    v5: bool = True
    persistent: bool = True
    username: str | None = None
    password: str | None = None
    connacks: list[str] = field(default_factory=list)
    subacks: list[list[str]] = field(default_factory=list)
    pubacks: dict[int, str] = field(default_factory=dict)
    received: list[tuple[str, bytes]] = field(default_factory=list)
    disconnects: int = 0

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        kw: dict[str, object] = {}
        if not self.v5:
            kw["clean_session"] = not self.persistent
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311,
            **kw,  # type: ignore[arg-type]
        )
        if self.files is not None:
            self.files.apply_paho(self.c)
        if self.username is not None:
            self.c.username_pw_set(self.username, self.password)
        self.c.max_inflight_messages_set(1000)
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_publish = self._on_publish
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect

    # paho callbacks
    def _on_connect(self, _c: object, _u: object, _f: object, rc: object, _p: object) -> None:
        with self._cond:
            self.connacks.append(str(rc))
            self._cond.notify_all()

    def _on_subscribe(self, _c: object, _u: object, _m: int, rcs: list[Any], _p: object) -> None:
        with self._cond:
            self.subacks.append([str(r) for r in rcs])
            self._cond.notify_all()

    def _on_publish(self, _c: object, _u: object, mid: int, rc: object, _p: object) -> None:
        with self._cond:
            self.pubacks[mid] = str(rc)
            self._cond.notify_all()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append((msg.topic, bytes(msg.payload)))

    def _on_disconnect(self, _c: object, _u: object, _f: object, _rc: object, _p: object) -> None:
        with self._cond:
            self.disconnects += 1

    def _wait(self, done: object, what: str) -> None:
        assert callable(done)
        deadline = time.monotonic() + WAIT_S
        with self._cond:
            while not done():
                left = deadline - time.monotonic()
                assert left > 0, f"{self.client_id}: no {what} within {WAIT_S} s"
                self._cond.wait(left)

    def connect(self) -> str:
        """Connect and return the CONNACK's reason ("Success", "Not authorized", ...)."""
        n = len(self.connacks)
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600 if self.persistent else 0
            self.c.connect(
                "127.0.0.1", self.port, 30, clean_start=not self.persistent, properties=props
            )
        else:
            self.c.connect("127.0.0.1", self.port, 30)
        self.c.loop_start()
        self._wait(lambda: len(self.connacks) > n, "CONNACK")
        return self.connacks[n]

    def subscribe(self, filters: list[str]) -> list[str]:
        n = len(self.subacks)
        self.c.subscribe([(f, 1) for f in filters])
        self._wait(lambda: len(self.subacks) > n, "SUBACK")
        return self.subacks[n]

    def publish(self, topic: str, body: bytes) -> int:
        info = self.c.publish(topic, body, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        return info.mid

    def wait_pubacks(self, mids: list[int]) -> dict[int, str]:
        self._wait(lambda: all(m in self.pubacks for m in mids), f"PUBACK for {len(mids)}")
        return {m: self.pubacks[m] for m in mids}

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def body(device: str, seq: int, tag: str = "real") -> bytes:
    return f'{{"seq": {seq}, "time": {int(time.time() * 1000)}, "who": "{tag}-{device}"}}'.encode()


def spooled(gw: GatewayProc) -> dict[tuple[str, int], bytes]:
    """(device, seq) -> payload SHA-256 of every transaction in the spool."""
    conn = sqlite3.connect(f"file:{gw.spool}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT device_id, device_seq, payload_sha256 FROM tx").fetchall()
    finally:
        conn.close()
    return {(d, s): bytes(h) for d, s, h in rows}


def publish_all(
    devices: dict[str, Client], per_device: int, first_seq: int = 1
) -> dict[tuple[str, int], bytes]:
    """Each device publishes `per_device` seqs; returns (device, seq) -> payload SHA-256 of
    those the broker acknowledged with success."""
    sent: dict[str, dict[int, tuple[int, bytes]]] = {d: {} for d in devices}
    for seq in range(first_seq, first_seq + per_device):
        for dev, c in devices.items():
            b = body(dev, seq)
            sent[dev][c.publish(f"devices/{dev}/tx", b)] = (seq, b)
    acked: dict[tuple[str, int], bytes] = {}
    for dev, c in devices.items():
        for mid, reason in c.wait_pubacks(list(sent[dev])).items():
            seq, b = sent[dev][mid]
            assert reason == "Success", (dev, seq, reason)
            acked[(dev, seq)] = hashlib.sha256(b).digest()
    return acked


def rejects(gw: GatewayProc) -> list[tuple[str, str]]:
    """(reason, device) of every reject the spool recorded."""
    conn = sqlite3.connect(f"file:{gw.spool}?mode=ro", uri=True)
    try:
        return [(r, d) for r, d in conn.execute("SELECT reason, device_id FROM reject")]
    finally:
        conn.close()


def assert_all_committed(
    site: Site, acked: dict[tuple[str, int], bytes], rejected: int = 0
) -> None:
    """Every acknowledged message is in the spool with the content its device sent, and
    committed at the ledger; nothing else is in the spool; `rejected` rejects in all."""
    st = demo.wait_drained(site.gateway, len(acked), timeout=60)
    held = spooled(site.gateway)
    lost = sorted(k for k in acked if k not in held)
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged messages not spooled: {lost[:5]}"
    forged = sorted(k for k in acked if held[k] != acked[k])
    assert not forged, f"spooled with other content than the device sent: {forged[:5]}"
    assert set(held) == set(acked), sorted(set(held) - set(acked))[:5]
    gw = site.gateway
    _n, twice, at_ledger = demo.check_ledger(site.ledger, gw.public_key, gw.gateway_id)
    assert twice == 0
    assert set(acked) <= at_ledger, f"{len(set(acked) - at_ledger)} not committed at the ledger"
    # The intake process reports its counts to the status every 0.1 s.
    deadline = time.monotonic() + 10
    while st.transactions_rejected != rejected and time.monotonic() < deadline:
        time.sleep(0.1)
        st = demo.gateway_status(gw)
    assert st.mqtt_connected and st.transactions_rejected == rejected, st


def honest_devices(sb: Sandbox, port: int, names: list[str]) -> dict[str, Client]:
    out = {}
    for n in names:
        c = Client(issue(sb, n), f"fw-{n}", port)
        assert c.connect() == "Success"
        out[n] = c
    return out


def gateway_mqtt_disconnects(gw: GatewayProc) -> int:
    return gw.proc.log_text().count("mqtt disconnected")


def test_device_with_the_gateways_client_id_cannot_take_its_session(
    tmp_path: Path, site_factory: list[Sandbox]
) -> None:
    sb, site = start_site(tmp_path / "sb", "edge-hostile-takeover")
    site_factory.append(sb)
    gid = site.gateway.gateway_id
    # Every id an intruder can learn or guess: the configured one (here the gateway id,
    # which GetStatus shows), the default form and the intake processes' suffixes.
    guesses = list(dict.fromkeys([site.client_id, gid, f"edge-gateway-{gid}"]))
    guesses += [f"{site.client_id}-{i}" for i in range(2)]
    intruder_files = issue(sb, "intruder-takeover")
    devices = honest_devices(sb, site.device_port, [f"meter-t{i}" for i in range(3)])
    before = gateway_mqtt_disconnects(site.gateway)

    # Round after round, an intruder connects with one of those ids (MQTT 5 and 3.1.1,
    # resuming the session the id names, subscribing to everything) and stays connected
    # while the devices publish the next ten seqs each.
    connacks: list[str] = []
    stolen: list[tuple[str, bytes]] = []
    acked: dict[tuple[str, int], bytes] = {}
    for r in range(10):
        intruder = Client(
            intruder_files, guesses[r % len(guesses)], site.device_port, v5=r % 2 == 0
        )
        connacks.append(intruder.connect())
        intruder.subscribe(["#"])
        acked |= publish_all(devices, per_device=10, first_seq=1 + 10 * r)
        intruder.close()
        stolen += intruder.received
    assert len(acked) == 300 and connacks == ["Success"] * 10

    # On the gateways' listener an intruder has no password: refused, whatever id it uses.
    for cid in guesses[:2]:
        no_pw = Client(intruder_files, cid, site.gateway_port)
        assert no_pw.connect() == "Not authorized"
        wrong = Client(
            intruder_files, cid, site.gateway_port, username="sandbox-gateway", password="x"
        )
        assert wrong.connect() == "Not authorized"
        no_pw.close()
        wrong.close()

    assert_all_committed(site, acked)
    # The gateway's session was never taken: its connection stayed up and the broker
    # named the intruder after its certificate whatever id it asked for.
    assert gateway_mqtt_disconnects(site.gateway) == before, site.gateway.proc.log_text()[-2000:]
    log = (sb.root / site.broker.name / "mosquitto.log").read_text()
    intruder_lines = [ln for ln in log.splitlines() if "u'intruder-takeover'" in ln]
    assert len(intruder_lines) >= len(guesses)
    assert all(" as intruder-takeover " in ln for ln in intruder_lines), intruder_lines[:3]
    assert "mqtt connected" in site.gateway.proc.log_text()
    assert stolen == []
    # Intake keeps serving.
    more = publish_all(devices, per_device=5, first_seq=101)
    assert_all_committed(site, acked | more)
    for c in devices.values():
        c.close()


def test_device_cannot_publish_as_another_device(
    tmp_path: Path, site_factory: list[Sandbox]
) -> None:
    sb, site = start_site(tmp_path / "sb", "edge-hostile-forge")
    site_factory.append(sb)
    victim, other = "meter-victim", "meter-other"
    attacker_files = issue(sb, "meter-attacker")

    # First, the victim's next seqs with other content, and a dead letter in its name. The
    # broker answers a refused publish, then closes the connection (Debian's Mosquitto
    # 2.0.11 does, with max_queued_messages 0): one connection per attempt.
    def forge(topic: str, payload: bytes, v5: bool) -> str:
        c = Client(attacker_files, "forger", site.device_port, v5=v5)
        assert c.connect() == "Success"
        mid = c.publish(topic, payload)
        reason = c.wait_pubacks([mid])[mid]
        c.close()
        return reason

    # MQTT 5 is told "Not authorized"; 3.1.1 has no reason code: acknowledged, dropped.
    for s in range(1, 21):
        assert forge(f"devices/{victim}/tx", body(victim, s, "forged"), True) == "Not authorized"
        assert forge(f"devices/{other}/tx", body(other, s, "forged"), False) == "Success"
    assert forge(f"devices/rejected/{victim}", b'{"reason": "forged"}', True) == "Not authorized"

    # The attacker would read the victim's dead letters, if it could.
    spy = Client(attacker_files, "spy", site.device_port, persistent=False)
    assert spy.connect() == "Success"
    spy.subscribe([f"devices/rejected/{victim}", "devices/rejected/#", "#"])

    devices = honest_devices(sb, site.device_port, [victim, other])
    devices[victim].subscribe([f"devices/rejected/{victim}"])
    acked = publish_all(devices, per_device=50)
    assert len(acked) == 100
    # One malformed reading of the victim's: its dead letter reaches the victim only.
    bad = devices[victim].publish(f"devices/{victim}/tx", b"not json")
    assert devices[victim].wait_pubacks([bad]) == {bad: "Success"}
    deadline = time.monotonic() + WAIT_S
    while not devices[victim].received and time.monotonic() < deadline:
        time.sleep(0.05)
    ((topic, letter),) = devices[victim].received
    assert topic.endswith(f"devices/rejected/{victim}") and b'"not_decodable"' in letter
    # Every real reading stored with its device's own content, none refused as a
    # conflicting_duplicate of a forged one: the one reject is the malformed reading.
    assert_all_committed(site, acked, rejected=1)
    assert rejects(site.gateway) == [("not_decodable", victim)]
    time.sleep(0.5)
    assert spy.received == []
    more = publish_all(devices, per_device=5, first_seq=51)
    assert_all_committed(site, acked | more, rejected=1)
    for c in (spy, *devices.values()):
        c.close()


def test_device_cannot_join_the_gateways_shared_subscription(
    tmp_path: Path, site_factory: list[Sandbox]
) -> None:
    sb, site = start_site(tmp_path / "sb", "edge-hostile-share", intake_processes=2)
    site_factory.append(sb)
    group = site.gateway.gateway_id  # the group with two intake processes and no share_group
    cfg = load_gateway_config(site.config)
    assert cfg.mqtt.intake_processes == 2 and cfg.mqtt.mount_point == MOUNT
    thief = Client(issue(sb, "meter-thief"), "thief", site.device_port)
    assert thief.connect() == "Success"
    # The gateway's group and filter as the device knows it, as the gateway subscribes
    # (below the mount point), and plain wildcards: whatever the broker answers, nothing
    # may reach the thief and nothing may be lost for the gateway.
    thief.subscribe(
        [
            f"$share/{group}/devices/+/tx",
            f"$share/{group}/{MOUNT}devices/+/tx",
            f"$share/{group}/#",
            "devices/+/tx",
            "#",
        ]
    )
    devices = honest_devices(sb, site.device_port, [f"meter-s{i}" for i in range(3)])
    acked = publish_all(devices, per_device=100)
    assert len(acked) == 300
    assert_all_committed(site, acked)
    assert thief.received == []
    more = publish_all(devices, per_device=5, first_seq=101)
    assert_all_committed(site, acked | more)
    for c in (thief, *devices.values()):
        c.close()
