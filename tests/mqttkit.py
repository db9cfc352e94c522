"""What the intake tests need around a running gateway: a device that publishes, a
subscriber that collects the dead letters, the gateway's metrics and spool as counted."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from prometheus_client.parser import text_string_to_metric_families

from gateway.lab.sandbox import GatewayProc, Sandbox

REJECT_PREFIX = "devices/rejected"


class Publisher:
    """A device's MQTT client (QoS 1, the device certificate). publish() returns once the
    broker acknowledged; publish_many() keeps up to `window` messages in flight."""

    def __init__(self, sb: Sandbox, port: int, client_id: str = "hostile-device") -> None:
        self.client = sb.mqtt_client(client_id)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        deadline = time.monotonic() + 20
        while not self.client.is_connected():
            assert time.monotonic() < deadline, "publisher did not connect"
            time.sleep(0.02)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(30)
        assert info.is_published(), f"broker did not acknowledge a message on {topic[:60]!r}"

    def publish_many(self, messages: Iterator[tuple[str, bytes]], window: int = 500) -> int:
        """Publish every (topic, payload); returns how many the broker acknowledged."""
        inflight: list[mqtt.MQTTMessageInfo] = []
        sent = 0
        for topic, payload in messages:
            inflight.append(self.client.publish(topic, payload, qos=1))
            sent += 1
            if len(inflight) >= window:
                for info in inflight[: window // 2]:
                    info.wait_for_publish(60)
                    assert info.is_published()
                del inflight[: window // 2]
        for info in inflight:
            info.wait_for_publish(60)
            assert info.is_published()
        return sent

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class DeadLetters:
    """Everything published under the dead-letter prefix, in order, as (topic, document)."""

    def __init__(self, sb: Sandbox, port: int, client_id: str = "dead-letter-reader") -> None:
        self.letters: list[tuple[str, dict[str, Any], int]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = sb.mqtt_client(client_id)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(f"{REJECT_PREFIX}/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(20), "dead-letter subscriber got no SUBACK"

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        doc = json.loads(msg.payload)
        # The topic as the gateway named it: a broker listener's mount point, if it shows
        # one before it, is left out.
        topic = msg.topic[msg.topic.find(f"{REJECT_PREFIX}/") :]
        with self._lock:
            self.letters.append((topic, doc, len(msg.payload)))

    def snapshot(self) -> list[tuple[str, dict[str, Any], int]]:
        with self._lock:
            return list(self.letters)

    def wait_for(
        self, match: Callable[[str, dict[str, Any]], bool], timeout: float = 30, count: int = 1
    ) -> list[tuple[str, dict[str, Any], int]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [x for x in self.snapshot() if match(x[0], x[1])]
            if len(found) >= count:
                return found
            assert time.monotonic() < deadline, (
                f"{len(found)} of {count} dead letters within {timeout} s; "
                f"have {[(t, d.get('reason')) for t, d, _n in self.snapshot()[-5:]]}"
            )
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def metrics_url(gw: GatewayProc) -> str:
    listen = tomllib.loads(gw.config.read_text())["metrics"]["listen"]
    return f"http://{listen}/metrics"


def scrape(gw: GatewayProc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The gateway's Prometheus samples: (name, sorted labels) -> value."""
    with urllib.request.urlopen(metrics_url(gw), timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _labels), v in samples.items() if n == name)


def by_label(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, label: str
) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        if n == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def spool_rows(spool: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Rows of a query on the spool, through a read-only connection (the gateway may run)."""
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def spool_bytes(spool: Path) -> int:
    """The spool on disk: the database and its write-ahead log."""
    wal = Path(f"{spool}-wal")
    return spool.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


@contextmanager
def device(sb: Sandbox, port: int, client_id: str = "hostile-device") -> Iterator[Publisher]:
    p = Publisher(sb, port, client_id)
    try:
        yield p
    finally:
        p.close()


@contextmanager
def dead_letters(sb: Sandbox, port: int) -> Iterator[DeadLetters]:
    d = DeadLetters(sb, port)
    try:
        yield d
    finally:
        d.close()
