"""Device load over MQTT: N simulated devices publishing QoS 1 JSON payloads.

Each device publishes at its share of the rate and waits for its PUBACK
before the next message, as constrained firmware does. `--bad-ratio` mixes in
malformed payloads so the dead-letter path is exercised under load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

BAD_PAYLOADS = (
    b"not json at all",
    b'{"time": 1, "energy_wh": 5}',  # no seq
    b'{"seq": "seven"}',
    b'{"seq": 1, "seq": 2}',
    b'{"seq": 1, "v": NaN}',
    b"\xff\xfe\x00",
    b"[" * 5000,
)


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
        )


@dataclass
class SimulateResult:
    published: int = 0
    acknowledged: int = 0
    bad_published: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        rate = self.acknowledged / self.elapsed_s if self.elapsed_s else 0.0
        return (
            f"published {self.published} (bad {self.bad_published}), acknowledged "
            f"{self.acknowledged}, failed {self.failed}, {self.elapsed_s:.1f} s, "
            f"{rate:.0f} msg/s"
        )


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


async def run(opts: SimulateOptions) -> SimulateResult:
    result = SimulateResult()
    tls = None
    if opts.ca_file is not None:
        tls = ssl.create_default_context(cafile=str(opts.ca_file))
        if opts.cert_file is not None:
            tls.load_cert_chain(str(opts.cert_file), str(opts.key_file) if opts.key_file else None)
    per_device = opts.rate / max(1, opts.devices)
    interval = 1.0 / per_device if per_device > 0 else 0.0
    t0 = time.monotonic()
    deadline = t0 + opts.seconds
    quiet = logging.getLogger("gateway.simulate.mqtt")
    quiet.setLevel(logging.ERROR)  # aiomqtt warns on every pending publish beyond ten
    async with aiomqtt.Client(
        opts.host,
        opts.port,
        identifier=f"sim-{opts.seed}-{time.time_ns()}",
        max_inflight_messages=65535,
        max_queued_outgoing_messages=0,
        tls_context=tls,
        timeout=30,
        logger=quiet,
    ) as client:

        async def device(i: int) -> None:
            rng = random.Random(opts.seed * 1_000_003 + i)
            dev = f"{opts.device_prefix}-{i:05d}"
            topic = f"{opts.topic_prefix}/{dev}/tx"
            seq = opts.start_seq
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
                body = rng.choice(BAD_PAYLOADS) if bad else payload(seq, rng, opts.payload_bytes)
                result.published += 1
                result.bad_published += bad
                try:
                    await client.publish(topic, body, qos=1, timeout=60)
                    result.acknowledged += 1
                except aiomqtt.MqttError as e:
                    result.failed += 1
                    if len(result.errors) < 5:
                        result.errors.append(str(e))
                if not bad:
                    seq += 1
                sent += 1

        async with asyncio.TaskGroup() as tg:
            for i in range(opts.devices):
                tg.create_task(device(i))
    result.elapsed_s = time.monotonic() - t0
    return result
