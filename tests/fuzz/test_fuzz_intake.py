"""Fuzzing a running gateway on real Mosquitto: generated topics and payloads in, nothing
crashes, and every message is accounted for.

Topics are the gateway's subscriptions with random device levels (valid ids, empty, long up
to MQTT's 65,535-byte limit, unicode); payloads are random JSON, CBOR, binary and text,
NULs included, too large ones, and the shipped profiles' own payloads, valid, invalid and
mutated. A slice goes through the gRPC API with ids MQTT cannot carry (NUL, wildcards).
Afterwards the gateway must be alive and serving, every reject must carry a reason from
the list, and the counts must reconcile: each message stored, a duplicate, or rejected;
each rejection recorded and dead-lettered one by one, or counted in a summary.

`make test` runs it with 2,000 messages; `make fuzz` with EDGE_GATEWAY_FUZZ_MESSAGES
(100,000 there).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest

from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.common import resources
from gateway.edge.profiles import REASONS, Profile, read_profiles
from gateway.lab import synth
from gateway.lab.demo import gateway_status, wait_drained
from gateway.lab.sandbox import Sandbox
from tests.conftest import deploy
from tests.mqttkit import (
    by_label,
    dead_letters,
    device,
    scrape,
    spool_rows,
    total,
    wait_until,
)
from tests.test_intake_process import intake_of

pytestmark = pytest.mark.integration

MESSAGES = int(os.environ.get("EDGE_GATEWAY_FUZZ_MESSAGES", "2000"))
SEED = int(os.environ.get("EDGE_GATEWAY_FUZZ_SEED", "20260301"))
GRPC_SHARE = 0.02
MAX_PAYLOAD = 65_536
PROFILES = read_profiles(resources.profiles_dir())
DEVICES = [f"fz-{i:03d}" for i in range(40)]
KEYS = synth.DemoKeys()

# Characters a device level may hold on the wire: Mosquitto refuses control characters,
# surrogates and non-characters in a topic (and drops the client), MQTT forbids NUL and
# the wildcards in a topic name, and '/' would be another level.
_ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    "._:-",
    " !\"$%&'()*,;<=>?@[\\]^`{|}~",
    "éüßøĳœÆ",
    "中文字符ひらがなカタカナ한국어",
    "עברית العربية",
    "😀🚀🛰️👩‍💻",
    "\u0301\u200b\u200d\u2028\ufeff",
]


def wire_safe(text: str) -> str:
    return "".join(
        c
        for c in text
        if unicodedata.category(c) not in ("Cc", "Cs", "Cn") and (ord(c) & 0xFFFE) != 0xFFFE
    )


def device_level(rng: random.Random, room: int) -> str:
    kind = rng.random()
    if kind < 0.5:
        return rng.choice(DEVICES)
    if kind < 0.55:
        return ""
    length = rng.choice([1, 5, 64, 127, 128, 129, 300, 1000, 10_000, room])
    alphabet = "".join(rng.sample(_ALPHABETS, rng.randint(1, 3)))
    level = wire_safe("".join(rng.choice(alphabet) for _ in range(min(length, 20_000))))
    while len(level.encode()) > room:
        level = level[: len(level) * 3 // 4]
    return level


def subscriptions() -> list[tuple[list[str], int, Profile | None]]:
    """(filter levels, device level, profile) of every topic the gateway subscribes to."""
    subs: list[tuple[list[str], int, Profile | None]] = [(["devices", "+", "tx"], 1, None)]
    for p in PROFILES:
        assert p.device_id_level is not None
        subs += [(f.split("/"), p.device_id_level, p) for f in p.filters]
    return subs


def random_json(rng: random.Random, depth: int = 0) -> object:
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice(
            [
                rng.randint(-(2**70), 2**70),
                rng.randint(0, 100),
                rng.random() * 1e6,
                "".join(rng.choice(rng.choice(_ALPHABETS)) for _ in range(rng.randint(0, 20))),
                "nul\x00inside",
                None,
                True,
                [],
            ]
        )
    if r < 0.6:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice(["seq", "time", "kind", "ts", "x", "é", ""]): random_json(rng, depth + 1)
        for _ in range(rng.randint(0, 5))
    }


def payload(rng: random.Random, profile: Profile | None, dev: str, now: int) -> bytes:
    kind = rng.random()
    if kind < 0.25 and profile is not None and dev in DEVICES:
        seq = rng.randint(1, 200)
        make = synth.valid if rng.random() < 0.6 else synth.invalid
        body = make(profile, dev, seq, now - rng.randint(0, 60_000), rng, KEYS)
        return body if isinstance(body, bytes) else body[1]
    if kind < 0.45:
        doc = {"seq": rng.randint(0, 300), "kind": "fuzz", "v": random_json(rng)}
        if rng.random() < 0.3:
            doc["time"] = rng.choice([now, now + 10**12, -1, 0, "x"])
        return json.dumps(doc).encode()
    if kind < 0.6:
        return json.dumps(random_json(rng)).encode()
    if kind < 0.7:
        try:
            return bytes(cbor2.dumps(random_json(rng)))
        except (ValueError, TypeError, OverflowError, cbor2.CBOREncodeError):
            return b"\xa1\x01\x02"
    if kind < 0.8:
        return rng.randbytes(rng.choice([0, 1, 12, 64, 255, 1024]))
    if kind < 0.88:
        return "".join(rng.choice(rng.choice(_ALPHABETS)) for _ in range(50)).encode()
    if kind < 0.93:
        return b"\x00" * rng.randint(1, 100) + b'{"seq": 1}'
    if kind < 0.99:
        return b"[" * rng.randint(10, 5000)
    return b"{" + b" " * rng.choice([MAX_PAYLOAD - 2, MAX_PAYLOAD, MAX_PAYLOAD + 1000]) + b"}"


def mqtt_messages(n: int, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    subs = subscriptions()
    now = int(time.time() * 1000)
    for _ in range(n):
        levels, at, profile = rng.choice(subs)
        rest = sum(len(x.encode()) + 1 for i, x in enumerate(levels) if i != at)
        dev = device_level(rng, 65_535 - rest)
        topic = "/".join(dev if i == at else x for i, x in enumerate(levels))
        yield topic, payload(rng, profile, dev, now)


def grpc_payloads(n: int, rng: random.Random) -> list[gateway_pb2.DevicePayload]:
    hostile = ["+", "#", "a+b", "x/#", "nul\x00id", "\x00", "\n", "z" * 129, "w" * 70_000, ""]
    now = int(time.time() * 1000)
    out = []
    for _ in range(n):
        dev = rng.choice([*hostile, *DEVICES[:5]])
        p = rng.choice([None, *PROFILES])
        body = payload(rng, p, dev, now)[:MAX_PAYLOAD]
        topic = rng.choice(["", f"devices/{dev}/tx", "devices/+/tx", "#", "a\x00b"])
        out.append(
            gateway_pb2.DevicePayload(
                device_id=dev, payload=body, topic=topic, profile=p.id if p else ""
            )
        )
    return out


@pytest.fixture
def fuzz_profiles(tmp_path: Path) -> str:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    KEYS.write_keys_files([p for p in PROFILES if p.auth], DEVICES, keys)
    pk = tmp_path / "pseudonym.key"
    pk.write_text(secrets.token_hex(32) + "\n")
    pk.chmod(0o600)
    return (
        f'\n[profiles]\ndir = "{resources.profiles_dir()}"\nkeys_dir = "{keys}"\n'
        f'pseudonym_key_file = "{pk}"\n\n[rejects]\nsummary_every_s = 1\n'
    )


def test_fuzzed_topics_and_payloads_never_stop_intake_and_every_message_is_accounted_for(
    sandbox: Sandbox, fuzz_profiles: str
) -> None:
    rng = random.Random(SEED)
    d = deploy(sandbox, nodes=1, quorum=1, extra=fuzz_profiles)
    gw = d.start_gateway()
    assert gw.proc.proc is not None
    n_grpc = int(MESSAGES * GRPC_SHARE)
    n_mqtt = MESSAGES - n_grpc
    t0 = time.monotonic()
    with dead_letters(sandbox, d.broker.port) as dl:
        with device(sandbox, d.broker.port, "fuzzer") as dev:
            published = dev.publish_many(mqtt_messages(n_mqtt, rng))
        grpc_results: Counter[str] = Counter()
        with gw.channel("admin") as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            items = grpc_payloads(n_grpc, rng)
            for i in range(0, len(items), 100):
                resp = stub.SubmitTransactions(
                    gateway_pb2.SubmitTransactionsRequest(payloads=items[i : i + 100]),
                    timeout=60,
                )
                for r in resp.results:
                    kind = gateway_pb2.SubmitResult.Outcome.Name(r.outcome)
                    grpc_results[kind] += 1
                    if r.outcome == gateway_pb2.SubmitResult.REJECTED:
                        assert r.reason in REASONS, r
        sent = time.monotonic() - t0
        assert published == n_mqtt and sum(grpc_results.values()) == n_grpc

        def received() -> float:
            return by_label(scrape(gw), "edge_gateway_received_total", "channel").get("mqtt", 0)

        wait_until("every published message received", lambda: received() >= published, 600)

        def outcomes() -> float:
            # A message counts as received when read, as stored or rejected once its group
            # commit lands: the two meet a moment later, or never if one was lost.
            s = scrape(gw)
            return sum(
                total(s, m)
                for m in (
                    "edge_gateway_stored_total",
                    "edge_gateway_duplicates_total",
                    "edge_gateway_rejected_total",
                )
            )

        wait_until("every message stored or rejected", lambda: outcomes() >= MESSAGES, 60)
        took = time.monotonic() - t0
        samples = scrape(gw)
        rejected = by_label(samples, "edge_gateway_rejected_total", "reason")
        stored = total(samples, "edge_gateway_stored_total")
        dups = total(samples, "edge_gateway_duplicates_total")
        not_stored = total(samples, "edge_gateway_rejects_not_stored_total")
        print(
            f"\nfuzz: {published} MQTT + {n_grpc} gRPC messages sent in {sent:.1f} s, all "
            f"taken in by {took:.1f} s; stored {stored:.0f}, duplicates {dups:.0f}, "
            f"rejected {sum(rejected.values()):.0f} ({not_stored:.0f} counted only): "
            + ", ".join(f"{k} {v:.0f}" for k, v in sorted(rejected.items()))
        )
        # Each message is stored, a duplicate or rejected, with a reason from the list.
        assert set(rejected) <= set(REASONS), rejected
        assert total(samples, "edge_gateway_received_total") == published + n_grpc
        assert stored + dups + sum(rejected.values()) == published + n_grpc
        assert grpc_results["REJECTED"] <= sum(rejected.values())
        # The spool agrees, and every rejection reached the dead-letter topic: one by one
        # if recorded, else in its device's summary.
        assert spool_rows(gw.spool, "SELECT count(*) FROM tx")[0][0] == stored
        singles = spool_rows(gw.spool, "SELECT count(*) FROM reject WHERE reason != 'summary'")
        assert singles[0][0] == sum(rejected.values()) - not_stored

        def letters() -> tuple[Counter[str], int]:
            by_reason: Counter[str] = Counter()
            summarised = 0
            for _t, doc, _n in dl.snapshot():
                if doc.get("summary"):
                    by_reason.update(doc["reasons"])
                    summarised += doc["rejected"]
                else:
                    by_reason[doc["reason"]] += 1
            return by_reason, summarised

        wait_until(
            "every rejection dead-lettered",
            lambda: sum(letters()[0].values()) == sum(rejected.values()),
            120,
        )
        by_reason, summarised = letters()
        assert summarised == not_stored
        assert by_reason == Counter({k: int(v) for k, v in rejected.items()})
        for topic, doc, size in dl.snapshot():
            assert topic.startswith("devices/rejected/") and size <= 4096, (topic[:80], size)
            assert doc.get("summary") or doc["reason"] in REASONS

    # Alive and serving: the intake process is there, a new message is committed, the stop
    # is clean and nothing was logged as a bug.
    assert gw.proc.alive() and intake_of(gw.proc.proc.pid).is_running()
    before = gateway_status(gw).transactions_stored
    with device(sandbox, d.broker.port, "after-fuzz") as dev:
        dev.publish("devices/after-fuzz/tx", b'{"seq": 1}')
    st = wait_drained(gw, before + 1, timeout=120)
    assert st.mqtt_connected and not st.intake_paused
    assert gw.proc.terminate(60) == 0
    log = gw.proc.log_text()
    assert "Traceback" not in log and "internal error" not in log
