"""Writes the sample payloads, their manifests and the demo keys under samples/.

Run from the repository root: .venv/bin/python firmware_profiles/samples/generate.py
The samples are committed; tests/test_profiles_samples.py decodes every one and
checks its outcome (and, for accepted ones, the pinned tx_id and fields).
ECDSA signatures are randomised, so a rerun changes the esim-lifecycle files
and every pinned tx_id that depends on them: rerun only when a sample must change.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway.common.errors import Rejected  # noqa: E402
from gateway.edge.profiles import ProfileSet, read_profiles  # noqa: E402
from gateway.edge.profiles.cbor import _head  # noqa: E402
from gateway.edge.profiles.cbor import encode as cbor_encode  # noqa: E402
from gateway.edge.profiles.spec import Profile  # noqa: E402
from gateway.edge.profiles.tool import transaction_json  # noqa: E402
from gateway.lab import synth  # noqa: E402

HERE = Path(__file__).resolve().parent
PROFILES = HERE.parent
KEYS = HERE / "keys"
# 2026-01-01T00:00:00Z: every sample's device time sits a little before it.
T0 = 1_767_225_600_000
RECEIVED = T0 + 60_000
GATEWAY_ID = "edge-sample-01"
DAY = 86_400_000
PSEUDONYM_KEY = hashlib.sha256(b"edge-gateway demo pseudonymisation key").hexdigest()


class Samples:
    def __init__(self, profile: Profile, keys: synth.DemoKeys, device: str) -> None:
        self.p = profile
        self.keys = keys
        self.device = device
        self.dir = HERE / profile.name
        self.rows: list[dict[str, Any]] = []
        self.rng = random.Random(profile.name)

    def topic(self, device: str | None = None) -> str:
        from gateway.edge.profiles.topics import example_topic

        return example_topic(self.p.filters[0], self.p.device_id_level, device or self.device)

    def vals(self, seq: int, time_ms: int = T0 - 5_000, optional: float = 1.0) -> dict[str, Any]:
        v = synth.values(self.p, seq, time_ms, self.rng, optional)
        v.update({k: x for k, x in REALISTIC.get(self.p.name, {}).items() if k in v})
        return v

    def add(
        self,
        name: str,
        payload: bytes,
        expect: str,
        note: str,
        topic: str | None = None,
        after: str | None = None,
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / name).write_bytes(payload)
        row: dict[str, Any] = {
            "file": name,
            "topic": topic or self.topic(),
            "expect": expect,
            "note": note,
        }
        if after:
            row["after"] = after
        self.rows.append(row)

    def signed(self, vals: dict[str, Any], device: str | None = None) -> bytes:
        return synth.encode(self.p, device or self.device, vals, self.keys)

    def sealed(self, body: bytes, device: str | None = None) -> bytes:
        return synth.seal(self.p, device or self.device, body, self.keys)

    def doc_signed(self, doc: dict[Any, Any]) -> bytes:
        return synth.encode_doc_signed(self.p, self.device, doc, self.keys)


# Plausible values for the samples (raw, as the device sends them); the rest are random.
REALISTIC: dict[str, dict[str, Any]] = {
    "nbiot-meter": {
        "meter_id": "MTR-20250417",
        "energy_wh": 1_234_567,
        "voltage_v": 2304,
        "current_a": 5210,
        "battery_pct": 87,
        "rsrp_dbm": -98,
        "sinr_db": 12,
    },
    "lte-m-tracker": {
        "lat": 22.543096,
        "lon": 114.057865,
        "alt_m": 12.5,
        "accuracy_m": 8.0,
        "speed_kmh": 42.5,
        "heading_deg": 270,
        "battery_mv": 3712,
        "battery_pct": 81,
        "cell_mcc": "001",
        "cell_mnc": "01",
        "cell_tac": 4321,
        "cell_eci": 123_456_789,
        "cell_pci": 301,
        "cell_rsrp_dbm": -95,
    },
    "cellsite-power": {
        "rectifier_v": 5350,
        "battery_v": 5310,
        "battery_a": -25,
        "generator_fuel_pct": 76,
        "temperature_c": 31,
        "alarms": 0,
    },
    "cdr-usage": {
        "charging_id": 3_141_592_653,
        "duration_s": 3600,
        "bytes_up": 1_048_576,
        "bytes_down": 52_428_800,
        "cell_id": 123_456_789,
        "rat": "EUTRA",
        "apn": "iot.example",
    },
    "esim-lifecycle": {"smdp_address": "smdp.example.com", "result": 0},
}


def _cbor_map(pairs: list[tuple[Any, Any]]) -> bytes:
    return _head(5, len(pairs)) + b"".join(cbor_encode(k) + cbor_encode(v) for k, v in pairs)


def _cbor_pairs(doc: dict[Any, Any]) -> list[tuple[Any, Any]]:
    return sorted(doc.items(), key=lambda kv: cbor_encode(kv[0]))


def nbiot_meter(s: Samples) -> None:
    v1 = s.vals(101)
    s.add("valid-1.cbor", s.signed(v1), "ok", "a reading with every field")
    v2 = s.vals(102, T0 - 4_000)
    del v2["rsrp_dbm"], v2["sinr_db"]
    s.add("valid-2.cbor", s.signed(v2), "ok", "optional radio fields left out")
    v3 = s.vals(7, T0 - 20 * DAY)
    s.add(
        "valid-3.cbor",
        s.signed(v3, "meter-0002"),
        "ok",
        "another meter, a reading buffered for 20 days",
        topic=s.topic("meter-0002"),
    )
    conflict = {**v1, "energy_wh": v1["energy_wh"] + 1}
    s.add(
        "conflict-seq-101.cbor",
        s.signed(conflict),
        "conflicting_duplicate",
        "seq 101 again with other content: the spool refuses it",
        after="valid-1.cbor",
    )
    body = cbor_encode(synth.document(s.p, s.vals(103)))
    s.add(
        "truncated.cbor",
        s.sealed(body[:-1]),
        "not_decodable",
        "CBOR cut one byte short (tag valid over the cut bytes)",
    )
    s.add(
        "nested-200.cbor",
        s.sealed(b"\x81" * 200 + b"\x00"),
        "not_decodable",
        "arrays nested 200 deep",
    )
    pairs = _cbor_pairs(synth.document(s.p, s.vals(104)))
    big = [(k, v) if k != 3 else (k, "BIG") for k, v in pairs]
    raw = _cbor_map(big).replace(cbor_encode("BIG"), b"\xc2\x49\x01" + b"\x00" * 8)
    s.add("bignum-energy.cbor", s.sealed(raw), "out_of_range", "energy as a 72-bit bignum")
    s.add(
        "uint64-energy.cbor",
        s.signed({**s.vals(105), "energy_wh": 2**64 - 1}),
        "out_of_range",
        "energy 2**64-1: above the profile's maximum",
    )
    nan = [(k, v) if k != 4 else (k, "NAN") for k, v in pairs]
    raw = _cbor_map(nan).replace(cbor_encode("NAN"), b"\xf9\x7e\x00")
    s.add("nan-voltage.cbor", s.sealed(raw), "out_of_range", "voltage is a half-float NaN")
    inf = [(k, v) if k != 5 else (k, "INF") for k, v in pairs]
    raw = _cbor_map(inf).replace(cbor_encode("INF"), b"\xfa\x7f\x80\x00\x00")
    s.add("infinity-current.cbor", s.sealed(raw), "out_of_range", "current is +Infinity")
    dup = [*pairs, (3, 1)]
    s.add("duplicate-key.cbor", s.sealed(_cbor_map(dup)), "not_decodable", "map key 3 twice")
    utf = [(k, v) if k != 0 else (k, "UTF") for k, v in pairs]
    raw = _cbor_map(utf).replace(cbor_encode("UTF"), b"\x64MT\xff\xfe")
    s.add("bad-utf8-meter-id.cbor", s.sealed(raw), "bad_encoding", "meter id is not UTF-8")
    v = s.vals(106)
    del v["energy_wh"]
    s.add("missing-energy.cbor", s.signed(v), "missing_field", "no energy register")
    s.add(
        "energy-as-text.cbor",
        s.signed({**s.vals(107), "energy_wh": "12345"}),
        "wrong_type",
        "energy as a text string",
    )
    s.add(
        "voltage-400v.cbor",
        s.signed({**s.vals(108), "voltage_v": 4000}),
        "out_of_range",
        "4000 dV = 400 V, above 300 V",
    )
    extra = dict(synth.document(s.p, s.vals(109)))
    extra[99] = 1
    s.add(
        "unknown-key.cbor",
        s.sealed(cbor_encode(extra)),
        "wrong_type",
        "key 99 is not in the profile",
    )
    good = s.signed(s.vals(110))
    s.add(
        "wrong-hmac.cbor",
        good[:-1] + bytes([good[-1] ^ 1]),
        "bad_device_auth",
        "last tag bit flipped",
    )
    s.add(
        "missing-hmac.cbor",
        cbor_encode(synth.document(s.p, s.vals(111))),
        "bad_device_auth",
        "no tag at all",
    )
    s.add(
        "unknown-meter.cbor",
        s.signed(s.vals(112), "meter-9999"),
        "bad_device_auth",
        "a meter with no key in the keys file",
        topic=s.topic("meter-9999"),
    )
    s.add(
        "time-year-ahead.cbor",
        s.signed(s.vals(113, T0 + 365 * DAY)),
        "clock_skew",
        "device clock a year ahead",
    )
    s.add(
        "time-40-days-old.cbor",
        s.signed(s.vals(114, T0 - 40 * DAY)),
        "replay",
        "older than the 30-day replay window",
    )
    s.add("too-large.cbor", b"\xa0" * 257, "too_large", "257 bytes; the profile allows 256")
    s.add(
        "top-level-array.cbor",
        s.sealed(cbor_encode([1, 2, 3])),
        "wrong_type",
        "an array, not a map",
    )
    s.add(
        "valid-1.cbor",
        s.signed(v1),
        "unknown_topic",
        "a topic no profile claims",
        topic="meters/lora/meter-0001/up",
    )
    s.add(
        "valid-1.cbor",
        s.signed(v1),
        "bad_device_id",
        "a device id with characters the gateway refuses",
        topic="meters/nbiot/meter 0001!/up",
    )


def lte_m_tracker(s: Samples) -> None:
    v1 = s.vals(501, T0 - 2_000)
    s.add("valid-1.json", s.signed(v1), "ok", "a position with every field")
    v2 = s.vals(502, T0 - 1_000, optional=0.0)
    s.add("valid-2.json", s.signed(v2), "ok", "optional fields left out")
    v3 = s.vals(9, T0 - 3_000)
    s.add(
        "valid-3.json",
        s.signed(v3),
        "ok",
        "another tracker",
        topic=s.topic("trk-0002"),
    )
    s.add(
        "conflict-seq-501.json",
        s.signed({**v1, "speed_kmh": 1.5}),
        "conflicting_duplicate",
        "seq 501 again with other content",
        after="valid-1.json",
    )
    text = s.signed(s.vals(503)).decode()
    s.add(
        "duplicate-key.json",
        text.replace('{"batt"', '{"seq":1,"batt"', 1).encode(),
        "not_decodable",
        "member seq twice",
    )
    s.add(
        "nan.json",
        text.replace('"lat":', '"lat":NaN,"x":', 1).encode(),
        "not_decodable",
        "NaN is not JSON",
    )
    s.add(
        "infinity.json",
        text.replace('"speed":', '"speed":Infinity,"y":', 1).encode(),
        "not_decodable",
        "Infinity is not JSON",
    )
    doc = synth.document(s.p, s.vals(504))
    doc["speed"] = "OVER"
    s.add(
        "overflow-1e400.json",
        json.dumps(doc).replace('"OVER"', "1e400").encode(),
        "out_of_range",
        "a number beyond double range",
    )
    doc = synth.document(s.p, s.vals(505))
    doc["cell"]["eci"] = 2**70
    s.add(
        "integer-2pow70.json", json.dumps(doc).encode(), "out_of_range", "an integer beyond 64 bits"
    )
    s.add(
        "invalid-utf8.json",
        text.encode().replace(b'"mcc":"', b'"mcc":"\xc3\x28', 1),
        "bad_encoding",
        "an invalid UTF-8 sequence",
    )
    s.add("nested-2000.json", b"[" * 2000 + b"]" * 2000, "not_decodable", "2000 nested arrays")
    v = s.vals(506)
    del v["lat"]
    s.add("missing-lat.json", s.signed(v), "missing_field", "no latitude")
    s.add(
        "lat-as-string.json",
        s.signed({**s.vals(507), "lat": "22.54"}),
        "wrong_type",
        "latitude as a string",
    )
    s.add("lat-95.json", s.signed({**s.vals(508), "lat": 95.0}), "out_of_range", "latitude 95")
    s.add(
        "mcc-letters.json",
        s.signed({**s.vals(509), "cell_mcc": "4a0"}),
        "out_of_range",
        "MCC must be digits",
    )
    doc = synth.document(s.p, s.vals(510))
    doc["firmware_note"] = "hello"
    s.add(
        "unknown-member.json",
        json.dumps(doc).encode(),
        "wrong_type",
        "a member the profile does not know",
    )
    doc = synth.document(s.p, s.vals(511))
    doc["seq"] = 511.0
    s.add("seq-float.json", json.dumps(doc).encode(), "wrong_type", "seq 511.0 is not an int")
    s.add("top-level-array.json", b"[1,2,3]", "wrong_type", "an array, not an object")
    s.add("empty.json", b"", "not_decodable", "zero bytes")
    s.add(
        "time-year-ahead.json",
        s.signed(s.vals(512, T0 + 365 * DAY)),
        "clock_skew",
        "device clock a year ahead",
    )
    s.add(
        "time-8-days-old.json",
        s.signed(s.vals(513, T0 - 8 * DAY)),
        "replay",
        "older than the 7-day replay window",
    )
    s.add("too-large.json", b" " * 4097, "too_large", "4097 bytes; the profile allows 4096")


def cellsite_power(s: Samples) -> None:
    def rec(seq: int, t: int = T0 - 5_000, **over: Any) -> dict[str, Any]:
        return {**s.vals(seq, t), "layout": 1, "site_code": "SZ0001A", **over}

    v1 = rec(90001, rectifier_v=5350, battery_v=5310, battery_a=-25, alarms=0)
    s.add("valid-1.bin", s.signed(v1), "ok", "a healthy site on mains")
    v2 = rec(90002, generator_fuel_pct=255, alarms=0b10011)
    s.add(
        "valid-2.bin",
        s.signed(v2),
        "ok",
        "mains failed, battery low, generator running; no fuel sensor (255)",
    )
    v3 = rec(12, site_code="GZ0420")
    s.add("valid-3.bin", s.signed(v3), "ok", "another site", topic=s.topic("site-gz-0420"))
    s.add(
        "conflict-seq-90001.bin",
        s.signed({**v1, "battery_v": 5000}),
        "conflicting_duplicate",
        "seq 90001 again with other content",
        after="valid-1.bin",
    )
    good = s.signed(rec(90003))
    s.add("one-byte-short.bin", good[:-1], "not_decodable", "26 bytes; the layout is 27")
    s.add("one-byte-long.bin", good + b"\x00", "not_decodable", "28 bytes; the layout is 27")
    s.add(
        "undefined-alarm-bit.bin",
        s.signed(rec(90004, alarms=1 << 12)),
        "out_of_range",
        "alarm bit 12 has no name",
    )
    s.add(
        "battery-61v.bin",
        s.signed(rec(90005, battery_v=6100)),
        "out_of_range",
        "61.00 V is above 60 V",
    )
    s.add("layout-2.bin", s.signed(rec(90006, layout=2)), "out_of_range", "unknown layout 2")
    s.add(
        "temperature-minus-100.bin",
        s.signed(rec(90007, temperature_c=-100)),
        "out_of_range",
        "-100 degC",
    )
    bad = bytearray(s.signed(rec(90008)))
    bad[2] = 0x07
    s.add("site-code-control-char.bin", bytes(bad), "bad_encoding", "a BEL byte in the site code")
    s.add(
        "time-year-ahead.bin",
        s.signed(rec(90009, T0 + 365 * DAY)),
        "clock_skew",
        "device clock a year ahead",
    )
    s.add(
        "time-31-days-old.bin",
        s.signed(rec(90010, T0 - 31 * DAY)),
        "replay",
        "older than the 30-day replay window",
    )
    s.add("too-large.bin", b"\x01" * 65, "too_large", "65 bytes; the profile allows 64")


def cdr_usage(s: Samples) -> None:
    v1 = s.vals(700001, T0 - 3_600_000)
    s.add("valid-1.json", s.signed(v1), "ok", "a usage record (IMSI and MSISDN pseudonymised)")
    v2 = s.vals(700002, T0 - 1_800_000)
    del v2["msisdn"], v2["apn"]
    v2["rat"] = "NR"
    s.add("valid-2.json", s.signed(v2), "ok", "no MSISDN (a data-only subscription), on NR")
    v3 = s.vals(31, T0 - 6 * DAY)
    s.add(
        "valid-3.json",
        s.signed(v3),
        "ok",
        "another SMF; a long session reported six days after it started",
        topic=s.topic("smf-02"),
    )
    s.add(
        "conflict-seq-700001.json",
        s.signed({**v1, "bytes_down": 1}),
        "conflicting_duplicate",
        "record 700001 again with other content",
        after="valid-1.json",
    )
    s.add(
        "imsi-letters.json",
        s.signed({**s.vals(700003), "imsi": "00101ABC"}),
        "out_of_range",
        "not an IMSI",
    )
    v = s.vals(700004)
    del v["imsi"]
    s.add("missing-imsi.json", s.signed(v), "missing_field", "no IMSI")
    s.add(
        "imsi-as-number.json",
        s.signed({**s.vals(700005), "imsi": 1010123456789}),
        "wrong_type",
        "IMSI as a number",
    )
    s.add(
        "bytes-negative.json",
        s.signed({**s.vals(700006), "bytes_up": -1}),
        "out_of_range",
        "negative volume",
    )
    s.add(
        "bytes-2pow64.json",
        s.signed({**s.vals(700007), "bytes_down": 987654321987}).replace(
            b"987654321987", str(2**64).encode()
        ),
        "out_of_range",
        "2**64: beyond 64 bits",
    )
    s.add(
        "bytes-2pow60.json",
        s.signed({**s.vals(700008), "bytes_down": 987654321987}).replace(
            b"987654321987", str(2**60).encode()
        ),
        "out_of_range",
        "2**60 fits 64 bits but has no exact JSON (double) form",
    )
    s.add(
        "rat-unknown.json",
        s.signed({**s.vals(700009), "rat": "GSM"}),
        "out_of_range",
        "GSM is not in the profile's list",
    )
    text = s.signed(s.vals(700010)).decode()
    s.add(
        "duplicate-key.json",
        text.replace('{"apn"', '{"imsi":"001010000000000","apn"', 1).encode(),
        "not_decodable",
        "member imsi twice",
    )
    s.add(
        "start-not-rfc3339.json",
        s.signed({**s.vals(700011), "start": "01/01/2026 10:00"}),
        "out_of_range",
        "not an RFC 3339 time",
    )
    s.add(
        "start-year-ahead.json",
        s.signed(s.vals(700012, T0 + 365 * DAY)),
        "clock_skew",
        "start time a year ahead",
    )
    s.add(
        "start-15-days-old.json",
        s.signed(s.vals(700013, T0 - 15 * DAY)),
        "replay",
        "older than the 14-day replay window",
    )
    s.add(
        "invalid-utf8.json",
        text.encode().replace(b'"rat":"', b'"rat":"\xed\xa0\x80', 1),
        "bad_encoding",
        "an encoded UTF-16 surrogate is not UTF-8",
    )


def esim_lifecycle(s: Samples) -> None:
    for i, event in enumerate(("download", "enable", "disable", "delete")):
        v = s.vals(40 + i, T0 - (10 - i) * 1_000)
        v["event"] = event
        v["result"] = 0
        s.add(f"valid-{event}.json", s.signed(v), "ok", f"profile {event}, signed")
    again = {**s.vals(41, T0 - 9_000), "event": "disable", "result": 0}
    s.add(
        "conflict-seq-41.json",
        s.signed(again),
        "conflicting_duplicate",
        "notification 41 again with another event (signed): the spool refuses it",
        after="valid-enable.json",
    )
    v = s.vals(50)
    v["event"] = "enable"
    doc = synth.document(s.p, v)
    signed = json.loads(s.doc_signed(doc))
    s.add(
        "tampered-event.json",
        json.dumps({**signed, "event": "disable"}).encode(),
        "bad_device_auth",
        "event changed after signing",
    )
    other = json.loads(s.doc_signed({**doc, "seq": 51}))
    s.add(
        "bad-signature.json",
        json.dumps({**signed, "sig": other["sig"]}).encode(),
        "bad_device_auth",
        "the signature of another event",
    )
    s.add(
        "missing-signature.json",
        json.dumps(doc).encode(),
        "bad_device_auth",
        "no sig member",
    )
    s.add(
        "unknown-device.json",
        s.doc_signed(doc),
        "bad_device_auth",
        "a device with no registered public key",
        topic=s.topic("mod-9999"),
    )
    s.add(
        "unknown-event.json",
        s.doc_signed({**doc, "event": "suspend"}),
        "out_of_range",
        "suspend is not a lifecycle event here",
    )
    eid = doc["eid"]
    s.add(
        "eid-check-digits.json",
        s.doc_signed({**doc, "eid": eid[:-1] + str((int(eid[-1]) + 1) % 10)}),
        "out_of_range",
        "EID check digits wrong",
    )
    iccid = doc["iccid"]
    s.add(
        "iccid-luhn.json",
        s.doc_signed({**doc, "iccid": iccid[:-1] + str((int(iccid[-1]) + 1) % 10)}),
        "out_of_range",
        "ICCID Luhn digit wrong",
    )
    s.add(
        "time-year-ahead.json",
        s.doc_signed(synth.document(s.p, {**v, **s.vals(52, T0 + 365 * DAY), "event": "enable"})),
        "clock_skew",
        "device clock a year ahead",
    )
    s.add(
        "unknown-member.json",
        s.doc_signed({**doc, "note": "x"}),
        "wrong_type",
        "a member the profile does not know (signed)",
    )
    s.add(
        "invalid-utf8.json",
        s.doc_signed(doc).replace(b'"event":"', b'"event":"\xff', 1),
        "bad_encoding",
        "an invalid UTF-8 byte",
    )


BUILDERS: dict[str, tuple[str, Callable[[Samples], None]]] = {
    "nbiot-meter": ("meter-0001", nbiot_meter),
    "lte-m-tracker": ("trk-0001", lte_m_tracker),
    "cellsite-power": ("site-sz-0001", cellsite_power),
    "cdr-usage": ("smf-01", cdr_usage),
    "esim-lifecycle": ("mod-0001", esim_lifecycle),
}
DEVICES = {
    "nbiot-meter": ["meter-0001", "meter-0002"],
    "esim-lifecycle": ["mod-0001", "mod-0002"],
}


def _toml_str(v: str) -> str:
    return json.dumps(v, ensure_ascii=False)


VECTORS = ROOT / "tests" / "vectors" / "profiles.json"


def write_manifest(s: Samples, ps: ProfileSet, vectors: list[dict[str, Any]]) -> None:
    lines = [
        f"# Samples of {s.p.id}, written by firmware_profiles/samples/generate.py.",
        "# Each entry: the file, the topic it arrives on, and the outcome: ok, or the reason",
        "# code it is rejected with (conflicting_duplicate: by the spool, after `after`).",
        "# Accepted samples pin tx_id and fields, with received_ms and gateway_id below.",
        f"profile = {_toml_str(s.p.id)}",
        f"received_ms = {RECEIVED}",
        f"gateway_id = {_toml_str(GATEWAY_ID)}",
    ]
    for row in s.rows:
        payload = (s.dir / row["file"]).read_bytes()
        outcome = "ok"
        try:
            inc = ps.decode(None, row["topic"], payload, RECEIVED, "mqtt", profile=s.p.id)
            if ps.select(row["topic"])[0] != s.p.id:
                outcome = "unknown_topic"
        except Rejected as r:
            outcome = r.reason
            inc = None
        want = "ok" if row["expect"] == "conflicting_duplicate" else row["expect"]
        if outcome != want:
            raise SystemExit(f"{s.p.id} {row['file']}: expected {want}, got {outcome}")
        lines += ["", "[[sample]]"]
        for k in ("file", "topic", "expect", "after", "note"):
            if k in row:
                lines.append(f"{k} = {_toml_str(row[k])}")
        if row["expect"] == "ok":
            assert inc is not None
            tx = transaction_json(inc.leaf)
            lines.append(f"tx_id = {_toml_str(tx['tx_id'])}")
            lines.append(f"fields = {_toml_str(tx['fields_canonical'])}")
            vectors.append(
                {
                    "profile": s.p.id,
                    "sample": row["file"],
                    "topic": row["topic"],
                    "received_ms": RECEIVED,
                    "gateway_id": GATEWAY_ID,
                    "channel": "mqtt",
                    "payload_hex": payload.hex(),
                    "leaf_hex": tx["leaf_hex"],
                    "tx_id": tx["tx_id"],
                }
            )
    (s.dir / "manifest.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    profiles = {p.name: p for p in read_profiles(PROFILES)}
    keys = synth.DemoKeys()
    KEYS.mkdir(exist_ok=True)
    for name, devices in DEVICES.items():
        keys.write_keys_files([profiles[name]], devices, KEYS)
    pseudo = KEYS / "pseudonym.key"
    pseudo.write_text(PSEUDONYM_KEY + "\n", encoding="ascii")
    pseudo.chmod(0o600)
    ps = ProfileSet.load(
        PROFILES,
        gateway_id=GATEWAY_ID,
        keys_dir=KEYS,
        pseudonym_key_file=pseudo,
        enforce_rate_limits=False,
    )
    vectors: list[dict[str, Any]] = []
    for name, (device, build) in BUILDERS.items():
        s = Samples(profiles[name], keys, device)
        if s.dir.exists():
            for old in s.dir.iterdir():
                old.unlink()
        build(s)
        write_manifest(s, ps, vectors)
        print(f"{s.p.id}: {len(s.rows)} samples in {s.dir.relative_to(ROOT)}")
    doc = {
        "description": (
            "Firmware profile decoding: payload bytes (with topic, receive time, gateway id "
            "and channel) to the exact Transaction leaf bytes. Written by "
            "firmware_profiles/samples/generate.py from the accepted samples; keys in "
            "firmware_profiles/samples/keys."
        ),
        "cases": vectors,
    }
    VECTORS.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"{len(vectors)} vectors in {VECTORS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
