"""The bulk read path of intake's MQTT client (gateway.edge.mqttrx): every complete packet
of what arrived is handled once, in order, wherever the reads cut the stream."""

from __future__ import annotations

from typing import Any

import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from gateway.edge.mqttrx import BulkClient, Publish


def varlen(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def publish(topic: bytes, payload: bytes, mid: int, qos: int = 1, props: bytes = b"\x00") -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    body += props + payload
    return bytes([0x30 | (qos << 1)]) + varlen(len(body)) + body


class _Socket:
    def close(self) -> None:
        pass


class Harness:
    def __init__(self, protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5) -> None:
        self.c = BulkClient(CallbackAPIVersion.VERSION2, protocol=protocol, manual_ack=True)
        self.events: list[Any] = []
        self.c.on_publishes = self._publishes
        self.c._packet_handle = self._paho  # type: ignore[method-assign]
        # Connected, as far as _packets looks: it stops when a handler drops the socket.
        self.c._sock = _Socket()  # type: ignore[assignment]

    def _publishes(self, batch: list[Publish]) -> None:
        self.events.extend(("fast", *p) for p in batch)

    def _paho(self) -> MQTTErrorCode:
        packet = self.c._in_packet
        self.events.append(("paho", packet["command"], bytes(packet["packet"])))
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def feed(self, chunks: list[bytes]) -> bytes:
        rest = b""
        for chunk in chunks:
            buf = rest + chunk
            rc, used = self.c._packets(buf)
            assert rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            rest = buf[used:]
        return rest


def stream() -> tuple[bytes, list[Any]]:
    packets = [
        (publish(b"devices/a/tx", b'{"seq":1}', 1), ("fast", "devices/a/tx", b'{"seq":1}', 1, 1)),
        (b"\x90\x03\x00\x07\x01", ("paho", 0x90, b"\x00\x07\x01")),  # SUBACK
        (publish(b"devices/b/tx", b"x" * 300, 2), ("fast", "devices/b/tx", b"x" * 300, 2, 1)),
        (publish(b"d/c", b"q0", 0, qos=0), ("fast", "d/c", b"q0", 0, 0)),
        (publish(b"d/p", b"p", 3, props=b"\x02\x01\x01"), None),  # properties: paho's path
        (publish(b"d/q2", b"two", 4, qos=2), None),  # QoS 2: paho's path
        (b"\xd0\x00", ("paho", 0xD0, b"")),  # PINGRESP
        (publish(b"devices/\xff/tx", b"bad", 5), None),  # not UTF-8: paho's path
        (publish(b"devices/z/tx", b"", 6), ("fast", "devices/z/tx", b"", 6, 1)),
    ]
    data = b""
    expected: list[Any] = []
    for raw, event in packets:
        data += raw
        if event is None:  # what paho's handler is given: the packet after its fixed header
            i = 1
            while raw[i] & 0x80:
                i += 1
            event = ("paho", raw[0], raw[i + 1 :])
        expected.append(event)
    return data, expected


def test_one_read_handles_every_packet_in_order() -> None:
    data, expected = stream()
    h = Harness()
    assert h.feed([data]) == b""
    assert h.events == expected


def test_every_cut_of_the_stream_gives_the_same_packets() -> None:
    data, expected = stream()
    for cut in range(1, len(data)):
        h = Harness()
        assert h.feed([data[:cut], data[cut:]]) == b""
        assert h.events == expected, cut
    h = Harness()
    assert h.feed([data[i : i + 1] for i in range(len(data))]) == b""
    assert h.events == expected


def test_mqtt_311_publish_has_no_properties() -> None:
    h = Harness(MQTTProtocolVersion.MQTTv311)
    raw = publish(b"devices/a/tx", b"{}", 9, props=b"")
    assert h.feed([raw]) == b""
    assert h.events == [("fast", "devices/a/tx", b"{}", 9, 1)]


@pytest.mark.parametrize("bad", [b"\x30\xff\xff\xff\xff\x01", b"\x30\xff\xff\xff\xff\xff"])
def test_a_remaining_length_over_four_bytes_is_a_protocol_error(bad: bytes) -> None:
    h = Harness()
    rc, used = h.c._packets(publish(b"t", b"ok", 1) + bad)
    assert rc == MQTTErrorCode.MQTT_ERR_PROTOCOL
    assert h.events == [("fast", "t", b"ok", 1, 1)]
    assert used == len(publish(b"t", b"ok", 1))
