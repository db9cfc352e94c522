"""`make bench` keeps working: a tiny run on the real components prints every figure.

Figures are not pass/fail here (a shared CI machine is no place to judge them);
the test only checks that the benchmark completes and reports each key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.edge.profiles import JsonDecoder
from gateway.lab import loadgen

pytestmark = pytest.mark.integration

REQUIRED_KEYS = {
    "bare_msg_per_s",
    "e2e_tx_per_s",
    "ratio",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "rss_mb",
    "cpu_s_per_1k",
    "get_tx_p99_ms_at_1m",
    "rss_mb_at_1m",
    "signatures_per_s",
    "signatures_per_batch",
    "generator_ceiling_msg_per_s",
    "hsm_sign_ceiling_per_s",
    "scaling",
}


@pytest.mark.parametrize("size", [120, 1024, 4096])
def test_generator_payloads_have_the_requested_size_and_decode(size: int) -> None:
    payload = loadgen.sample_payload(size)
    # Below ~115 B the readings alone set the size; above, padding makes it exact.
    assert len(payload) == size if size > 200 else 100 <= len(payload) <= 130
    now = time.time_ns() // 1_000_000
    inc = JsonDecoder("edge-bench", 65536).decode(
        "bench-00001", "devices/bench-00001/tx", payload, now, "mqtt"
    )
    assert inc.device_seq == 1_000_000_001


def test_publishers_own_disjoint_devices() -> None:
    owned = [set(loadgen.owned_devices(i, 3, 10)) for i in range(3)]
    assert set().union(*owned) == set(range(10))
    assert sum(len(o) for o in owned) == 10


def test_quick_bench_completes_and_prints_every_figure(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.lab.bench", "--quick", "--workdir", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert set(figures) >= REQUIRED_KEYS, REQUIRED_KEYS - set(figures)
    assert figures["scaling"] and figures["spool_tx_at_1m"] > 0
    # One HSM signature per batch, the checkpoint's (no key rotation in the bench).
    assert figures["signatures_per_batch"] == 1.0
    assert "ratio" in out.stdout and "GetTransaction" in out.stdout
