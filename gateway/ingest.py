"""MQTT intake: QoS 1 messages in, PUBACK only after the spool commit.

paho-mqtt runs with manual acknowledgement; each message is decoded on paho's
network thread, appended to the spool, and acknowledged from the spool's
commit callback. A PUBACK is sent only on the connection the message arrived
on: after a reconnect the broker re-sends what was not acknowledged (the
persistent session, clean_start false), and the spool absorbs the duplicate.
Rejected payloads are recorded in the spool, published to the dead-letter
topic and then acknowledged, so the broker does not redeliver them forever.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.client import PUBACK
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import metrics
from gateway.config import MqttConfig
from gateway.errors import ConfigError, Rejected
from gateway.spool import AppendResult, Incoming, Outcome, RejectRecord, Spool, now_ms

log = logging.getLogger("gateway.ingest")
PAYLOAD_HEAD_BYTES = 256
# While the broker stays out of reach, its failure is logged at once, then at most this often.
CONNECT_FAIL_LOG_EVERY_S = 30.0


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


def dead_letter(
    rej: Rejected,
    device_id: str,
    topic: str,
    payload: bytes,
    received_ms: int,
    payload_sha256: bytes,
) -> bytes:
    """The dead-letter JSON: reason, detail, device, topic, time, payload hash and head.

    A payload that carries subscriber identities (a profile's `pseudonymise`
    fields) never reaches the dead-letter topic in clear: its head is left out.
    """
    personal = bool(getattr(rej, "personal_data", False))
    head = b"" if personal else payload[:PAYLOAD_HEAD_BYTES]
    return json.dumps(
        {
            "reason": rej.reason,
            "detail": rej.detail,
            "device": device_id,
            "topic": topic,
            "received_ms": received_ms,
            "payload_sha256": payload_sha256.hex(),
            "payload_size": len(payload),
            "payload_head_b64": base64.b64encode(head).decode("ascii"),
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode("utf-8")


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


def device_from_topic(topic: str, level: int) -> str | None:
    parts = topic.split("/")
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


class Intake:
    """Turns payloads from any channel into spool appends; shared by MQTT and gRPC."""

    def __init__(
        self,
        spool: Spool,
        decoder: Decoder,
        reject_prefix: str,
        publish_dead_letter: Callable[[int, str, bytes], None],
    ) -> None:
        self.spool = spool
        self.decoder = decoder
        self.reject_prefix = reject_prefix
        self._publish = publish_dead_letter

    def reject_topic(self, device_id: str) -> str:
        return f"{self.reject_prefix}/{device_id or '_unknown'}"

    def submit(
        self,
        device_id: str | None,
        topic: str,
        payload: bytes,
        channel: str,
        done: Callable[[AppendResult | BaseException, Rejected | None], None],
        profile: str | None = None,
    ) -> None:
        """Decode and append; `done` runs once the outcome is durable (or failed)."""
        import hashlib

        received = now_ms()
        _child(metrics.received, channel).inc()
        try:
            item: Incoming | RejectRecord = self.decoder.decode(
                device_id, topic, payload, received, channel, profile
            )
            rej = None
        except Rejected as r:
            rej = r
            device = getattr(r, "device_id", None) or device_id or ""
            item = self._reject_record(
                r, device, topic, payload, received, hashlib.sha256(payload).digest()
            )
        self.spool.append_cb(
            item, lambda res: self._appended(res, item, rej, topic, payload, channel, done)
        )

    def _reject_record(
        self, r: Rejected, device_id: str, topic: str, payload: bytes, received: int, sha: bytes
    ) -> RejectRecord:
        return RejectRecord(
            reason=r.reason,
            device_id=device_id,
            topic=self.reject_topic(device_id),
            message=dead_letter(r, device_id, topic, payload, received, sha),
            received_ms=received,
        )

    def _appended(
        self,
        res: AppendResult | BaseException,
        item: Incoming | RejectRecord,
        rej: Rejected | None,
        topic: str,
        payload: bytes,
        channel: str,
        done: Callable[[AppendResult | BaseException, Rejected | None], None],
    ) -> None:
        """Runs on the spool writer thread once the append is durable (or failed)."""
        if isinstance(res, BaseException):
            done(res, rej)
            return
        if res.outcome is Outcome.STORED:
            _child(metrics.stored, channel).inc()
        elif res.outcome is Outcome.DUPLICATE:
            _child(metrics.duplicates, channel).inc()
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
            rec = self._reject_record(
                r, item.device_id, topic, payload, item.received_ms, item.payload_sha256
            )
            self.spool.append_cb(
                rec, lambda res2: self._appended(res2, rec, r, topic, payload, channel, done)
            )
            return
        elif res.outcome is Outcome.REJECT_RECORDED:
            assert isinstance(item, RejectRecord) and rej is not None
            metrics.rejected.labels(channel, rej.reason).inc()
            self._publish(res.reject_id, item.topic, item.message)
        done(res, rej)


def make_client(cfg: MqttConfig) -> mqtt.Client:
    """A paho client as `cfg` asks (auth, TLS, reconnect, windows), without callbacks.
    Raises ConfigError for files that cannot be loaded."""
    c = mqtt.Client(
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
    ) -> None:
        self.cfg = cfg
        self.topics: tuple[str, ...] = tuple(dict.fromkeys((*cfg.topics, *extra_topics)))
        # Depth is checked per message (spooled + in flight to the spool), so a
        # burst cannot overshoot the limit while the monitor is between looks.
        self._depth = depth
        self._max_depth = max_depth
        self._window = window
        self._inflight = 0
        self._sub_mid: int | None = -1
        self.spool = spool
        self.intake = Intake(spool, decoder, cfg.reject_topic_prefix, self.publish_dead_letter)
        self.connected = False
        self.subscribed = threading.Event()
        self.paused = False
        self.acks = 0
        self._gen = 0
        self._lock = threading.Lock()
        self._pub_mids: dict[int, int] = {}
        self._acks: list[int] = []  # committed this group, acknowledged after it
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

    def _make_client(self) -> mqtt.Client:
        c = make_client(self.cfg)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        return c

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        # The broker sends at most this many unacknowledged QoS 1 messages: it bounds
        # what waits for a group commit, and so the memory intake can take.
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
        result, mid = self._client.subscribe([(t, 1) for t in self.topics])
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
                self._client.unsubscribe(gone)
            self._subscribe()

    def _new_generation(self) -> None:
        """A new (or lost) connection: message ids of the old one mean nothing now,
        so acknowledgements still pending for it are dropped; the broker re-sends."""
        with self._lock:
            self._gen += 1
            self._acks.clear()

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
        topic = msg.topic
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
                self._held.append((device, topic, bytes(msg.payload), msg.mid, msg.qos, gen))
                return
        self._submit(device, topic, bytes(msg.payload), msg.mid, msg.qos, gen)

    def release(self) -> None:
        """Let held messages in while under the flow window (called when a batch is cut)."""
        if self.paused:
            return
        while True:
            with self._lock:
                if self.paused or not self._held:
                    return
                if self._window and self.load() >= self._window:
                    return
                device, topic, payload, mid, qos, gen = self._held.pop(0)
            self._submit(device, topic, payload, mid, qos, gen)

    def _submit(
        self, device: str | None, topic: str, payload: bytes, mid: int, qos: int, gen: int
    ) -> None:
        with self._lock:
            self._inflight += 1
        self.intake.submit(
            device, topic, payload, "mqtt", lambda res, _rej: self._done(res, mid, qos, gen)
        )

    def _done(self, res: AppendResult | BaseException, mid: int, qos: int, gen: int) -> None:
        """Runs on the spool writer thread; the PUBACK leaves with its group (_flush_acks)."""
        with self._lock:
            self._inflight -= 1
            if isinstance(res, BaseException):
                # Not committed: no PUBACK. The broker re-sends it after the next reconnect.
                log.error("spool append failed, message %d stays unacknowledged: %s", mid, res)
                return
            if qos == 1 and gen == self._gen:
                # (From an older connection: not acknowledged; the broker re-sends it.)
                self._acks.append(mid)

    def _flush_acks(self) -> None:
        """After a group commit: one write with the PUBACKs of everything it made durable."""
        with self._lock:
            if not self._acks:
                return
            mids, self._acks = self._acks, []
            send_pubacks(self._client, mids)
            self.acks += len(mids)

    # ---- dead letters ----------------------------------------------------

    def publish_dead_letter(self, reject_id: int, topic: str, message: bytes) -> None:
        if not self.connected:
            return  # stays unpublished in the spool; republished on connect
        info = self._client.publish(topic, message, qos=1)
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
            if f.exception() is None:
                with self._lock:
                    pending = set(self._pub_mids.values())
                for rid, topic, message in f.result():
                    if rid not in pending:
                        self.publish_dead_letter(rid, topic, message)

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
        while True:
            with self._lock:
                if self._max_depth and self.load() >= self._max_depth:
                    self.paused = True
                    return
                if not self._held or (self._window and self.load() >= self._window):
                    self.paused = False
                    return
                device, topic, payload, mid, qos, gen = self._held.pop(0)
            self._submit(device, topic, payload, mid, qos, gen)
