"""Decoding through a ProfileSet: each bad payload gets its reason, never a crash.

Covers routing by topic and by name, the issue's list of hostile inputs,
device authentication, pseudonymisation, rate limiting, and hot reload.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._pb.edgegateway.v1 import transaction_pb2
from gateway.common.errors import ConfigError, Rejected
from gateway.edge.profiles import REASONS, ProfileRejected, ProfileSet, parse_profile
from gateway.edge.profiles import cbor as cb
from gateway.edge.profiles.decoder import PSEUDONYM_DOMAIN, fields_json, identity
from gateway.edge.spool import Incoming
from gateway.formats.canonical import MAX_SAFE_INTEGER, canonical_json
from gateway.lab.synth import fake_identity

NOW = 1_767_225_600_000
GW = "edge-test-01"

METER = """\
name = "meter"
version = 1
encoding = "cbor"
kind = "meter.reading"
max_payload_bytes = {max_payload}

[topics]
filters = ["m/+/up"]
device_id_level = 1

[sequence]
field = "seq"

[device_time]
field = "t"
unit = "s"
max_ahead_s = 300
replay_window_s = 86400
{auth}
[[fields]]
name = "seq"
key = 1
type = "int"

[[fields]]
name = "t"
key = 2
type = "int"

[[fields]]
name = "volts"
key = 3
type = "int"
scale = 0.1
min = 0
max = 300

[[fields]]
name = "energy"
key = 4
type = "int"
min = 0
required = false

[[fields]]
name = "id"
key = 5
type = "string"
required = false

[[fields]]
name = "raw"
key = 6
type = "bytes"
required = false
"""

TRACKER = """\
name = "tracker"
version = 2
encoding = "json"
kind = "tracker.position"
max_payload_bytes = {max_payload}
unknown_fields = "{unknown}"

[topics]
filters = ["t/+/pos", "fleet/+/+/pos"]
device_id_level = 1

[sequence]
field = "seq"

[device_time]
field = "ts"
unit = "ms"
{auth}
[[fields]]
name = "seq"
pointer = "/seq"
type = "int"

[[fields]]
name = "ts"
pointer = "/ts"
type = "int"
required = false

[[fields]]
name = "lat"
pointer = "/pos/lat"
type = "number"
min = -90
max = 90

[[fields]]
name = "note"
pointer = "/note"
type = "string"
required = false

[[fields]]
name = "imsi"
pointer = "/imsi"
type = "string"
pseudonymise = "imsi"
required = false

[[fields]]
name = "msisdn"
pointer = "/msisdn"
type = "string"
pseudonymise = "msisdn"
required = false
"""

POWER = """\
name = "power"
version = 1
encoding = "binary"
kind = "cellsite.power"

[binary]
byte_order = "little"
length = 12

[topics]
filters = ["p/+/rec"]
device_id_level = 1

[sequence]
field = "seq"

[rate_limit]
per_s = 1
burst = 3

[[fields]]
name = "seq"
offset = 0
type = "u32"

[[fields]]
name = "volts"
offset = 4
type = "u16"
scale = 0.01
max = 60

[[fields]]
name = "temp"
offset = 6
type = "i8"
absent = -128
required = false

[[fields]]
name = "ok"
offset = 7
type = "bool"

[[fields]]
name = "alarms"
offset = 8
type = "u32"
flags = ["mains", "", "door"]
"""

HMAC_KEY = bytes(range(32))
PSEUDO_KEY = bytes(range(100, 132))


def build(
    tmp: Path,
    *,
    meter_auth: str = "",
    tracker_auth: str = "",
    unknown: str = "ignore",
    max_payload: int = 1 << 20,
    fallback: str | None = "json@1",
    clock: Callable[[], float] = time.monotonic,
    rate_limits: bool = True,
    gateway_cap: int = 16 << 20,
) -> ProfileSet:
    d = tmp / "profiles"
    d.mkdir(exist_ok=True)
    (d / "meter.toml").write_text(METER.format(max_payload=max_payload, auth=meter_auth))
    (d / "tracker.toml").write_text(
        TRACKER.format(max_payload=max_payload, auth=tracker_auth, unknown=unknown)
    )
    (d / "power.toml").write_text(POWER)
    keys = tmp / "keys"
    keys.mkdir(exist_ok=True)
    hk = keys / "meter.keys"
    hk.write_text(f'[devices]\n"m-1" = "{HMAC_KEY.hex()}"\n')
    hk.chmod(0o600)
    pk = tmp / "pseudonym.key"
    pk.write_text(PSEUDO_KEY.hex())
    pk.chmod(0o600)
    return ProfileSet.load(
        d,
        gateway_id=GW,
        max_payload_bytes=gateway_cap,
        keys_dir=keys,
        pseudonym_key_file=pk,
        fallback=fallback,
        clock=clock,
        enforce_rate_limits=rate_limits,
    )


@pytest.fixture
def ps(tmp_path: Path) -> ProfileSet:
    return build(tmp_path)


def meter_doc(seq: int = 1, t: int = NOW // 1000 - 10, **over: Any) -> dict[int, Any]:
    doc: dict[int, Any] = {1: seq, 2: t, 3: 2305, 4: 77, 5: "MTR-1"}
    doc.update({int(k[1:]): v for k, v in over.items()})
    return doc


def reason(ps: ProfileSet, topic: str, payload: bytes, **kw: Any) -> str:
    with pytest.raises(Rejected) as ei:
        ps.decode(kw.pop("device_id", None), topic, payload, kw.pop("received", NOW), "mqtt", **kw)
    assert ei.value.reason in REASONS
    assert isinstance(ei.value, ProfileRejected)
    return ei.value.reason


def fields_of(inc: Incoming) -> dict[str, Any]:
    tx = transaction_pb2.Transaction.FromString(inc.leaf)
    out: dict[str, Any] = json.loads(tx.fields)
    return out


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- routing -------------------------------------------------------------------


def test_topic_routes_to_its_profile_and_device_id_comes_from_the_topic(ps: ProfileSet) -> None:
    inc = ps.decode("ignored", "m/meter-7/up", cb.encode(meter_doc()), NOW, "mqtt")
    tx = transaction_pb2.Transaction.FromString(inc.leaf)
    assert tx.device_id == "meter-7" and inc.device_id == "meter-7"
    assert tx.profile == "meter@1" and tx.kind == "meter.reading"
    assert tx.device_seq == 1 and tx.device_time_ms == (NOW // 1000 - 10) * 1000
    assert tx.received_time_ms == NOW and tx.gateway_id == GW and tx.channel == "mqtt"
    assert tx.payload_sha256 == hashlib.sha256(cb.encode(meter_doc())).digest()
    assert fields_of(inc) == {"volts": 230.5, "energy": 77, "id": "MTR-1"}


def test_topic_no_profile_claims_goes_to_the_fallback_or_is_unknown(tmp_path: Path) -> None:
    ps = build(tmp_path)
    inc = ps.decode("dev-1", "devices/dev-1/tx", b'{"seq": 3}', NOW, "mqtt")
    assert transaction_pb2.Transaction.FromString(inc.leaf).profile == "json@1"
    strict = build(tmp_path, fallback=None)
    assert reason(strict, "devices/dev-1/tx", b'{"seq": 3}', device_id="dev-1") == "unknown_topic"
    assert strict.names() == ("json@1", "meter@1", "power@1", "tracker@2")


def test_most_specific_filter_wins(tmp_path: Path) -> None:
    d = tmp_path / "profiles"
    d.mkdir()
    base = TRACKER.format(max_payload=4096, auth="", unknown="ignore")
    (d / "a.toml").write_text(base.replace('["t/+/pos", "fleet/+/+/pos"]', '["t/+/#"]'))
    (d / "b.toml").write_text(
        base.replace('name = "tracker"', 'name = "tracker-b"').replace(
            '["t/+/pos", "fleet/+/+/pos"]', '["t/+/pos"]'
        )
    )
    pk = tmp_path / "pseudonym.key"
    pk.write_text(PSEUDO_KEY.hex())
    pk.chmod(0o600)
    ps = ProfileSet.load(d, gateway_id=GW, pseudonym_key_file=pk)
    assert ps.select("t/x/pos") == ("tracker-b@2", "x")
    assert ps.select("t/x/other/deeper") == ("tracker@2", "x")
    assert ps.select("$share/edge/t/x/pos") == ("tracker-b@2", "x")
    assert ps.topic_filters() == ("t/+/pos", "t/+/#")
    assert ps.subscriptions("edge") == ("$share/edge/t/+/pos", "$share/edge/t/+/#")


def test_wildcards_do_not_match_dollar_topics(ps: ProfileSet) -> None:
    assert ps.device_for_topic("$SYS/x/up") is None
    assert ps.device_for_topic("m/x/up") == "x"


def test_grpc_picks_a_profile_by_name(ps: ProfileSet) -> None:
    payload = cb.encode(meter_doc())
    inc = ps.decode("meter-9", "grpc/meter-9", payload, NOW, "grpc", profile="meter@1")
    assert inc.device_id == "meter-9"
    inc = ps.decode("meter-9", "grpc/meter-9", payload, NOW, "grpc", profile="meter")
    assert inc.device_id == "meter-9"
    # A topic of the profile still names the device.
    inc = ps.decode("meter-9", "m/meter-3/up", payload, NOW, "grpc", profile="meter")
    assert inc.device_id == "meter-3"
    assert reason(ps, "grpc/x", payload, device_id="x", profile="nope@1") == "unknown_profile"
    assert reason(ps, "grpc/x", payload, device_id=None, profile="meter") == "unknown_topic"
    inc = ps.decode("d-1", "grpc/d-1", b'{"seq": 1}', NOW, "grpc", profile="json@1")
    assert transaction_pb2.Transaction.FromString(inc.leaf).profile == "json@1"


def test_bad_device_id_in_the_topic(ps: ProfileSet) -> None:
    assert reason(ps, "m/bad id!/up", cb.encode(meter_doc())) == "bad_device_id"
    assert reason(ps, "m//up", cb.encode(meter_doc())) == "bad_device_id"


def test_rejection_carries_device_profile_and_personal_data_flag(ps: ProfileSet) -> None:
    with pytest.raises(ProfileRejected) as ei:
        ps.decode(None, "t/trk-1/pos", b'{"seq": 1, "imsi": "x"}', NOW, "mqtt")
    r = ei.value
    assert (r.reason, r.device_id, r.profile, r.personal_data) == (
        "missing_field",
        "trk-1",
        "tracker@2",
        True,
    )


# ---- the hostile inputs ---------------------------------------------------


def test_truncated_cbor(ps: ProfileSet) -> None:
    payload = cb.encode(meter_doc())
    for n in range(len(payload)):
        assert reason(ps, "m/x/up", payload[:n]) in ("not_decodable", "wrong_type")
    assert reason(ps, "m/x/up", payload[:-1]) == "not_decodable"


def test_cbor_nested_100000_levels_is_refused_quickly(ps: ProfileSet) -> None:
    for payload in (b"\x81" * 100_000 + b"\x00", b"\x9f" * 100_000, b"\xa1\x01" * 100_000):
        assert timed(lambda p=payload: reason(ps, "m/x/up", p)) < 0.005
        assert reason(ps, "m/x/up", payload) == "not_decodable"


def test_json_nested_100000_levels_is_refused_quickly(ps: ProfileSet) -> None:
    for payload in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        assert reason(ps, "t/x/pos", payload) == "not_decodable"
        assert min(timed(lambda p=payload: reason(ps, "t/x/pos", p)) for _ in range(3)) < 0.005


def test_nesting_deeper_than_profile_allows_on_shipped_sizes(tmp_path: Path) -> None:
    ps = build(tmp_path, max_payload=256)
    assert reason(ps, "m/x/up", b"\x81" * 100_000 + b"\x00") == "too_large"


def test_numbers_beyond_64_bits(ps: ProfileSet) -> None:
    assert reason(ps, "t/x/pos", b'{"seq": 18446744073709551616, "pos": {"lat": 1}}') == (
        "out_of_range"
    )
    assert reason(ps, "t/x/pos", b'{"seq": 1, "pos": {"lat": 1}, "x": -9223372036854775809}') == (
        "out_of_range"
    )
    assert reason(ps, "t/x/pos", b'{"seq": 1, "pos": {"lat": 1}, "x": 1' + b"0" * 5000 + b"}") == (
        "out_of_range"
    )
    doc = meter_doc()
    raw = cb.encode({**doc, 4: "BIG"}).replace(cb.encode("BIG"), b"\xc2\x49" + b"\x01" * 9)
    assert reason(ps, "m/x/up", raw) == "out_of_range"
    # Within 64 bits but past what JSON (doubles) holds exactly.
    assert reason(ps, "m/x/up", cb.encode(meter_doc(e4=2**64 - 1))) == "out_of_range"
    assert reason(ps, "m/x/up", cb.encode(meter_doc(e4=MAX_SAFE_INTEGER + 1))) == "out_of_range"
    assert (
        fields_of(
            ps.decode(None, "m/x/up", cb.encode(meter_doc(e4=MAX_SAFE_INTEGER)), NOW, "mqtt")
        )["energy"]
        == MAX_SAFE_INTEGER
    )
    # The sequence number is not a JSON field: 2**63-1 is fine, 2**63 is not.
    assert ps.decode(None, "m/x/up", cb.encode(meter_doc(seq=2**63 - 1)), NOW, "mqtt")
    assert reason(ps, "m/x/up", cb.encode(meter_doc(seq=2**63))) == "out_of_range"
    assert reason(ps, "m/x/up", cb.encode(meter_doc(seq=-1))) == "out_of_range"


@pytest.mark.parametrize(
    "text",
    [b"NaN", b"Infinity", b"-Infinity", b"nan", b"1e400", b"-1e400"],
)
def test_nan_and_infinity_in_json(ps: ProfileSet, text: bytes) -> None:
    payload = b'{"seq": 1, "pos": {"lat": ' + text + b"}}"
    want = "out_of_range" if text.endswith(b"e400") else "not_decodable"
    assert reason(ps, "t/x/pos", payload) == want


@pytest.mark.parametrize(
    "encoded",
    [b"\xf9\x7e\x00", b"\xf9\x7c\x00", b"\xfa\x7f\xc0\x00\x00", b"\xfb\xff\xf0" + b"\x00" * 6],
)
def test_nan_and_infinity_in_cbor(ps: ProfileSet, encoded: bytes) -> None:
    raw = cb.encode(meter_doc(e3="F")).replace(cb.encode("F"), encoded)
    assert reason(ps, "m/x/up", raw) == "out_of_range"


def test_duplicate_keys(ps: ProfileSet) -> None:
    assert reason(ps, "t/x/pos", b'{"seq": 1, "seq": 1, "pos": {"lat": 1}}') == "not_decodable"
    assert reason(ps, "t/x/pos", b'{"seq": 1, "pos": {"lat": 1, "lat": 2}}') == "not_decodable"
    assert reason(ps, "m/x/up", b"\xa3\x01\x01\x02\x01\x01\x02") == "not_decodable"
    # 1 and "1" are different CBOR keys: not a duplicate.
    assert ps.decode(None, "m/x/up", cb.encode({**meter_doc(), "1": 5}), NOW, "mqtt")


def test_invalid_utf8(ps: ProfileSet) -> None:
    assert reason(ps, "t/x/pos", b'{"seq": 1, "pos": {"lat": 1}, "note": "\xc3\x28"}') == (
        "bad_encoding"
    )
    assert reason(ps, "t/x/pos", b'{"seq": 1, "pos": {"lat": 1}, "note": "\xed\xa0\x80"}') == (
        "bad_encoding"
    )
    lone = b'{"seq": 1, "pos": {"lat": 1}, "note": "\\ud800"}'
    assert reason(ps, "t/x/pos", lone) == "bad_encoding"
    raw = cb.encode(meter_doc(e5="ABC")).replace(b"\x63ABC", b"\x63A\xff\xfe")
    assert reason(ps, "m/x/up", raw) == "bad_encoding"


def test_ten_megabyte_payload_is_refused_before_any_parsing(tmp_path: Path) -> None:
    big = b"[" * (10 * 1024 * 1024)
    ps = build(tmp_path, gateway_cap=65536)
    assert reason(ps, "t/x/pos", big) == "too_large"
    assert timed(lambda: reason(ps, "t/x/pos", big)) < 0.005
    ps = build(tmp_path, max_payload=4096)
    assert reason(ps, "m/x/up", big) == "too_large"
    assert reason(ps, "p/x/rec", big) == "too_large"


def power_record(
    seq: int = 1, volts: int = 5350, temp: int = 25, ok: int = 1, alarms: int = 0
) -> bytes:
    return struct.pack("<IHbBI", seq, volts, temp, ok, alarms)


def test_binary_record_one_byte_short_or_long(ps: ProfileSet) -> None:
    # One device per payload: the profile's rate limit (burst 3) charges every arrival.
    rec = power_record()
    inc = ps.decode(None, "p/site-1/rec", rec, NOW, "mqtt")
    assert fields_of(inc) == {"volts": 53.5, "temp": 25, "ok": True, "alarms": []}
    assert reason(ps, "p/site-2/rec", rec[:-1]) == "not_decodable"
    assert reason(ps, "p/site-3/rec", rec + b"\x00") == "not_decodable"
    assert reason(ps, "p/site-4/rec", b"") == "not_decodable"


def test_binary_values(ps: ProfileSet) -> None:
    inc = ps.decode(None, "p/s/rec", power_record(temp=-128, alarms=0b101), NOW, "mqtt")
    assert fields_of(inc) == {"volts": 53.5, "ok": True, "alarms": ["mains", "door"]}
    assert reason(ps, "p/s2/rec", power_record(seq=2, alarms=0b10)) == "out_of_range"
    assert reason(ps, "p/s3/rec", power_record(seq=3, alarms=1 << 31)) == "out_of_range"
    assert reason(ps, "p/s4/rec", power_record(seq=4, ok=2)) == "out_of_range"
    assert reason(ps, "p/s5/rec", power_record(seq=5, volts=6001)) == "out_of_range"


def test_device_time_a_year_ahead_is_clock_skew_and_too_old_is_replay(ps: ProfileSet) -> None:
    year = 365 * 86400
    assert reason(ps, "m/x/up", cb.encode(meter_doc(t=NOW // 1000 + year))) == "clock_skew"
    assert ps.decode(None, "m/x/up", cb.encode(meter_doc(t=NOW // 1000 + 299)), NOW, "mqtt")
    assert reason(ps, "m/x/up", cb.encode(meter_doc(t=NOW // 1000 + 301))) == "clock_skew"
    assert reason(ps, "m/x/up", cb.encode(meter_doc(t=NOW // 1000 - 86401))) == "replay"
    assert ps.decode(None, "m/x/up", cb.encode(meter_doc(t=NOW // 1000 - 86399)), NOW, "mqtt")
    assert reason(ps, "m/x/up", cb.encode(meter_doc(t=-5))) == "out_of_range"
    assert reason(ps, "m/x/up", cb.encode(meter_doc(t=2**62))) == "out_of_range"


def test_missing_field_and_wrong_type(ps: ProfileSet) -> None:
    doc = meter_doc()
    del doc[3]
    assert reason(ps, "m/x/up", cb.encode(doc)) == "missing_field"
    assert reason(ps, "m/x/up", cb.encode(meter_doc(e3="230"))) == "wrong_type"
    assert reason(ps, "m/x/up", cb.encode(meter_doc(e3=230.5))) == "wrong_type"
    assert reason(ps, "m/x/up", cb.encode(meter_doc(e3=True))) == "wrong_type"
    assert reason(ps, "m/x/up", cb.encode(meter_doc(e3=None))) == "wrong_type"
    assert reason(ps, "m/x/up", cb.encode(meter_doc(seq="1"))) == "wrong_type"
    assert reason(ps, "m/x/up", cb.encode([1, 2])) == "wrong_type"
    assert reason(ps, "t/x/pos", b'{"seq": 1, "pos": 5}') == "wrong_type"
    assert reason(ps, "t/x/pos", b'{"seq": 1.0, "pos": {"lat": 1}}') == "wrong_type"
    assert reason(ps, "t/x/pos", b'"just a string"') == "wrong_type"
    assert reason(ps, "t/x/pos", b"") == "not_decodable"


def test_unknown_members(tmp_path: Path) -> None:
    payload = b'{"seq": 1, "pos": {"lat": 1, "lon": 2}, "extra": {"deep": [1]}}'
    lax = build(tmp_path)
    assert fields_of(lax.decode(None, "t/x/pos", payload, NOW, "mqtt")) == {"lat": 1}
    strict = build(tmp_path, unknown="reject")
    assert reason(strict, "t/x/pos", payload) == "wrong_type"
    assert strict.decode(None, "t/x/pos", b'{"seq": 1, "pos": {"lat": 1}}', NOW, "mqtt")


# ---- values ------------------------------------------------------------------------


def test_scale_is_exact_decimal_then_the_nearest_double(ps: ProfileSet) -> None:
    for raw, text in ((2305, b"230.5"), (1, b"0.1"), (3, b"0.3"), (2999, b"299.9"), (0, b"0")):
        inc = ps.decode(None, "m/x/up", cb.encode(meter_doc(seq=raw + 1, e3=raw)), NOW, "mqtt")
        tx = transaction_pb2.Transaction.FromString(inc.leaf)
        assert tx.fields.endswith(b'"volts":' + text + b"}")


def test_bytes_are_lowercase_hex(ps: ProfileSet) -> None:
    inc = ps.decode(None, "m/x/up", cb.encode(meter_doc(e6=b"\x00\xab\xff")), NOW, "mqtt")
    assert fields_of(inc)["raw"] == "00abff"


def test_subscriber_identities_are_pseudonymised(ps: ProfileSet) -> None:
    imsi = "001011234567890"
    payload = json.dumps(
        {"seq": 1, "pos": {"lat": 1}, "imsi": imsi, "msisdn": "+8613800138000"}
    ).encode()
    inc = ps.decode(None, "t/x/pos", payload, NOW, "mqtt")
    f = fields_of(inc)
    want = hmac.new(PSEUDO_KEY, PSEUDONYM_DOMAIN + b"imsi\x00" + imsi.encode(), "sha256")
    assert f["imsi"] == want.hexdigest()
    assert imsi.encode() not in inc.leaf and b"13800138000" not in inc.leaf
    # The same subscriber with or without '+' is the same pseudonym.
    payload2 = payload.replace(b"+8613800138000", b"8613800138000").replace(
        b'"seq": 1', b'"seq": 2'
    )
    assert fields_of(ps.decode(None, "t/x/pos", payload2, NOW, "mqtt"))["msisdn"] == f["msisdn"]
    with pytest.raises(Rejected) as ei:
        ps.decode(None, "t/x/pos", payload.replace(imsi.encode(), b"00101123456789A"), NOW, "mqtt")
    assert ei.value.reason == "out_of_range" and "00101123456789" not in ei.value.detail


@pytest.mark.parametrize("cls", ["imsi", "msisdn", "iccid", "eid"])
def test_identity_formats(cls: str) -> None:
    import random

    rng = random.Random(cls)
    for _ in range(50):
        good = fake_identity(cls, rng)
        assert identity(cls, good) is not None
    if cls in ("iccid", "eid"):
        bad = good[:-1] + str((int(good[-1]) + 1) % 10)
        assert identity(cls, bad) is None
    assert identity(cls, "12ab") is None


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True),
        st.one_of(
            st.text(),
            st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER),
            st.floats(allow_nan=False, allow_infinity=False),
            st.booleans(),
            st.lists(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), max_size=4),
        ),
        max_size=12,
    )
)
@settings(max_examples=300, derandomize=True, deadline=None, database=None)
def test_fields_json_is_rfc8785(values: dict[str, Any]) -> None:
    if any(
        isinstance(v, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in v) for v in values.values()
    ):
        return
    assert fields_json(values) == canonical_json(values)


# ---- device authentication ------------------------------------------------------------

HMAC_TRAILER = '\n[auth]\nscheme = "hmac-sha256"\nkeys_file = "meter.keys"\nlocation = "trailer"\n'


def tag(body: bytes, key: bytes = HMAC_KEY) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def test_hmac_trailer(tmp_path: Path) -> None:
    ps = build(tmp_path, meter_auth=HMAC_TRAILER)
    body = cb.encode(meter_doc())
    assert ps.decode(None, "m/m-1/up", body + tag(body), NOW, "mqtt").device_id == "m-1"
    assert reason(ps, "m/m-1/up", body) == "bad_device_auth"  # missing
    assert reason(ps, "m/m-1/up", body + tag(body)[:-1] + b"\x00") == "bad_device_auth"
    assert reason(ps, "m/m-1/up", body + tag(body, bytes(32))) == "bad_device_auth"
    assert reason(ps, "m/m-2/up", body + tag(body)) == "bad_device_auth"  # no key for m-2
    assert reason(ps, "m/m-1/up", b"\x01" * 20) == "bad_device_auth"
    # Authenticated first, parsed after: a truncated body with a good tag is not_decodable.
    assert reason(ps, "m/m-1/up", body[:-1] + tag(body[:-1])) == "not_decodable"


def ecdsa_setup(
    tmp: Path, location: str, fmt: str, enc: str = "base64url"
) -> tuple[ProfileSet, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    (tmp / "keys").mkdir(exist_ok=True)
    (tmp / "keys" / "trk.pub").write_text(f'[devices]\n"trk-1" = """\n{pem}"""\n')
    auth = (
        f'\n[auth]\nscheme = "ecdsa-p256"\nkeys_file = "trk.pub"\nlocation = "{location}"\n'
        f'signature_format = "{fmt}"\n'
    )
    if location == "field":
        auth += f'field = "sig"\ntag_encoding = "{enc}"\n'
    return build(tmp, tracker_auth=auth), key


def raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@pytest.mark.parametrize(
    ("fmt", "enc"), [("raw", "base64url"), ("raw", "hex"), ("der", "base64url")]
)
def test_ecdsa_signature_in_a_json_field(tmp_path: Path, fmt: str, enc: str) -> None:
    ps, key = ecdsa_setup(tmp_path, "field", fmt, enc)
    doc = {"seq": 1, "pos": {"lat": 45.5}, "note": "héllo"}
    signed = canonical_json(doc)
    sig = raw_sig(key, signed) if fmt == "raw" else key.sign(signed, ec.ECDSA(hashes.SHA256()))
    text = sig.hex() if enc == "hex" else base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
    # Member order and whitespace in the payload do not matter: the canonical form is signed.
    payload = json.dumps({"note": "héllo", "sig": text, "pos": {"lat": 45.5}, "seq": 1}, indent=1)
    assert ps.decode(None, "t/trk-1/pos", payload.encode(), NOW, "mqtt").device_id == "trk-1"
    tampered = payload.replace("45.5", "45.6")
    assert reason(ps, "t/trk-1/pos", tampered.encode()) == "bad_device_auth"
    assert reason(ps, "t/trk-1/pos", json.dumps(doc).encode()) == "bad_device_auth"
    assert reason(ps, "t/trk-2/pos", payload.encode()) == "bad_device_auth"
    garbled = payload.replace(text, text[:-2] + "!!")
    assert reason(ps, "t/trk-1/pos", garbled.encode()) == "bad_device_auth"


def test_ecdsa_raw_trailer(tmp_path: Path) -> None:
    ps, key = ecdsa_setup(tmp_path, "trailer", "raw")
    body = b'{"seq": 7, "pos": {"lat": -3}}'
    assert ps.decode(None, "t/trk-1/pos", body + raw_sig(key, body), NOW, "mqtt")
    assert reason(ps, "t/trk-1/pos", body + bytes(64)) == "bad_device_auth"


# ---- rate limits --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_limit_token_bucket_by_the_gateway_clock(tmp_path: Path) -> None:
    clock = Clock()
    ps = build(tmp_path, clock=clock)
    for seq in range(1, 4):
        ps.decode(None, "p/s-1/rec", power_record(seq), NOW, "mqtt")
    assert reason(ps, "p/s-1/rec", power_record(4)) == "rate_limited"
    # Another device has its own bucket.
    ps.decode(None, "p/s-2/rec", power_record(4), NOW, "mqtt")
    # Every arrival costs a token, whatever its seq: a jump to the top or a seq already
    # seen buys nothing, and a payload that will not decode is charged too.
    assert reason(ps, "p/s-1/rec", power_record(2**32 - 1)) == "rate_limited"
    assert reason(ps, "p/s-1/rec", power_record(3)) == "rate_limited"
    assert reason(ps, "p/s-1/rec", b"garbage") == "rate_limited"
    clock.t += 1.0
    ps.decode(None, "p/s-1/rec", power_record(4), NOW, "mqtt")
    assert reason(ps, "p/s-1/rec", power_record(5)) == "rate_limited"
    clock.t += 10.0
    for seq in range(5, 8):
        ps.decode(None, "p/s-1/rec", power_record(seq), NOW, "mqtt")
    assert reason(ps, "p/s-1/rec", power_record(8)) == "rate_limited"
    assert build(tmp_path, clock=clock, rate_limits=False).decode(
        None, "p/s-1/rec", power_record(8), NOW, "mqtt"
    )


def test_rate_limit_cannot_be_bought_with_device_times_or_seqs(tmp_path: Path) -> None:
    d = tmp_path / "profiles"
    ps0 = build(tmp_path)
    del ps0
    text = (
        (d / "meter.toml")
        .read_text()
        .replace("[[fields]]", "[rate_limit]\nper_s = 0.1\nburst = 2\n\n[[fields]]", 1)
    )
    (d / "meter.toml").write_text(text)
    clock = Clock()
    ps = ProfileSet.load(
        d,
        gateway_id=GW,
        keys_dir=tmp_path / "keys",
        pseudonym_key_file=tmp_path / "pseudonym.key",
        clock=clock,
    )
    # Device times an hour apart, or set back to the edge of the replay window, and seqs
    # jumping to the top: the bucket refills by the gateway's clock only.
    start = NOW // 1000 - 86_000
    ps.decode(None, "m/m-5/up", cb.encode(meter_doc(seq=2**53, t=start)), NOW, "mqtt")
    ps.decode(None, "m/m-5/up", cb.encode(meter_doc(seq=1, t=start + 3600)), NOW, "mqtt")
    for i in range(2, 50):
        doc = meter_doc(seq=i, t=start + 3600 * i % 86_000)
        assert reason(ps, "m/m-5/up", cb.encode(doc)) == "rate_limited"
    clock.t += 10.0  # one token at 0.1/s
    ps.decode(None, "m/m-5/up", cb.encode(meter_doc(seq=50, t=start)), NOW, "mqtt")
    assert reason(ps, "m/m-5/up", cb.encode(meter_doc(seq=51, t=start))) == "rate_limited"


# ---- reload -----------------------------------------------------------------------------


def test_reload_swaps_in_a_good_set_and_keeps_the_old_one_when_a_file_is_broken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ps = build(tmp_path)
    d = tmp_path / "profiles"
    before = ps.names()
    (d / "broken.toml").write_text(TRACKER.format(max_payload=1, auth="", unknown="maybe"))
    with pytest.raises(ConfigError, match=r"broken\.toml:6: unknown_fields = 'maybe'"):
        ps.reload()
    assert ps.names() == before
    assert ps.decode(None, "m/x/up", cb.encode(meter_doc()), NOW, "mqtt")
    log = logging.getLogger("test.reload")
    with caplog.at_level(logging.INFO, logger="test.reload"):
        assert not ps.try_reload(log)
    assert "profiles reload failed, keeping json@1, meter@1, power@1, tracker@2" in caplog.text
    assert "broken.toml:6" in caplog.text
    (d / "broken.toml").write_text(
        TRACKER.format(max_payload=4096, auth="", unknown="ignore")
        .replace('name = "tracker"', 'name = "tracker-v3"')
        .replace('["t/+/pos", "fleet/+/+/pos"]', '["v3/+/pos"]')
    )
    with caplog.at_level(logging.INFO, logger="test.reload"):
        assert ps.try_reload(log)
    assert "tracker-v3@2" in ps.names()
    assert "v3/+/pos" in ps.topic_filters()
    (d / "broken.toml").unlink()
    assert "tracker-v3@2" not in ps.reload()


def test_reload_picks_up_rotated_device_keys(tmp_path: Path) -> None:
    ps = build(tmp_path, meter_auth=HMAC_TRAILER)
    body = cb.encode(meter_doc())
    new_key = bytes(range(1, 33))
    (tmp_path / "keys" / "meter.keys").write_text(f'[devices]\n"m-1" = "{new_key.hex()}"\n')
    assert ps.decode(None, "m/m-1/up", body + tag(body), NOW, "mqtt")
    ps.reload()
    assert reason(ps, "m/m-1/up", body + tag(body)) == "bad_device_auth"
    assert ps.decode(None, "m/m-1/up", body + tag(body, new_key), NOW, "mqtt")


def test_parse_profile_reports_all_types() -> None:
    p = parse_profile(
        Path(__file__).resolve().parents[1] / "firmware_profiles" / "cellsite-power.toml"
    )
    assert {f.type for f in p.fields} >= {"u8", "ascii", "u32", "u16", "i16", "i8"}
    assert math.isclose(p.field("rectifier_v").scale or 0, 0.01)
