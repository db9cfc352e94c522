"""MQTT intake: QoS 1 messages in, PUBACK only after the spool commit.

paho-mqtt runs with manual acknowledgement; each message is decoded on paho's
network thread, appended to the spool, and acknowledged from the spool's
commit callback. A PUBACK is sent only on the connection the message arrived
on: after a reconnect the broker re-sends what was not acknowledged (the
persistent session, clean_start false), and the spool absorbs the duplicate.
Rejected payloads are recorded in the spool, published to the dead-letter
topic and then acknowledged, so the broker does not redeliver them forever.

Nothing a device sends reaches a topic the gateway publishes unchecked: a dead
letter goes to `<prefix>/<device>` only for a device id the profiles allow, else
to `<prefix>/_invalid` (or `_unknown` without one), and what is stored and
published of a reject is bounded whatever its topic and payload. Each device has
a reject budget; past it, its rejects are counted and acknowledged, and it gets
one summary dead letter per window. An unexpected exception anywhere in intake
is a bug: it goes to the process's gateway.edge.poison.Guard, which stops the gateway.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import logging
import ssl
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.client import PUBACK
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.common.errors import ConfigError, Rejected
from gateway.edge import metrics
from gateway.edge.config import MqttConfig, RejectsConfig
from gateway.edge.mqttrx import BulkClient, Publish
from gateway.edge.poison import POISON_AFTER, Guard
from gateway.edge.profiles.builtin import DEVICE_ID_RE
from gateway.edge.profiles.ratelimit import RateLimiter
from gateway.edge.spool import (
    NOT_STORED,
    AppendCallback,
    AppendItem,
    AppendResult,
    Incoming,
    NotStored,
    Outcome,
    RejectRecord,
    Spool,
    now_ms,
)

log = logging.getLogger("gateway.edge.ingest")
PAYLOAD_HEAD_BYTES = 256
# What a dead letter (and the spool's copy of it) keeps of a reject's text, at most, in
# bytes of its JSON form: with the head, a dead letter stays under DEAD_LETTER_MAX_BYTES.
DETAIL_BYTES = 384
TOPIC_BYTES = 256
DEVICE_PREFIX_BYTES = 64
DEAD_LETTER_MAX_BYTES = 1536
# Dead-letter topic levels for a device id the profiles refuse, and for none at all.
INVALID_DEVICE = "_invalid"
UNKNOWN_DEVICE = "_unknown"
MAX_TOPIC_BYTES = 65535  # MQTT's limit on a topic name
# Devices over their reject budget at once; past it their summaries are written early.
MAX_SUMMARIES = 10_000
# While the broker stays out of reach, its failure is logged at once, then at most this often.
CONNECT_FAIL_LOG_EVERY_S = 30.0
# Messages intake may hold unanswered, per message of the receive maximum. At 4 (4,000
# by default) two group commits of 2,000 are in hand while the next read waits; the
# broker's window is not relied on (Mosquitto 2.0.11 sends past it once PUBACKs flow).
READ_LIMIT_PER_RECEIVE_MAXIMUM = 4


class Decoder(Protocol):
    def decode(
        self,
        device_id: str | None,
        topic: str,
        payload: bytes,
        received_ms: int,
        channel: str,
        profile: str | None = None,
    ) -> Incoming: ...


def valid_device(device_id: str | None) -> str | None:
    """`device_id` if the profiles allow it (DEVICE_ID_RE, the whole string), else None."""
    if device_id and len(device_id) <= 128 and DEVICE_ID_RE.fullmatch(device_id):
        return device_id
    return None


def device_key(device_id: str | None) -> str:
    """The device a reject is counted, budgeted and dead-lettered under."""
    return valid_device(device_id) or (INVALID_DEVICE if device_id else UNKNOWN_DEVICE)


def publishable(topic: str) -> bool:
    """A topic name the gateway may publish to: no wildcard, no NUL, within MQTT's limit."""
    return (
        bool(topic)
        and "+" not in topic
        and "#" not in topic
        and "\0" not in topic
        and len(topic.encode("utf-8", "surrogatepass")) <= MAX_TOPIC_BYTES
    )


def bounded(text: str, limit: int) -> str:
    """`text`, cut so that its JSON string form (UTF-8, escapes included) takes at most
    `limit` bytes."""
    out = text[:limit]
    for _ in range(64):  # each round cuts a quarter at least
        size = len(json.dumps(out, ensure_ascii=False).encode("utf-8", "backslashreplace")) - 2
        if size <= limit:
            return out
        out = out[: min(len(out) - 1, len(out) * limit // size)]
    return ""


def dead_letter(
    rej: Rejected,
    device_id: str | None,
    topic: str,
    payload: bytes,
    received_ms: int,
    payload_sha256: bytes,
) -> bytes:
    """The dead-letter JSON: reason, detail, device, topic, time, payload hash and head.

    Bounded whatever the input: the detail and topic are cut, a device id the profiles
    refuse is given as `_invalid` with its SHA-256 and first characters. A payload that
    carries subscriber identities (a profile's `pseudonymise` fields) never reaches the
    dead-letter topic in clear: its head is left out.
    """
    personal = bool(getattr(rej, "personal_data", False))
    head = b"" if personal else payload[:PAYLOAD_HEAD_BYTES]
    device = valid_device(device_id)
    doc: dict[str, object] = {
        "reason": rej.reason,
        "detail": bounded(rej.detail, DETAIL_BYTES),
        "device": device or (INVALID_DEVICE if device_id else ""),
        "topic": bounded(topic, TOPIC_BYTES),
        "received_ms": received_ms,
        "payload_sha256": payload_sha256.hex(),
        "payload_size": len(payload),
        "payload_head_b64": base64.b64encode(head).decode("ascii"),
    }
    if device is None and device_id:
        raw = device_id.encode("utf-8", "surrogatepass")
        doc["device_sha256"] = hashlib.sha256(raw).hexdigest()
        doc["device_prefix"] = bounded(device_id, DEVICE_PREFIX_BYTES)
        doc["device_size"] = len(raw)
    if doc["topic"] != topic:
        doc["topic_size"] = len(topic.encode("utf-8", "surrogatepass"))
    text = json.dumps(doc, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    # A lone surrogate (never valid UTF-8) is written as its JSON escape.
    return text.encode("utf-8", "backslashreplace")


def connect_failure(exc: BaseException | None) -> str:
    """Why a connection to the broker failed, in the operator's words."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        what = exc.verify_message or exc.reason or str(exc)
        return (
            f"TLS: certificate verify failed ({what}): check mqtt.tls.ca_file against the "
            "broker's certificate"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}: check mqtt.tls and the broker's TLS listener"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (no broker listening on that port)"
    if isinstance(exc, TimeoutError):
        return "timed out (the broker is not reachable from this host)"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return "unknown reason" if exc is None else str(exc) or type(exc).__name__


def mounted(topic: str, mount: str) -> str:
    """`topic` (a filter or a name) under the broker's mount point, after a shared
    subscription's "$share/<group>/"; unchanged without a mount point."""
    if not mount:
        return topic
    if topic.startswith("$share/"):
        _, group, rest = topic.split("/", 2)
        return f"$share/{group}/{mount}{rest}"
    return mount + topic


def device_from_topic(topic: str, level: int) -> str | None:
    parts = topic.split("/", level + 1)
    if level >= len(parts) or not parts[level]:
        return None
    return parts[level]


_PUBACK = struct.Struct("!BBH")


def send_pubacks(client: mqtt.Client, mids: list[int]) -> None:
    """PUBACK (success, the 4-byte form both MQTT 3.1.1 and 5 allow) for each of
    `mids`, as one write: paho's ack() costs a wake-up of its network thread and a
    socket write per message. Uses paho's packet queue, the same call ack() ends in;
    falls back to ack() per message if a paho release renames it."""
    queue = getattr(client, "_packet_queue", None)
    if queue is None or len(mids) == 1:
        for mid in mids:
            client.ack(mid, 1)
        return
    queue(PUBACK, b"".join([_PUBACK.pack(PUBACK, 2, mid) for mid in mids]), 0, 1)


_CHILDREN: dict[tuple[int, str], Any] = {}


def _child(counter: Any, channel: str) -> Any:
    """A counter's child for `channel`, looked up once: labels() costs a microsecond
    per call, which adds up at tens of thousands of messages a second."""
    key = (id(counter), channel)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = counter.labels(channel)
    return child


DoneCallback = Callable[[AppendResult | BaseException, Rejected | None], None]


class _Pending:
    """One payload on its way through the spool writer: the append's callback. `source`
    (topic, payload) is what gateway.edge.poison records if intake fails with it in hand."""

    __slots__ = ("channel", "done", "fp", "intake", "item", "payload", "rej", "topic")

    def __init__(
        self,
        intake: Intake,
        topic: str,
        payload: bytes,
        channel: str,
        done: DoneCallback,
        fp: str | None,
    ) -> None:
        self.intake = intake
        self.topic = topic
        self.payload = payload
        self.channel = channel
        self.done = done
        self.fp = fp
        self.item: AppendItem = NOT_STORED
        self.rej: Rejected | None = None

    @property
    def source(self) -> tuple[str, bytes]:
        return (self.topic, self.payload)

    def __call__(self, res: AppendResult | BaseException) -> None:
        intake = self.intake
        if (
            type(res) is AppendResult
            and res.outcome is Outcome.STORED
            and self.fp is None
            and intake._fault is None
        ):
            # Intake._appended's common case, without its call: stored, nothing on record.
            intake._stored[self.channel] += 1
            self.done(res, self.rej)
            return
        intake._appended(res, self)


class _Suppressed:
    """A device's rejects past its budget in the current summary window."""

    __slots__ = ("channels", "count", "first_ms", "last_ms", "reasons")

    def __init__(self, first_ms: int) -> None:
        self.first_ms = first_ms
        self.last_ms = first_ms
        self.count = 0
        self.reasons: Counter[str] = Counter()
        self.channels: Counter[str] = Counter()


class Intake:
    """Turns payloads from any channel into spool appends; shared by MQTT and gRPC.

    `rejects` sets each device's reject budget (None: every reject is recorded);
    `guard` is the process's failure path and poison record; `fault` is a test-only
    hook (gateway.edge.intakeproc.FAULT_ENV): a payload holding it raises in the writer path."""

    def __init__(
        self,
        spool: Spool,
        decoder: Decoder,
        reject_prefix: str,
        publish_dead_letter: Callable[[int, str, bytes], None],
        *,
        rejects: RejectsConfig | None = None,
        guard: Guard | None = None,
        clock: Callable[[], float] = time.monotonic,
        fault: bytes | None = None,
    ) -> None:
        self.spool = spool
        self.decoder = decoder
        self.reject_prefix = reject_prefix
        self._publish = publish_dead_letter
        self.rejects = rejects
        self.guard = guard if guard is not None else Guard()
        self._budget = RateLimiter(clock)
        self._suppressed: dict[str, _Suppressed] = {}
        self._lock = threading.Lock()
        self._fault = fault
        # Transactions stored, by channel, since the last group commit was answered: the
        # writer thread counts them here and adds them to the metric once per group.
        self._stored: Counter[str] = Counter()
        spool.after_group(self._count_stored)

    def reject_topic(self, device_id: str | None) -> str:
        """`<prefix>/<device>`, for a device id the profiles allow only."""
        return f"{self.reject_prefix}/{device_key(device_id)}"

    def submit(
        self,
        device_id: str | None,
        topic: str,
        payload: bytes,
        channel: str,
        done: DoneCallback,
        profile: str | None = None,
    ) -> None:
        """Decode and append; `done` runs once the outcome is durable (or failed)."""
        received = now_ms()
        _child(metrics.received, channel).inc()
        item, callback = self._prepare(device_id, topic, payload, channel, done, profile, received)
        self.spool.append_cb(item, callback)

    def submit_many(
        self,
        entries: list[tuple[str | None, str, bytes, DoneCallback]],
        channel: str,
        error: Callable[[BaseException, str, bytes], None],
    ) -> None:
        """submit() for each (device_id, topic, payload, done) of what arrived together
        (one socket read), handed to the spool writer at once. An unexpected exception
        for one entry goes to `error(exc, topic, payload)`; the others go on."""
        received = now_ms()
        _child(metrics.received, channel).inc(len(entries))
        out: list[tuple[AppendItem, AppendCallback]] = []
        for device_id, topic, payload, done in entries:
            try:
                out.append(self._prepare(device_id, topic, payload, channel, done, None, received))
            except Exception as e:
                error(e, topic, payload)
        self.spool.append_many(out)

    def _prepare(
        self,
        device_id: str | None,
        topic: str,
        payload: bytes,
        channel: str,
        done: DoneCallback,
        profile: str | None,
        received: int,
    ) -> tuple[AppendItem, AppendCallback]:
        """The payload decoded (or its reject record) and the callback of its append."""
        fp = self.guard.check(topic, payload)
        pending = _Pending(self, topic, payload, channel, done, fp)
        try:
            crashes = self.guard.crashes(fp)
            if crashes >= POISON_AFTER:
                log.warning(
                    "a message on %r (%d bytes) that intake failed with %d times is set aside "
                    "as poison: dead-lettered and acknowledged",
                    topic[:80],
                    len(payload),
                    crashes,
                )
                raise Rejected(
                    "poison",
                    f"intake failed {crashes} times with this message (topic and payload) in "
                    "hand; it is set aside",
                )
            item: AppendItem = self.decoder.decode(
                device_id, topic, payload, received, channel, profile
            )
        except Rejected as r:
            pending.rej = r
            device = getattr(r, "device_id", None) or device_id
            item = self._reject(r, device, topic, payload, received, channel, None)
        pending.item = item
        return item, pending

    def _reject(
        self,
        r: Rejected,
        device_id: str | None,
        topic: str,
        payload: bytes,
        received: int,
        channel: str,
        sha: bytes | None,
    ) -> RejectRecord | NotStored:
        """The reject's record, or NOT_STORED when its device is over its reject budget
        (counted here, summarised by flush_summaries)."""
        key = device_key(device_id)
        budget = self.rejects
        if budget is None or self._budget.allow(key, budget.per_s, budget.burst):
            return RejectRecord(
                reason=r.reason,
                device_id=key,
                topic=f"{self.reject_prefix}/{key}",
                message=dead_letter(
                    r,
                    device_id,
                    topic,
                    payload,
                    received,
                    sha if sha is not None else hashlib.sha256(payload).digest(),
                ),
                received_ms=received,
            )
        metrics.rejected.labels(channel, r.reason).inc()
        _child(metrics.rejects_not_stored, channel).inc()
        flush = False
        with self._lock:
            s = self._suppressed.get(key)
            if s is None:
                s = self._suppressed[key] = _Suppressed(received)
                flush = len(self._suppressed) > MAX_SUMMARIES
            s.count += 1
            s.last_ms = received
            s.reasons[r.reason] += 1
            s.channels[channel] += 1
        if flush:
            self.flush_summaries(force=True)
        return NOT_STORED

    def flush_summaries(self, force: bool = False) -> int:
        """Record and publish one summary dead letter for each device whose summary window
        (rejects.summary_every_s from its first reject not stored) is over; all with
        `force`. Called often by the process's control loop. Returns summaries written."""
        if self.rejects is None or not self._suppressed:
            return 0
        now = now_ms()
        window_ms = int(self.rejects.summary_every_s * 1000)
        with self._lock:
            due = [k for k, s in self._suppressed.items() if force or now - s.first_ms >= window_ms]
            taken = [(k, self._suppressed.pop(k)) for k in due]
        for key, s in taken:
            topic = f"{self.reject_prefix}/{key}"
            message = json.dumps(
                {
                    "summary": True,
                    "device": key,
                    "rejected": s.count,
                    "reasons": dict(sorted(s.reasons.items())),
                    "channels": dict(sorted(s.channels.items())),
                    "first_ms": s.first_ms,
                    "last_ms": s.last_ms,
                    "detail": (
                        f"{s.count} rejects over the device's budget (burst "
                        f"{self.rejects.burst}, {self.rejects.per_s:g}/s) were counted and "
                        "acknowledged, not stored or dead-lettered one by one"
                    ),
                },
                separators=(",", ":"),
                sort_keys=True,
            ).encode("utf-8")
            rec = RejectRecord("summary", key, topic, message, now, count=0)
            self.spool.append_cb(rec, functools.partial(self._summary_recorded, rec))
        return len(taken)

    def _summary_recorded(self, rec: RejectRecord, res: AppendResult | BaseException) -> None:
        if isinstance(res, BaseException):
            log.error("spool append of a reject summary failed: %s", res)
        elif res.outcome is Outcome.REJECT_RECORDED:
            self._publish(res.reject_id, rec.topic, rec.message)

    def _count_stored(self) -> None:
        """After each group commit's answers, on the writer thread."""
        if self._stored:
            for channel, n in self._stored.items():
                _child(metrics.stored, channel).inc(n)
            self._stored.clear()

    def _appended(self, res: AppendResult | BaseException, p: _Pending) -> None:
        """Runs on the spool writer thread once the append is durable (or failed)."""
        if self._fault is not None and p.rej is None and self._fault in p.payload:
            # Test-only (gateway.edge.intakeproc.FAULT_ENV): a bug in processing this message.
            raise RuntimeError("injected fault in the spool writer path (test hook)")
        if isinstance(res, BaseException):
            p.done(res, p.rej)
            return
        item = p.item
        if res.outcome is Outcome.STORED:
            self._stored[p.channel] += 1
        elif res.outcome is Outcome.DUPLICATE:
            _child(metrics.duplicates, p.channel).inc()
        elif res.outcome in (Outcome.CONFLICT, Outcome.BEYOND_RETENTION):
            # Same (device, seq), other content: a replay or tamper. Or a seq so old
            # that retention pruned its history. Record it, then answer.
            assert isinstance(item, Incoming)
            r = (
                Rejected(
                    "replay",
                    f"seq {item.device_seq} is at or below the history this spool still keeps "
                    "for the device (retention)",
                )
                if res.outcome is Outcome.BEYOND_RETENTION
                else Rejected(
                    "conflicting_duplicate",
                    f"seq {item.device_seq} was already stored with other content "
                    f"(tx {res.tx_id.hex()[:16]})",
                )
            )
            again = _Pending(self, p.topic, p.payload, p.channel, p.done, p.fp)
            again.rej = r
            again.item = self._reject(
                r,
                item.device_id,
                p.topic,
                p.payload,
                item.received_ms,
                p.channel,
                item.payload_sha256,
            )
            self.spool.append_cb(again.item, again)
            return
        elif res.outcome is Outcome.REJECT_RECORDED:
            assert isinstance(item, RejectRecord) and p.rej is not None
            metrics.rejected.labels(p.channel, p.rej.reason).inc()
            self._publish(res.reject_id, item.topic, item.message)
        self.guard.settled(p.fp)
        p.done(res, p.rej)


def make_client(cfg: MqttConfig) -> BulkClient:
    """A paho client (with the bulk read path of gateway.edge.mqttrx) as `cfg` asks (auth,
    TLS, reconnect, windows), without callbacks. Raises ConfigError for files that cannot
    be loaded."""
    c = BulkClient(
        CallbackAPIVersion.VERSION2,
        client_id=cfg.client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=True,
    )
    c.reconnect_delay_set(max(1, int(cfg.reconnect_min_s)), int(cfg.reconnect_max_s))
    # Dead letters queue while the broker is away; they are also in the spool.
    c.max_queued_messages_set(0)
    c.max_inflight_messages_set(1000)
    if cfg.username is not None:
        password = None
        if cfg.password_file is not None:
            try:
                password = cfg.password_file.read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ConfigError(
                    f"mqtt.password_file {cfg.password_file} cannot be read: {e.strerror}"
                ) from None
        c.username_pw_set(cfg.username, password)
    if cfg.tls is not None:
        try:
            c.tls_set(
                ca_certs=str(cfg.tls.ca_file),
                certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"mqtt.tls files cannot be loaded: {e}") from None
    return c


class MqttIngest:
    """The paho client: subscription, manual PUBACKs, dead-letter publishing."""

    def __init__(
        self,
        cfg: MqttConfig,
        spool: Spool,
        decoder: Decoder,
        depth: Callable[[], int] = lambda: 0,
        max_depth: int = 0,
        extra_topics: tuple[str, ...] = (),
        window: int = 0,
        *,
        rejects: RejectsConfig | None = None,
        guard: Guard | None = None,
        fault: bytes | None = None,
    ) -> None:
        self.cfg = cfg
        self.topics: tuple[str, ...] = tuple(dict.fromkeys((*cfg.topics, *extra_topics)))
        # Depth is checked per message (spooled + in flight to the spool), so a
        # burst cannot overshoot the limit while the monitor is between looks.
        self._depth = depth
        self._max_depth = max_depth
        self._window = window
        self._inflight = 0
        # Messages read and not yet answered (held, or on their way to the spool):
        # past this the network thread stops reading (mqttrx.BulkClient.may_read).
        self.read_limit = READ_LIMIT_PER_RECEIVE_MAXIMUM * cfg.receive_maximum
        self.most_unanswered = 0
        self._sub_mid: int | None = -1
        self.spool = spool
        self.guard = guard if guard is not None else Guard()
        self.intake = Intake(
            spool,
            decoder,
            cfg.reject_topic_prefix,
            self.publish_dead_letter,
            rejects=rejects,
            guard=self.guard,
            fault=fault,
        )
        self.connected = False
        self.subscribed = threading.Event()
        self.paused = False
        self.acks = 0
        self.completed = 0  # appends answered (acknowledged or not): intake is turning
        self._gen = 0
        self._lock = threading.Lock()
        self._pub_mids: dict[int, int] = {}
        # (mid, qos, gen) answered in this group (qos 0: nothing to acknowledge), on the
        # writer thread; counted and acknowledged after the group (_flush_acks).
        self._answered: list[tuple[int, int, int]] = []
        self._published: list[int] = []
        self._flush_scheduled = False
        self._held: list[tuple[str | None, str, bytes, int, int, int]] = []
        # Connection failures since the last successful connect, when the first came and
        # when one was last logged (the log says it once, then every ~30 s, then recovery).
        self._fails = 0
        self._failing_since = 0.0
        self._fail_logged_at = 0.0
        self._stopping = False
        self._client = self._make_client()
        spool.after_group(self._flush_acks)

    def _make_client(self) -> BulkClient:
        c = make_client(self.cfg)
        c.on_publishes = self._on_publishes
        c.may_read = self._may_read
        c.on_connect = self._guarded(self._on_connect, "mqtt on_connect")
        c.on_connect_fail = self._guarded(self._on_connect_fail, "mqtt on_connect_fail")
        c.on_disconnect = self._guarded(self._on_disconnect, "mqtt on_disconnect")
        c.on_message = self._on_message
        c.on_publish = self._guarded(self._on_publish, "mqtt on_publish")
        c.on_subscribe = self._guarded(self._on_subscribe, "mqtt on_subscribe")
        return c

    def _guarded(self, fn: Callable[..., None], where: str) -> Callable[..., None]:
        """A paho callback whose unexpected exception goes to the guard (which stops the
        gateway) instead of into paho, which would end its network thread silently."""

        def call(*args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:
                self.guard.fatal(e, where)

        return call

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        # The broker should send at most this many unacknowledged QoS 1 messages; the
        # read limit (read_limit) bounds what intake holds when it does not.
        props.ReceiveMaximum = self.cfg.receive_maximum
        self._client.connect_async(
            self.cfg.host, self.cfg.port, self.cfg.keepalive_s, clean_start=False, properties=props
        )
        self._client.loop_start()

    def stop(self) -> None:
        """Stop intake: disconnect; unacknowledged messages stay with the broker."""
        self._stopping = True
        self._new_generation()
        self._client.disconnect()
        self._client.loop_stop()
        self.connected = False
        metrics.mqtt_connected.set(0)

    # ---- paho callbacks (network thread) ---------------------------------

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self._connect_failed(f"refused by the broker: {reason}")
            return
        self._new_generation()
        self.connected = True
        metrics.mqtt_connected.set(1)
        if self._fails:
            log.info(
                "mqtt connected to %s:%s after %d failed attempts over %.0f s",
                self.cfg.host,
                self.cfg.port,
                self._fails,
                time.monotonic() - self._failing_since,
            )
            self._fails = 0
        else:
            log.info("mqtt connected to %s:%s", self.cfg.host, self.cfg.port)
        self._subscribe()
        self.republish_dead_letters()

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        # paho calls this from inside its `except OSError:` around the connect, without
        # the error; it is the exception being handled here (refused, TLS, timeout...).
        self._connect_failed(connect_failure(sys.exc_info()[1]))

    def _connect_failed(self, why: str) -> None:
        """One line at the first failure, then at most every CONNECT_FAIL_LOG_EVERY_S while
        it persists (paho keeps retrying with backoff up to mqtt.reconnect_max_s)."""
        now = time.monotonic()
        if not self._fails:
            self._failing_since = now
        self._fails += 1
        if self._fails == 1:
            self._fail_logged_at = now
            log.warning(
                "mqtt connect to %s:%s failed: %s; retrying with backoff",
                self.cfg.host,
                self.cfg.port,
                why,
            )
        elif now - self._fail_logged_at >= CONNECT_FAIL_LOG_EVERY_S:
            self._fail_logged_at = now
            log.warning(
                "mqtt connect to %s:%s failed: %s (still: %d attempts over %.0f s; retrying)",
                self.cfg.host,
                self.cfg.port,
                why,
                self._fails,
                now - self._failing_since,
            )

    def _subscribe(self) -> None:
        mount = self.cfg.mount_point
        result, mid = self._client.subscribe([(mounted(t, mount), 1) for t in self.topics])
        if result == MQTTErrorCode.MQTT_ERR_SUCCESS:
            with self._lock:
                self._sub_mid = mid

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, reason_codes: list[Any], _p: Any
    ) -> None:
        # Ready only once the broker confirmed (SUBACK): before it, a device message
        # published to a topic without a session subscriber would be dropped.
        with self._lock:
            if mid != self._sub_mid:
                return
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            log.error(
                "mqtt subscription refused by the broker: %s (topics %s)",
                ", ".join(refused),
                ", ".join(self.topics),
            )
            return
        self.subscribed.set()

    def resubscribe(self, topics: tuple[str, ...]) -> None:
        """Subscribe to a new set of filters (after a profile reload); drop the old ones."""
        new = tuple(dict.fromkeys((*self.cfg.topics, *topics)))
        gone = [t for t in self.topics if t not in new]
        self.topics = new
        if self.connected:
            if gone:
                self._client.unsubscribe([mounted(t, self.cfg.mount_point) for t in gone])
            self._subscribe()

    def _new_generation(self) -> None:
        """A new (or lost) connection: message ids of the old one mean nothing now,
        so acknowledgements still pending for it are dropped; the broker re-sends."""
        with self._lock:
            self._gen += 1

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._new_generation()
        self.connected = False
        self.subscribed.clear()
        metrics.mqtt_connected.set(0)
        if self._stopping:
            log.info("mqtt disconnected: intake stopped")
        else:
            log.warning("mqtt disconnected: %s; reconnecting with backoff", reason)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        """A PUBLISH the bulk read path left to paho (properties, QoS 2, a topic that is
        not UTF-8: its .topic raises, which the guard reports)."""
        try:
            self._message(msg.topic, bytes(msg.payload), msg.mid, msg.qos)
        except Exception as e:
            source = None
            with contextlib.suppress(UnicodeDecodeError):
                source = (msg.topic.removeprefix(self.cfg.mount_point), bytes(msg.payload))
            self.guard.fatal(e, "mqtt message", source)

    def _on_publishes(self, batch: list[Publish]) -> None:
        """The PUBLISH packets of one socket read (gateway.edge.mqttrx), on the network
        thread: through the depth and window gates under one lock, then decoded and
        handed to the spool writer together. Gated as _message gates one at a time."""
        mount = self.cfg.mount_point
        level = self.cfg.device_id_level
        go: list[tuple[str | None, str, bytes, DoneCallback]] = []
        try:
            with self._lock:
                gen = self._gen
                depth = self._depth()
                for full_topic, payload, mid, qos in batch:
                    topic = full_topic.removeprefix(mount)
                    device = device_from_topic(topic, level)
                    load = depth + self._inflight + len(go)
                    if not self.paused and self._max_depth and load >= self._max_depth:
                        self.paused = True
                    if self.paused or self._held or (self._window and load >= self._window):
                        self._held.append((device, topic, payload, mid, qos, gen))
                        continue
                    go.append((device, topic, payload, self._done_for(mid, qos, gen)))
                self._inflight += len(go)
                unanswered = self._inflight + len(self._held)
                if unanswered > self.most_unanswered:
                    self.most_unanswered = unanswered
            if go:
                self.intake.submit_many(go, "mqtt", self._failed_message)
        except Exception as e:
            self.guard.fatal(e, "mqtt messages")

    def _may_read(self) -> bool:
        """Whether the network thread may read more: under the read limit, or paused
        (nothing is acknowledged then, so the broker stops at the receive maximum by
        itself), or not yet connected (the CONNACK and SUBACK must be read)."""
        return (
            self._inflight + len(self._held) < self.read_limit or self.paused or not self.connected
        )

    def _done_for(self, mid: int, qos: int, gen: int) -> DoneCallback:
        return lambda res, _rej: self._done(res, mid, qos, gen)

    def _failed_message(self, e: BaseException, topic: str, payload: bytes) -> None:
        self.guard.fatal(e, "mqtt message", (topic, payload))

    def _message(self, full_topic: str, payload: bytes, mid: int, qos: int) -> None:
        # Devices publish below the broker's mount point; they and the profiles know the
        # topic without it.
        topic = full_topic.removeprefix(self.cfg.mount_point)
        device = device_from_topic(topic, self.cfg.device_id_level)
        with self._lock:
            gen = self._gen
            if (
                not self.paused
                and self._max_depth
                and (self._depth() + self._inflight >= self._max_depth)
            ):
                self.paused = True
            # Flow window: while more than `window` transactions wait to be batched,
            # new ones wait unacknowledged (the broker stops at receive_maximum). Under
            # a backlog this keeps intake from starving batching and forwarding of
            # the GIL; release() lets them in as batches are cut.
            if (
                self.paused
                or self._held
                or (self._window and self._depth() + self._inflight >= self._window)
            ):
                self._held.append((device, topic, payload, mid, qos, gen))
                return
        self._submit(device, topic, payload, mid, qos, gen)

    def release(self) -> None:
        """Let held messages in while under the flow window (called when a batch is cut)."""
        self._let_in(resuming=False)

    def _let_in(self, resuming: bool) -> None:
        """Held messages in arrival order, as many as the flow window (and, resuming, the
        depth limit) has room for, decoded and handed to the spool writer together as one
        socket read's are. Resuming also pauses again at the depth limit, or unpauses."""
        with self._lock:
            if self.paused and not resuming:
                return
            load = self.load()
            if resuming and self._max_depth and load >= self._max_depth:
                self.paused = True
                return
            held = self._held
            room = len(held)
            if self._window:
                room = min(room, max(0, self._window - load))
            if resuming and self._max_depth:
                room = min(room, self._max_depth - load)
            take = held[:room]
            del held[:room]
            go = [(d, t, p, self._done_for(mid, qos, gen)) for d, t, p, mid, qos, gen in take]
            self._inflight += len(go)
            if resuming:
                self.paused = bool(self._max_depth) and load + len(go) >= self._max_depth
        if go:
            try:
                self.intake.submit_many(go, "mqtt", self._failed_message)
            except Exception as e:
                self.guard.fatal(e, "mqtt messages")

    def _submit(
        self, device: str | None, topic: str, payload: bytes, mid: int, qos: int, gen: int
    ) -> None:
        with self._lock:
            self._inflight += 1
        try:
            self.intake.submit(
                device, topic, payload, "mqtt", lambda res, _rej: self._done(res, mid, qos, gen)
            )
        except Exception as e:
            self.guard.fatal(e, "mqtt message", (topic, payload))

    def _done(self, res: AppendResult | BaseException, mid: int, qos: int, gen: int) -> None:
        """Runs on the spool writer thread, which alone touches _answered; the group's
        listener (_flush_acks) counts the answers and sends the PUBACKs under the lock
        once per group, not once per message."""
        if isinstance(res, BaseException):
            # Not committed: no PUBACK. The broker re-sends it after the next reconnect.
            log.error("spool append failed, message %d stays unacknowledged: %s", mid, res)
            self._answered.append((mid, 0, gen))
        else:
            self._answered.append((mid, qos, gen))

    def _flush_acks(self) -> None:
        """After a group commit: what it answered counted, and one write with the PUBACKs
        of what it made durable (QoS 1, on the connection it arrived on; a message from
        an older connection is not acknowledged: the broker re-sends it)."""
        answered, self._answered = self._answered, []
        if not answered:
            return
        with self._lock:
            self._inflight -= len(answered)
            self.completed += len(answered)
            gen = self._gen
            mids = [mid for mid, qos, g in answered if qos == 1 and g == gen]
            if mids:
                send_pubacks(self._client, mids)
                self.acks += len(mids)
        if self._client.read_paused:
            self._client.room.set()

    # ---- dead letters ----------------------------------------------------

    def publish_dead_letter(self, reject_id: int, topic: str, message: bytes) -> None:
        if not self.connected:
            return  # stays unpublished in the spool; republished on connect
        if not publishable(topic):
            # Recorded before ids were checked (an older spool): never a wildcard, a NUL or
            # an over-long name on the wire, where it would cost the connection.
            topic = f"{self.cfg.reject_topic_prefix}/{INVALID_DEVICE}"
        info = self._client.publish(mounted(topic, self.cfg.mount_point), message, qos=1)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            with self._lock:
                self._pub_mids[info.mid] = reject_id

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _reason: Any, _p: Any) -> None:
        with self._lock:
            rid = self._pub_mids.pop(mid, None)
            if rid is None:
                return
            self._published.append(rid)
            metrics.dead_letters_published.inc()
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        self.spool.write(self._mark_published)

    def _mark_published(self, conn: Any) -> None:
        with self._lock:
            ids, self._published = self._published, []
            self._flush_scheduled = False
        Spool.w_mark_published(conn, ids)

    def republish_dead_letters(self) -> None:
        """Publish what the spool holds unpublished (on connect; when another process
        recorded rejects), skipping what is already on its way."""

        def publish(f: Future[list[tuple[int, str, bytes]]]) -> None:
            if f.exception() is not None:
                return
            try:
                with self._lock:
                    pending = set(self._pub_mids.values())
                for rid, topic, message in f.result():
                    if rid not in pending:
                        self.publish_dead_letter(rid, topic, message)
            except Exception as e:  # in a future's callback, which would only log it
                self.guard.fatal(e, "dead-letter republish")

        self.spool.read(lambda c: Spool.q_unpublished_rejects(c, 10_000)).add_done_callback(publish)

    # ---- back-pressure ---------------------------------------------------
    #
    # Pausing must not unsubscribe: a persistent session without the subscription
    # would stop queueing for us. Instead, held messages are not acknowledged;
    # once receive_maximum of them are in flight the broker sends no more and
    # keeps the rest queued in the session.

    def pause(self) -> None:
        with self._lock:
            self.paused = True

    @property
    def inflight(self) -> int:
        """Messages decoded and on their way to the spool."""
        return self._inflight

    def load(self) -> int:
        """Transactions spooled but not batched, plus those on their way to the spool."""
        return self._depth() + self._inflight

    def resume(self) -> None:
        """Release held messages while under the depth limit; pause again at it."""
        self._let_in(resuming=True)
