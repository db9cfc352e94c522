"""Decode throughput per profile: `python -m gateway.lab.profilebench [--seconds S] [--dir D]`.

Decodes distinct valid payloads (synthesised, device keys derived from the
demo seed, authentication and pseudonymisation included) through a
ProfileSet on one thread, and prints payloads per second for each profile and
for the built-in json@1. Rate limits are off: this measures decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.common import resources
from gateway.edge.profiles.profileset import BUILTIN_ID, ProfileSet, read_profiles
from gateway.edge.profiles.topics import example_topic
from gateway.lab import synth

SHIPPED_PROFILES = resources.profiles_dir()
DEVICES = 64
PAYLOADS = 2000


@dataclass(frozen=True)
class BenchResult:
    profile: str
    payloads: int
    seconds: float
    bytes_mean: int

    @property
    def per_s(self) -> float:
        return self.payloads / self.seconds if self.seconds else 0.0


def run(directory: Path = SHIPPED_PROFILES, seconds: float = 1.0) -> list[BenchResult]:
    """Measure each profile in `directory` for about `seconds`; json@1 too."""
    profiles = read_profiles(directory)
    keys = synth.DemoKeys()
    devices = [f"bench-{i:04d}" for i in range(DEVICES)]
    now = time.time_ns() // 1_000_000
    with tempfile.TemporaryDirectory(prefix="edge-gateway-bench-") as tmp:
        keys_dir = Path(tmp) / "keys"
        keys.write_keys_files(profiles, devices, keys_dir)
        pseudo = Path(tmp) / "pseudonym.key"
        fd = os.open(pseudo, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, os.urandom(32).hex().encode())
        os.close(fd)
        ps = ProfileSet.load(
            directory,
            gateway_id="edge-bench-01",
            keys_dir=keys_dir,
            pseudonym_key_file=pseudo,
            enforce_rate_limits=False,
        )
    rng = random.Random(1)
    cases: dict[str, list[tuple[str, bytes]]] = {}
    for p in sorted(profiles, key=lambda p: p.id):
        batch = []
        for i in range(PAYLOADS):
            dev = devices[i % DEVICES]
            topic = example_topic(p.filters[0], p.device_id_level, dev)
            batch.append((topic, synth.valid(p, dev, i + 1, now - 1000, rng, keys)))
        cases[p.id] = batch
    cases[BUILTIN_ID] = [
        (
            f"devices/{devices[i % DEVICES]}/tx",
            json.dumps(
                {"seq": i + 1, "time": now - 1000, "kind": "meter.reading", "energy_wh": i},
                separators=(",", ":"),
            ).encode(),
        )
        for i in range(PAYLOADS)
    ]
    results = []
    for ident, batch in cases.items():
        done = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for topic, payload in batch:
                dev = topic.split("/")[1]
                ps.decode(dev, topic, payload, now, "mqtt")
            done += len(batch)
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - t0
        mean = sum(len(b) for _, b in batch) // len(batch)
        results.append(BenchResult(ident, done, elapsed, mean))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="per profile")
    ap.add_argument("--dir", type=Path, default=SHIPPED_PROFILES)
    args = ap.parse_args()
    print(f"{'profile':<20} {'payload B':>9} {'payloads/s':>11} {'us/payload':>11}")
    for r in run(args.dir, args.seconds):
        print(f"{r.profile:<20} {r.bytes_mean:>9} {r.per_s:>11,.0f} {1e6 / r.per_s:>11.1f}")


if __name__ == "__main__":
    main()
