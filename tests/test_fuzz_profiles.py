"""Fuzzing the decoder: at least 10,000 generated and mutated payloads per profile.

Promise 6 at the decoder: whatever arrives, decode either returns a canonical
transaction or raises Rejected with a listed reason, and takes a few
milliseconds at most. Hypothesis drives each example: it draws raw bytes, a
document of the profile's shape with hostile values, edits to a valid payload,
and a seed; the seed then mutates valid and drawn payloads into 100 payloads
per example (bit flips, byte edits, cuts, splices, format-aware edits).
Authenticated profiles are also fuzzed through an unauthenticated twin, so the
mutations reach the parsers instead of stopping at the tag check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway._pb.edgegateway.v1 import transaction_pb2
from gateway.common.errors import Rejected
from gateway.edge.profiles import REASONS, ProfileSet, bind, read_profiles
from gateway.edge.profiles.spec import Profile
from gateway.edge.profiles.topics import example_topic
from gateway.formats.canonical import canonical_json
from gateway.lab import synth

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_767_225_600_000
DEVICES = ("fz-0001", "fz-0002")
EXAMPLES = 100
PER_EXAMPLE = 100
TARGET = 10_000
# "A few milliseconds": a decode slower than this, timed again at its best of
# three (to forgive a scheduler hiccup), fails the test.
LIMIT_S = 0.005

SHIPPED = {p.name: p for p in read_profiles(ROOT / "firmware_profiles")}


def open_twin(p: Profile) -> Profile:
    """The same profile without device authentication, on its own topics."""
    assert p.device_id_level is not None
    return dataclasses.replace(
        p,
        name=f"{p.name}-open",
        auth=None,
        filters=tuple(f"open/{f}" for f in p.filters),
        device_id_level=p.device_id_level + 1,
    )


TARGETS = {**SHIPPED, **{f"{n}-open": open_twin(p) for n, p in SHIPPED.items() if p.auth}}
KEYS = synth.DemoKeys()
COUNTS: Counter[str] = Counter()
REASONS_SEEN: dict[str, Counter[str]] = {}
SLOWEST: dict[str, float] = {}


@pytest.fixture(scope="module")
def profile_set(tmp_path_factory: pytest.TempPathFactory) -> ProfileSet:
    tmp = tmp_path_factory.mktemp("fuzz")
    KEYS.write_keys_files(SHIPPED.values(), DEVICES, tmp / "keys")
    pk = tmp / "pseudonym.key"
    pk.write_text(os.urandom(32).hex())
    pk.chmod(0o600)
    decoders = bind(list(TARGETS.values()), "edge-fuzz-01", tmp / "keys", pk)
    # Rate limits stay on: charging is one more path that must not crash. They charge on
    # arrival, by the gateway's clock; this one runs an hour per payload, so every payload
    # reaches its decoder (test_profiles_decode checks the refusals).
    hours = itertools.count(step=3600.0)
    return ProfileSet(
        decoders,
        gateway_id="edge-fuzz-01",
        max_payload_bytes=1 << 20,
        clock=lambda: next(hours),
    )


def bases(p: Profile, n: int = 24) -> list[bytes]:
    rng = random.Random(p.name)
    return [synth.valid(p, DEVICES[i % 2], 1000 + i, NOW - 5_000, rng, KEYS) for i in range(n)]


BASES = {name: bases(p) for name, p in TARGETS.items()}
INTERESTING = [
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\x1b",
    b"\x3b",
    b"\x5f",
    b"\x9f",
    b"\xbf",
    b"\xc2",
    b"\xf7",
    b"\xf9\x7e\x00",
    b"\xfb\x7f\xf0\x00\x00\x00\x00\x00\x00",
    b'"',
    b"\\",
    b"\\ud800",
    b"{",
    b"[",
    b"[[[[[[[[",
    b"NaN",
    b"-Infinity",
    b"1e999",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"null",
    b"\xc3\x28",
    b"\xed\xa0\x80",
]


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(10)
        n = len(b)
        i = rng.randrange(n + 1)
        if op == 0 and n:
            b[min(i, n - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            b[min(i, n - 1)] = rng.randrange(256)
        elif op == 2:
            j = min(n, i + rng.randint(1, 16))
            del b[i:j]
        elif op == 3:
            b[i:i] = rng.choice(INTERESTING)
        elif op == 4:
            b = b[:i]
        elif op == 5:
            b += rng.randbytes(rng.randint(1, 8))
        elif op == 6 and n:
            j = rng.randrange(n)
            b[i:i] = b[j : j + rng.randint(1, 32)]
        elif op == 7:
            other = rng.choice(pool)
            b = b[:i] + other[rng.randrange(len(other) + 1) :]
        elif op == 8 and n:
            # Replace a run of digits or a CBOR head with something hostile.
            j = min(n, i + rng.randint(1, 6))
            b[i:j] = rng.choice(INTERESTING)
        else:
            b = bytearray(rng.choice(pool))
    return bytes(b)


hostile = st.one_of(
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
)


def shaped(p: Profile, vals: dict[str, Any], over: dict[str, Any], rng: random.Random) -> bytes:
    """A document of the profile's shape with some values replaced, sealed if it can be."""
    vals = {**vals, **over}
    dev = DEVICES[0]
    if p.encoding == "binary":
        body = bytearray(synth.record(p, {k: v for k, v in vals.items() if k not in over}))
        for name in over:
            f = p.field(name)
            assert f.offset is not None
            chunk = rng.randbytes(max(1, f.length or 4))
            body[f.offset : f.offset + len(chunk)] = chunk
        return synth.seal(p, dev, bytes(body[: p.record_length]), KEYS)
    doc = synth.document(p, vals)
    if p.encoding == "json":
        body = json.dumps(doc, allow_nan=True, default=repr).encode()
    else:
        try:
            body = cbor2.dumps(doc)
        except (cbor2.CBOREncodeError, TypeError, ValueError):
            body = b"\xa0"
    return synth.seal(p, dev, body, KEYS)


def check(ps: ProfileSet, name: str, p: Profile, topic: str, payload: bytes) -> None:
    t0 = time.perf_counter()
    try:
        inc = ps.decode(None, topic, payload, NOW, "mqtt")
    except Rejected as r:
        assert r.reason in REASONS, r
        REASONS_SEEN.setdefault(name, Counter())[r.reason] += 1
        outcome = None
    else:
        REASONS_SEEN.setdefault(name, Counter())["ok"] += 1
        outcome = inc
    took = time.perf_counter() - t0
    if took > LIMIT_S / 5:
        took = min(_retime(ps, topic, payload) for _ in range(3))
        assert took <= LIMIT_S, f"{name}: {took * 1000:.1f} ms for {payload[:64]!r}"
    SLOWEST[name] = max(SLOWEST.get(name, 0.0), took)
    COUNTS[name] += 1
    if outcome is not None:
        tx = transaction_pb2.Transaction.FromString(outcome.leaf)
        assert tx.profile == p.id
        assert canonical_json(json.loads(tx.fields)) == tx.fields


def _retime(ps: ProfileSet, topic: str, payload: bytes) -> float:
    t0 = time.perf_counter()
    with contextlib.suppress(Rejected):
        ps.decode(None, topic, payload, NOW, "mqtt")
    return time.perf_counter() - t0


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_ten_thousand_hostile_payloads_only_ever_raise_rejected(
    profile_set: ProfileSet, name: str
) -> None:
    p = TARGETS[name]
    assert p.device_id_level is not None
    topic = example_topic(p.filters[0], p.device_id_level, DEVICES[0])
    pool = BASES[name]
    field_names = [f.name for f in p.fields]
    start = COUNTS[name]

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        raw=st.binary(max_size=300),
        over=st.dictionaries(st.sampled_from(field_names), hostile, max_size=3),
        edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
        base=st.integers(0, len(pool) - 1),
        seed=st.integers(0, 2**32 - 1),
    )
    def run(
        raw: bytes,
        over: dict[str, Any],
        edits: list[tuple[int, int]],
        base: int,
        seed: int,
    ) -> None:
        rng = random.Random(seed)
        vals = synth.values(p, 5000 + seed % 1000, NOW - 1000, rng)
        edited = bytearray(pool[base])
        for pos, byte in edits:
            if edited:
                edited[pos % len(edited)] = byte
        drawn = [raw, shaped(p, vals, over, rng), bytes(edited)]
        mixed = [*pool, *drawn]
        payloads = drawn + [mutate(rng.choice(mixed), rng, mixed) for _ in range(PER_EXAMPLE - 3)]
        for payload in payloads:
            check(profile_set, name, p, topic, payload)

    run()
    assert COUNTS[name] - start >= TARGET
    seen = REASONS_SEEN[name]
    # The mutations must reach past the first checks, or the fuzzing proves little.
    assert len(seen) >= 4, seen


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_issue_hostile_list_against_every_profile(profile_set: ProfileSet, name: str) -> None:
    p = TARGETS[name]
    assert p.device_id_level is not None
    topic = example_topic(p.filters[0], p.device_id_level, DEVICES[0])
    valid = BASES[name][0]
    cases = [
        valid[:-1],
        valid[: len(valid) // 2],
        valid + b"\x00",
        b"\x81" * 100_000 + b"\x00",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000,
        b'{"seq": 18446744073709551616}',
        b"\xc2\x51" + b"\x01" * 17,
        b'{"seq": NaN}',
        b'{"seq": Infinity}',
        b"\xf9\x7c\x00",
        b'{"seq": 1, "seq": 1}',
        b"\xa2\x01\x01\x01\x01",
        b'{"seq": "\xff"}',
        b"\x62\xc3\x28",
        b"\x00" * (10 * 1024 * 1024),
        b"",
    ]
    for payload in cases:
        with pytest.raises(Rejected) as ei:
            profile_set.decode(None, topic, payload, NOW, "mqtt")
        assert ei.value.reason in REASONS
        assert min(_retime(profile_set, topic, payload) for _ in range(3)) <= LIMIT_S


def test_fuzz_summary() -> None:
    """What the fuzzing saw (shown with -s); fails if a profile got fewer payloads."""
    for name in sorted(COUNTS):
        reasons = ", ".join(f"{k} {v}" for k, v in REASONS_SEEN[name].most_common())
        print(
            f"fuzz {name}: {COUNTS[name]} payloads, slowest "
            f"{SLOWEST[name] * 1000:.2f} ms; {reasons}"
        )
    if COUNTS:
        assert all(COUNTS[n] >= TARGET for n in TARGETS)
