"""Device load over MQTT: N simulated devices publishing QoS 1 payloads.

Each device publishes at its share of the rate and waits for its PUBACK
before the next message, as constrained firmware does. `--bad-ratio` mixes in
malformed payloads so the dead-letter path is exercised under load.

Without `--profile` the devices speak the built-in json@1 format. With one or
more `--profile NAME`, devices are dealt round-robin to those firmware
profiles and publish their encoding on their topics, signed with keys derived
from `--key-seed` (gateway.lab.synth.DemoKeys); provision_keys() writes
the matching keys files for the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from gateway.common.errors import CertificateError, Unreachable
from gateway.edge.profiles.profileset import DEFAULT_PROFILES_DIR, read_profiles
from gateway.edge.profiles.spec import Profile, ProfileError
from gateway.edge.profiles.topics import example_topic
from gateway.lab import synth

BAD_PAYLOADS = (
    b"not json at all",
    b'{"time": 1, "energy_wh": 5}',  # no seq
    b'{"seq": "seven"}',
    b'{"seq": 1, "seq": 2}',
    b'{"seq": 1, "v": NaN}',
    b"\xff\xfe\x00",
    b"[" * 5000,
)
PROGRESS_EVERY_S = 2.0


@dataclass(frozen=True)
class SimulateOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    devices: int = 100
    rate: float = 1000.0  # messages per second over all devices
    seconds: float = 10.0
    count: int = 0  # per device; 0 = run for `seconds`
    topic_prefix: str = "devices"
    device_prefix: str = "dev"
    start_seq: int = 1
    bad_ratio: float = 0.0
    payload_bytes: int = 0  # pad each payload to about this size
    seed: int = 1
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    profiles: tuple[str, ...] = ()  # firmware profiles (name or name@version); () = json@1
    profiles_dir: Path = DEFAULT_PROFILES_DIR
    key_seed: str = synth.DEMO_SEED
    progress: bool = False  # a line to stderr every PROGRESS_EVERY_S while it runs

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> SimulateOptions:
        return cls(
            host=a.host,
            port=a.port,
            devices=a.devices,
            rate=a.rate,
            seconds=a.seconds,
            count=a.count,
            topic_prefix=a.topic_prefix,
            device_prefix=a.device_prefix,
            start_seq=a.start_seq if a.start_seq is not None else int(time.time() * 1000),
            bad_ratio=a.bad_ratio,
            payload_bytes=a.payload_bytes,
            seed=a.seed,
            ca_file=a.ca_file,
            cert_file=a.cert_file,
            key_file=a.key_file,
            profiles=tuple(a.profile or ()),
            profiles_dir=a.profiles_dir,
            key_seed=a.key_seed,
            progress=not a.quiet,
        )


@dataclass
class SimulateResult:
    published: int = 0
    acknowledged: int = 0
    bad_published: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    # good payloads acknowledged, by profile id (profile runs only)
    by_profile: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        rate = self.acknowledged / self.elapsed_s if self.elapsed_s else 0.0
        text = (
            f"published {self.published} (bad {self.bad_published}), acknowledged "
            f"{self.acknowledged}, failed {self.failed}, {self.elapsed_s:.1f} s, "
            f"{rate:.0f} msg/s"
        )
        if self.by_profile:
            text += " [" + ", ".join(f"{k} {v}" for k, v in sorted(self.by_profile.items())) + "]"
        return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--rate", type=float, default=1000.0, help="messages/s over all devices")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--count", type=int, default=0, help="messages per device (overrides seconds)")
    p.add_argument("--topic-prefix", default="devices")
    p.add_argument("--device-prefix", default="dev")
    p.add_argument(
        "--start-seq",
        type=int,
        default=None,
        help="first device seq (default: now in ms, so reruns never collide)",
    )
    p.add_argument("--bad-ratio", type=float, default=0.0)
    p.add_argument("--payload-bytes", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ca-file", type=Path)
    p.add_argument("--cert-file", type=Path)
    p.add_argument("--key-file", type=Path)
    p.add_argument(
        "--profile",
        action="append",
        metavar="NAME",
        help="publish this firmware profile's traffic (repeat for several; default json@1)",
    )
    p.add_argument(
        "--profiles-dir",
        type=Path,
        default=DEFAULT_PROFILES_DIR,
        help=f"where --profile files are ({DEFAULT_PROFILES_DIR})",
    )
    p.add_argument(
        "--key-seed",
        default=synth.DEMO_SEED,
        help="seed of the simulated devices' keys (demo only)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help=f"no progress line on stderr every {PROGRESS_EVERY_S:.0f} s, only the final one",
    )


def payload(seq: int, rng: random.Random, pad: int) -> bytes:
    doc: dict[str, object] = {
        "seq": seq,
        "time": time.time_ns() // 1_000_000,
        "kind": "meter.reading",
        "energy_wh": rng.randint(0, 10_000_000),
        "voltage_dv": rng.randint(2100, 2500),
        "rsrp_dbm": -rng.randint(60, 130),
    }
    raw = json.dumps(doc, separators=(",", ":")).encode()
    if pad > len(raw):
        doc["pad"] = "x" * (pad - len(raw) - 9)
        raw = json.dumps(doc, separators=(",", ":")).encode()
    return raw


def load_profiles(opts: SimulateOptions) -> list[Profile]:
    """The profiles named by opts.profiles, in that order."""
    if not opts.profiles:
        return []
    known = read_profiles(opts.profiles_dir)
    out = []
    for name in opts.profiles:
        found = [p for p in known if name in (p.id, p.name)]
        if len(found) != 1:
            have = ", ".join(sorted(p.id for p in known)) or "none"
            what = "is ambiguous" if found else "is not there"
            raise ProfileError(
                f"simulate --profile {name!r} {what} in {opts.profiles_dir} (profiles: {have})"
            )
        out.append(found[0])
    return out


def device_name(opts: SimulateOptions, i: int) -> str:
    return f"{opts.device_prefix}-{i:05d}"


def device_ids(opts: SimulateOptions) -> dict[str, list[str]]:
    """Device ids by profile id, as run() deals them out."""
    profiles = load_profiles(opts)
    out: dict[str, list[str]] = {p.id: [] for p in profiles}
    for i in range(opts.devices if profiles else 0):
        out[profiles[i % len(profiles)].id].append(device_name(opts, i))
    return out


def provision_keys(opts: SimulateOptions, keys_dir: Path) -> list[Path]:
    """Write the keys files a gateway needs to authenticate this run's devices."""
    profiles = load_profiles(opts)
    ids = device_ids(opts)
    keys = synth.DemoKeys(opts.key_seed)
    written: list[Path] = []
    for p in profiles:
        written += keys.write_keys_files([p], ids[p.id], keys_dir)
    return written


def _profile_seq(opts: SimulateOptions, profile: Profile) -> int:
    # start_seq defaults to the time in ms, which a u32 sequence field cannot
    # hold; folding it keeps reruns apart for weeks without overflowing.
    limit = synth.seq_limit(profile)
    if opts.start_seq + 10_000_000 <= limit:
        return opts.start_seq
    return opts.start_seq % (limit // 2)


async def run(opts: SimulateOptions) -> SimulateResult:
    result = SimulateResult()
    profiles = load_profiles(opts)
    keys = synth.DemoKeys(opts.key_seed)
    tls = None
    if opts.ca_file is not None:
        try:
            tls = ssl.create_default_context(cafile=str(opts.ca_file))
            if opts.cert_file is not None:
                key = str(opts.key_file) if opts.key_file else None
                tls.load_cert_chain(str(opts.cert_file), key)
        except OSError as e:  # ssl.SSLError included
            files = ", ".join(str(f) for f in (opts.ca_file, opts.cert_file, opts.key_file) if f)
            raise CertificateError(
                f"simulate: TLS files {files} cannot be loaded: {e.strerror or e}"
            ) from None
    per_device = opts.rate / max(1, opts.devices)
    interval = 1.0 / per_device if per_device > 0 else 0.0
    t0 = time.monotonic()
    deadline = t0 + opts.seconds
    quiet = logging.getLogger("gateway.lab.simulate.mqtt")
    quiet.setLevel(logging.ERROR)  # aiomqtt warns on every pending publish beyond ten
    async with contextlib.AsyncExitStack() as stack:
        try:
            client = await stack.enter_async_context(
                aiomqtt.Client(
                    opts.host,
                    opts.port,
                    identifier=f"sim-{opts.seed}-{time.time_ns()}",
                    max_inflight_messages=65535,
                    max_queued_outgoing_messages=0,
                    tls_context=tls,
                    timeout=30,
                    logger=quiet,
                )
            )
        except aiomqtt.MqttError as e:
            raise Unreachable(
                f"simulate: cannot connect to the MQTT broker at {opts.host}:{opts.port}: {e}"
            ) from None

        async def device(i: int) -> None:
            rng = random.Random(opts.seed * 1_000_003 + i)
            dev = device_name(opts, i)
            prof = profiles[i % len(profiles)] if profiles else None
            if prof is not None and prof.filters:
                topic = example_topic(prof.filters[0], prof.device_id_level, dev)
            else:
                topic = f"{opts.topic_prefix}/{dev}/tx"
            seq = _profile_seq(opts, prof) if prof is not None else opts.start_seq
            next_at = t0 + rng.random() * interval
            sent = 0
            while True:
                if opts.count:
                    if sent >= opts.count:
                        return
                elif time.monotonic() >= deadline:
                    return
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
                bad = opts.bad_ratio > 0 and rng.random() < opts.bad_ratio
                if prof is not None:
                    now = time.time_ns() // 1_000_000
                    body = (
                        synth.invalid(prof, dev, seq, now, rng, keys)[1]
                        if bad
                        else synth.valid(prof, dev, seq, now, rng, keys)
                    )
                else:
                    body = (
                        rng.choice(BAD_PAYLOADS) if bad else payload(seq, rng, opts.payload_bytes)
                    )
                result.published += 1
                result.bad_published += bad
                try:
                    await client.publish(topic, body, qos=1, timeout=60)
                    result.acknowledged += 1
                    if prof is not None and not bad:
                        result.by_profile[prof.id] += 1
                except aiomqtt.MqttError as e:
                    result.failed += 1
                    if len(result.errors) < 5:
                        result.errors.append(str(e))
                if not bad:
                    seq += 1
                sent += 1

        progress = asyncio.create_task(_progress(result, t0)) if opts.progress else None
        try:
            async with asyncio.TaskGroup() as tg:
                for i in range(opts.devices):
                    tg.create_task(device(i))
        finally:
            if progress is not None:
                progress.cancel()
    result.elapsed_s = time.monotonic() - t0
    return result


async def _progress(result: SimulateResult, t0: float) -> None:
    """Every PROGRESS_EVERY_S: elapsed, published, acknowledged, rate since the last line."""
    last_t, last_acks = t0, 0
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        now = time.monotonic()
        rate = (result.acknowledged - last_acks) / max(1e-9, now - last_t)
        print(
            f"simulate: {now - t0:.0f} s, published {result.published}, acknowledged "
            f"{result.acknowledged}, {rate:.0f} msg/s",
            file=sys.stderr,
            flush=True,
        )
        last_t, last_acks = now, result.acknowledged
