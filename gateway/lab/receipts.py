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

from gateway.formats import device_verifier

RECEIPT_TOPIC = "receipts/{device}"


def trust(
    origin: str, public_key_pem: Path, witness_vkeys: Sequence[str], quorum: int
) -> device_verifier.Trust:
    """What a device is provisioned with: the log's origin, the gateway's key as DER
    SubjectPublicKeyInfo, the witnesses' vkeys and how many must have cosigned."""
    key = serialization.load_pem_public_key(public_key_pem.read_bytes())
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return device_verifier.Trust.of(origin, [der], list(witness_vkeys), quorum)


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
    ) -> None:
        """`tls`: something with apply_paho(client) (gateway.lab.sandbox.ClientFiles)."""
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
        self.c.connect(self._host, self._port, 30)
        self.c.loop_start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._connected:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"receipt subscriber: no CONNACK within {timeout} s")
                self._cond.wait(left)
            n = len(self.subacks)
        self.c.subscribe([(f, 1) for f in filters])
        with self._cond:
            while len(self.subacks) == n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"receipt subscriber: no SUBACK within {timeout} s")
                self._cond.wait(left)
            return self.subacks[n]

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
