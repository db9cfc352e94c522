"""Devices that keep their receipts: subscribe to their receipt topics, collect what the
gateway publishes there and check it with the reference device verifier
(gateway.formats.device_verifier), as a device would. For the demo and the tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.formats import batchformat, device_verifier

RECEIPT_TOPIC = "receipts/{device}"


def trust(
    origin: str, public_key_pem: Path, witness_vkeys: Sequence[str], quorum: int
) -> device_verifier.Trust:
    """What a device is provisioned with: the log's origin, the gateway's key as DER
    SubjectPublicKeyInfo, the witnesses' vkeys and how many must have cosigned."""
    ders = [
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for key in batchformat.load_public_keys(public_key_pem.read_bytes())
    ]
    return device_verifier.Trust.of(origin, ders, list(witness_vkeys), quorum)


@dataclass
class Tally:
    received: int = 0
    verified: int = 0
    failed: list[str] = field(default_factory=list)
    # tx_id -> the largest tree size a verified receipt of it carried
    tx_ids: dict[bytes, int] = field(default_factory=dict)

    def line(self) -> str:
        return f"receipts: {self.received} received, {self.verified} verified"


class ReceiptSubscriber:
    """One MQTT client subscribed to receipt topics; keeps every message it gets."""

    def __init__(
        self,
        port: int,
        client_id: str,
        tls: object | None = None,
        host: str = "127.0.0.1",
        session_s: int = 0,
    ) -> None:
        """`tls`: something with apply_paho(client) (gateway.lab.sandbox.ClientFiles);
        `session_s`: the broker keeps the session (and receipts for it) this long while the
        client is away; paho reconnects on its own."""
        self._session_s = session_s
        self._filters: list[str] = []
        self._cond = threading.Condition()
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: list[list[str]] = []
        self._connected = False
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        apply = getattr(tls, "apply_paho", None)
        if apply is not None:
            apply(self.c)
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self._host, self._port = host, port

    def _on_connect(self, _c: object, _u: object, _f: object, rc: object, _p: object) -> None:
        with self._cond:
            self._connected = not getattr(rc, "is_failure", False)
            self._cond.notify_all()
            again = self._connected and self._filters
        # Subscribe again after a reconnect: a device does not count on the broker having
        # kept its session (a restarted Mosquitto 2.0.11 does not deliver to one below a
        # mount point).
        if again:
            self.c.subscribe([(f, 1) for f in self._filters])

    def _on_subscribe(self, _c: object, _u: object, _m: int, rcs: list[Any], _p: object) -> None:
        with self._cond:
            self.subacks.append([str(r) for r in rcs])
            self._cond.notify_all()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def start(self, filters: Iterable[str], timeout: float = 20.0) -> list[str]:
        """Connect, subscribe QoS 1; the SUBACK's reason codes."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_s
        self.c.reconnect_delay_set(1, 2)
        self.c.connect(self._host, self._port, 30, properties=props)
        self.c.loop_start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._connected:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"receipt subscriber: no CONNACK within {timeout} s")
                self._cond.wait(left)
            n = len(self.subacks)
        self._filters = list(filters)
        self.c.subscribe([(f, 1) for f in self._filters])
        with self._cond:
            while len(self.subacks) == n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"receipt subscriber: no SUBACK within {timeout} s")
                self._cond.wait(left)
            return self.subacks[n]

    def wait_subscribed(self, subacks: int, timeout: float) -> bool:
        """Wait (bounded) until `subacks` SUBACKs arrived in all (a resubscription)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.subacks) < subacks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def wait_for(self, count: int, timeout: float) -> int:
        """Wait (bounded) until `count` messages arrived; how many did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            return len(self.messages)

    def wait_for_tx_ids(self, want: set[bytes], timeout: float) -> set[bytes]:
        """Wait (bounded) until a receipt for each of `want` arrived; those still missing."""
        deadline = time.monotonic() + timeout
        missing = set(want)
        seen = 0
        while True:
            with self._cond:
                new = self.messages[seen:]
                seen = len(self.messages)
            for _topic, data in new:
                if len(data) >= 33:
                    missing.discard(data[1:33])
            left = deadline - time.monotonic()
            if not missing or left <= 0:
                return missing
            with self._cond:
                if len(self.messages) == seen:
                    self._cond.wait(min(left, 0.5))

    def tally(self, t: device_verifier.Trust, topic: str | None = None) -> Tally:
        """Verify every receipt received (on `topic` only, if given)."""
        out = Tally()
        with self._cond:
            messages = list(self.messages)
        for got_topic, data in messages:
            if topic is not None and got_topic != topic:
                continue
            out.received += 1
            try:
                v = device_verifier.verify_receipt(data, t)
            except device_verifier.ReceiptInvalid as e:
                out.failed.append(f"{got_topic}: {e}")
                continue
            out.verified += 1
            out.tx_ids[v.tx_id] = max(v.size, out.tx_ids.get(v.tx_id, 0))
        return out

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def opt_in(src: Path, dst: Path, profiles: Iterable[str], topic: str = RECEIPT_TOPIC) -> Path:
    """Copy the profile files of `src` into `dst`, the named ones (file stems) with
    `[receipts] enabled = true`; returns `dst`."""
    names = set(profiles)
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.toml")):
        text = f.read_text(encoding="utf-8")
        if f.stem in names:
            text += f'\n[receipts]\nenabled = true\ntopic = "{topic}"\n'
        (dst / f.name).write_text(text, encoding="utf-8")
    return dst


def tracker_payload(seq: int, now_ms: int | None = None) -> bytes:
    """A valid lte-m-tracker@1 position."""
    ts = int(time.time() * 1000) if now_ms is None else now_ms
    return (
        f'{{"seq":{seq},"ts":{ts},"pos":{{"lat":22.5,"lon":114.05}},"speed":12.5,'
        '"batt":{"mv":3712},"cell":{"mcc":"001","mnc":"01","tac":4321,"eci":123456789}}'
    ).encode()
