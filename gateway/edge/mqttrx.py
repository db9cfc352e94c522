"""MQTT receive in bulk, under paho-mqtt.

paho reads a packet with at least three recv() calls (the command byte, the
remaining length a byte at a time, the rest), returns to select() after each
packet, and builds an MQTTMessage with MQTT 5 Properties for every PUBLISH. At
tens of thousands of messages a second that is most of its cost (about 25 µs per
QoS 1 message for MQTT 5 on the reference machine, against under 1 µs for a bulk
parser).

`BulkClient` keeps everything else of paho (connect, TLS, MQTT 5 and 3.1.1,
persistent sessions, keepalive, reconnect, subscribe, publish, PUBACK writes)
and replaces only the read side of its network loop: each time the socket is
readable it takes what is there in one recv() (up to READ_BYTES), cuts every
complete packet out of it, and hands the PUBLISH packets without properties
straight to `on_publishes([(topic, payload, mid, qos), ...])`, one call for all
of them in a row. Anything else (CONNACK, SUBACK,
PUBACK of the gateway's own publishes, PINGRESP, DISCONNECT, a PUBLISH with
properties or QoS 2 or a topic that is not UTF-8) goes to paho's own handler,
exactly as paho would have read it. A partial packet waits in the buffer for
the rest: the socket turns readable again when it arrives (over TLS, paho's loop
also asks the TLS layer for bytes it holds already).

`may_read`, when set, is asked before each recv(): while it says no, the bytes stay
in the kernel and TCP pushes back on the broker. Withholding PUBACKs alone does not
bound what arrives: Mosquitto 2.0.11 sends past the receive maximum once
acknowledgements flow again. The loop waits on `room` (set by whoever answers
messages) for at most READ_PAUSE_S, so writes still run; after half the keepalive
without a read it reads once anyway, so the broker's PINGRESP is not left unread
behind the data (paho drops a connection whose PINGRESP is late).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket

if TYPE_CHECKING:
    from paho.mqtt.client import _InPacket

log = logging.getLogger("gateway.edge.mqttrx")

# What one recv() may take. A read of this size holds about 1,500 PUBLISH packets of
# 120 B payloads, more than the receive maximum lets the broker send ahead.
READ_BYTES = 256 * 1024
# Longest wait for room before paho's loop runs again (PUBACK writes, keepalive).
READ_PAUSE_S = 0.05
_PUBLISH = 0x30

# topic, payload, packet id (0 for QoS 0), QoS
Publish = tuple[str, bytes, int, int]
Publishes = Callable[[list[Publish]], None]


def _fresh_in_packet() -> _InPacket:
    return {
        "command": 0,
        "have_remaining": 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": 0,
        "packet": bytearray(b""),
        "to_process": 0,
        "pos": 0,
    }


class BulkClient(mqtt.Client):
    """paho's Client with a bulk read path; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rx = b""
        self._rx_sock: object | None = None
        self.on_publishes: Publishes | None = None
        self.may_read: Callable[[], bool] | None = None
        self.room = threading.Event()
        self.read_paused = False
        self._gated_since = 0.0
        self.reads = 0
        self.read_pauses = 0
        self.packets = 0

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """One recv(), then every complete packet in what has arrived."""
        sock = self._sock
        if sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        if sock is not self._rx_sock:  # a new connection: nothing of the old one counts
            self._rx_sock = sock
            self._rx = b""
        gate = self.may_read
        if gate is not None:
            if gate():
                self._gated_since = 0.0
            else:
                now = time.monotonic()
                if not self._gated_since:
                    self._gated_since = now
                if not self._keepalive or now - self._gated_since < self._keepalive / 2:
                    self.room.clear()
                    self.read_paused = True
                    if not gate():  # room made before clear() is not missed
                        self.read_pauses += 1
                        self.room.wait(READ_PAUSE_S)
                    self.read_paused = False
                    return MQTTErrorCode.MQTT_ERR_SUCCESS
                self._gated_since = now  # one read for the keepalive, then wait again
        try:
            data = sock.recv(READ_BYTES)
        except ssl.SSLWantReadError:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        except ssl.SSLWantWriteError:
            self._call_socket_register_write()
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        except OSError as err:
            self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if not data:
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        self.reads += 1
        with self._msgtime_mutex:
            self._last_bytes_received = time.monotonic()
        buf = self._rx + data if self._rx else data
        rc, used = self._packets(buf)
        if self._sock is not sock:  # a handler closed or replaced the connection
            self._rx = b""
            return rc
        self._rx = buf[used:]
        if rc > 0:
            return self._loop_rc_handle(rc)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packets(self, buf: bytes) -> tuple[MQTTErrorCode, int]:
        """Handle every complete packet in `buf`; returns a failure (or success) and the
        bytes used. Stops at the first failure: the connection is closed after it."""
        n = len(buf)
        pos = 0
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        deliver = self.on_publishes
        fast: list[Publish] = []
        count = 0
        while pos + 2 <= n:
            command = buf[pos]
            # Remaining length: 1 to 4 bytes of 7 bits, least significant first.
            length = 0
            mult = 1
            i = pos + 1
            while True:
                if i >= n:
                    self.packets += count
                    if fast and deliver is not None:
                        deliver(fast)
                    return MQTTErrorCode.MQTT_ERR_SUCCESS, pos
                byte = buf[i]
                length += (byte & 0x7F) * mult
                i += 1
                if not byte & 0x80:
                    break
                mult *= 128
                if i - pos > 4:
                    self.packets += count
                    if fast and deliver is not None:
                        deliver(fast)
                    return MQTTErrorCode.MQTT_ERR_PROTOCOL, pos
            end = i + length
            if end > n:
                break
            count += 1
            if deliver is not None and command & 0xF0 == _PUBLISH:
                one = self._publish_fast(command, buf, i, end, v5)
                if one is not None:
                    fast.append(one)
                    pos = end
                    continue
            if fast and deliver is not None:  # in order: what came before this packet first
                deliver(fast)
                fast = []
            rc = self._paho_packet(command, buf[i:end])
            pos = end
            if rc > 0 or self._sock is None:
                self.packets += count
                return rc, pos
        self.packets += count
        if fast and deliver is not None:
            deliver(fast)
        return MQTTErrorCode.MQTT_ERR_SUCCESS, pos

    @staticmethod
    def _publish_fast(command: int, buf: bytes, start: int, end: int, v5: bool) -> Publish | None:
        """A QoS 0 or 1 PUBLISH without properties, or None for paho's handler."""
        qos = (command >> 1) & 3
        if qos == 2 or end - start < 2:
            return None
        tlen = (buf[start] << 8) | buf[start + 1]
        p = start + 2 + tlen
        if p > end:
            return None
        mid = 0
        if qos:
            if p + 2 > end:
                return None
            mid = (buf[p] << 8) | buf[p + 1]
            p += 2
        if v5:
            if p >= end or buf[p] != 0:  # properties present (or malformed): paho's path
                return None
            p += 1
        try:
            topic = buf[start + 2 : start + 2 + tlen].decode("utf-8")
        except UnicodeDecodeError:
            return None
        return (topic, buf[p:end], mid, qos)

    def _paho_packet(self, command: int, body: bytes) -> MQTTErrorCode:
        """One whole packet through paho's own handler, as its _packet_read would."""
        self._in_packet = _fresh_in_packet()
        self._in_packet["command"] = command
        self._in_packet["packet"] = bytearray(body)
        self._in_packet["remaining_length"] = len(body)
        self._in_packet["have_remaining"] = 1
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = _fresh_in_packet()
        return rc
