"""Budgets for the hostile: a device's rate limit runs on the gateway's clock, whatever seq
or device time it sends; its rejects cost the spool a bounded row each, are themselves
budgeted (past the budget: counted, acknowledged, summarised), and leave the spool under
its retention; and one device's flood of rejects does not pause intake for the others.
Real Mosquitto, SoftHSM and a ledger node; figures measured on the spool file."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from gateway.lab.demo import gateway_status, wait_drained
from gateway.lab.sandbox import GatewayProc, Sandbox
from tests.conftest import Deployment, deploy
from tests.mqttkit import (
    REJECT_PREFIX,
    by_label,
    dead_letters,
    device,
    scrape,
    spool_bytes,
    spool_rows,
    total,
    wait_until,
)

pytestmark = pytest.mark.integration

# A tracker whose rate limit is tight enough to count: 5 at once, then 1 a second. On the
# shipped tracker's topics, which the sandbox broker lets devices publish to.
RATE_PROFILE = """
name = "rl-tracker"
version = 1
description = "A tracker with a tight rate limit, for the budget tests"
encoding = "json"
kind = "tracker.position"
max_payload_bytes = 4096
unknown_fields = "ignore"

[topics]
filters = ["trackers/+/position"]
device_id_level = 1

[sequence]
field = "seq"

[device_time]
field = "ts"
unit = "ms"
max_ahead_s = 300
replay_window_s = 2592000

[rate_limit]
per_s = 1
burst = 5

[[fields]]
name = "seq"
pointer = "/seq"
type = "int"
min = 0

[[fields]]
name = "ts"
pointer = "/ts"
type = "int"
unit = "ms"
"""
DAY_MS = 86_400_000
KIB = 1024


def received(gw: GatewayProc) -> float:
    return total(scrape(gw), "edge_gateway_received_total")


def reject_rows(gw: GatewayProc) -> int:
    return int(spool_rows(gw.spool, "SELECT count(*) FROM reject")[0][0])


def stop(gw: GatewayProc) -> int:
    """A clean stop (it folds the WAL into the file); the spool's size on disk after it."""
    assert gw.proc.terminate(30) == 0
    return spool_bytes(gw.spool)


def restart(d: Deployment, gw: GatewayProc, rejects: str) -> int:
    """Stop, then start with another [rejects]; the spool's size between the two."""
    size = stop(gw)
    text = d.config.read_text()
    head, sep, _old = text.partition("\n[rejects]\n")
    assert sep, "the deployment's configuration has no [rejects] table to replace"
    d.config.write_text(f"{head}\n[rejects]\n{rejects}")
    d.sandbox.start_gateway_again(gw)
    return size


def garbage(n: int, seed: int) -> list[bytes]:
    """`n` payloads of 1 KiB that no profile decodes (not UTF-8: bad_encoding)."""
    rng = random.Random(seed)
    return [b"\xff" + rng.randbytes(KIB - 1) for _ in range(n)]


def test_a_seq_jump_and_an_old_device_time_do_not_bypass_the_rate_limit(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "rl-tracker.toml").write_text(RATE_PROFILE)
    keys = tmp_path / "keys"
    keys.mkdir()
    d = deploy(
        sandbox,
        nodes=1,
        quorum=1,
        batch="max_tx = 100\nmax_age_s = 0.3",
        extra=f'\n[profiles]\ndir = "{profiles}"\nkeys_dir = "{keys}"\n',
    )
    gw = d.start_gateway()
    now = int(time.time() * 1000)

    def reading(seq: int, ts: int) -> bytes:
        return json.dumps({"seq": seq, "ts": ts}).encode()

    # The highest seq first, then lower ones: a limiter that only charged seqs above the
    # highest one seen would charge none of them.
    jumper = [("trackers/jumper/position", reading(2**53 - 1, now))]
    jumper += [("trackers/jumper/position", reading(i, now)) for i in range(1, 61)]
    # Readings that claim to be an hour apart, from 29 days back: a bucket on the device's
    # clock would refill an hour's worth with each.
    old_clock = [
        ("trackers/old-clock/position", reading(i, now - 29 * DAY_MS + i * 3_600_000))
        for i in range(1, 61)
    ]
    t0 = time.monotonic()
    with device(sandbox, d.broker.port) as dev:
        assert dev.publish_many(iter(jumper + old_clock)) == 121
    wait_until("121 received", lambda: received(gw) >= 121)
    # Tokens the gateway's clock can have refilled while these arrived, at 1/s, plus the
    # burst of 5: everything past that is refused.
    allowance = 5 + 1.0 * (time.monotonic() - t0) + 1
    stored = dict(spool_rows(gw.spool, "SELECT device_id, count(*) FROM tx GROUP BY device_id"))
    assert 5 <= stored["jumper"] <= allowance, (stored, allowance)
    assert 5 <= stored["old-clock"] <= allowance, (stored, allowance)
    limited = by_label(scrape(gw), "edge_gateway_rejected_total", "reason")["rate_limited"]
    assert limited == 121 - stored["jumper"] - stored["old-clock"]
    assert limited >= 121 - 2 * allowance
    assert gw.proc.terminate(30) == 0


def settled_rows(gw: GatewayProc, quiet_s: float = 1.0, timeout: float = 30) -> int:
    """The reject row count once it has not changed for `quiet_s`."""
    deadline = time.monotonic() + timeout
    last = reject_rows(gw)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = reject_rows(gw)
        if now == last:
            return now
        last = now
    raise AssertionError(f"reject rows still changing after {timeout} s: {last}")


def test_ten_thousand_rejects_of_one_kib_cost_a_bounded_row_each_and_are_pruned(
    sandbox: Sandbox,
) -> None:
    # With no reject budget to speak of, every reject is recorded: what does one cost?
    d = deploy(sandbox, nodes=1, quorum=1, extra="\n[rejects]\nburst = 1000000\nper_s = 1000000\n")
    gw = d.start_gateway()
    before = restart(d, gw, "burst = 1000000\nper_s = 1000000\n")
    with device(sandbox, d.broker.port) as dev:
        sent = dev.publish_many(("devices/flood-1/tx", p) for p in garbage(10_000, 1))
    assert sent == 10_000
    wait_until("10,000 rejects recorded", lambda: reject_rows(gw) == 10_000, 120)
    after = stop(gw)
    per_reject = (after - before) / 10_000
    print(f"\nspool bytes per 1 KiB reject: {per_reject:.0f}")
    assert per_reject <= 1.5 * KIB, per_reject

    # A device id of 1 KiB and a topic to match: still one bounded row each (the id was
    # stored four times over, and the topic once more, before).
    d.sandbox.start_gateway_again(gw)
    before = after
    long_id = "L" * KIB
    with device(sandbox, d.broker.port) as dev:
        sent = dev.publish_many((f"devices/{long_id}/tx", p) for p in garbage(2_000, 2))
    # At least one row each; a redelivery (the broker resends what it had not seen
    # acknowledged when a connection drops) may add a row: rejects carry no seq to dedupe.
    wait_until("2,000 more recorded", lambda: reject_rows(gw) >= 12_000, 120)
    added = settled_rows(gw) - 10_000
    per_long = (stop(gw) - before) / added
    print(f"spool bytes per reject with a 1 KiB device id and 1 KiB payload: {per_long:.0f}")
    assert per_long <= 1.5 * KIB, per_long
    rows = spool_rows(gw.spool, "SELECT max(length(message)), max(length(topic)) FROM reject")
    assert rows[0][0] < 1200 and rows[0][1] < 64, rows

    # Pruned in the retention round (the first runs at start): beyond max_kept, oldest
    # first ...
    d.sandbox.start_gateway_again(gw)
    restart(d, gw, "burst = 1000000\nmax_kept = 1000\n")
    wait_until("pruned to 1,000", lambda: reject_rows(gw) == 1000)
    [(first, last)] = spool_rows(gw.spool, "SELECT min(id), max(id) FROM reject")
    assert (first, last) == (10_000 + added - 999, 10_000 + added)
    assert f"retention: pruned {10_000 + added - 1000} rejects" in gw.proc.log_text()
    # ... and older than retention_s.
    time.sleep(1.1)
    restart(d, gw, "retention_s = 1\n")
    wait_until("pruned to none", lambda: reject_rows(gw) == 0)
    assert gw.proc.terminate(30) == 0


def test_ten_thousand_rejects_from_one_device_cost_its_budget_and_one_summary(
    sandbox: Sandbox,
) -> None:
    d = deploy(sandbox, nodes=1, quorum=1, extra="\n[rejects]\nsummary_every_s = 1\n")
    gw = d.start_gateway()
    before = restart(d, gw, "summary_every_s = 1\n")  # a clean file to measure from
    with dead_letters(sandbox, d.broker.port) as dl:
        t0 = time.monotonic()
        with device(sandbox, d.broker.port) as dev:
            dev.publish_many(("devices/flood-2/tx", p) for p in garbage(10_000, 3))
        wait_until("10,000 received", lambda: received(gw) >= 10_000, 120)
        elapsed = time.monotonic() - t0
        # Every reject counted with its reason; the budget's worth recorded one by one
        # (100 at once, then one every 10 s), the rest in summaries, one per second here.
        samples = scrape(gw)
        assert by_label(samples, "edge_gateway_rejected_total", "reason") == {
            "bad_encoding": 10_000
        }
        not_stored = total(samples, "edge_gateway_rejects_not_stored_total")
        recorded = 10_000 - not_stored
        assert 100 <= recorded <= 100 + 0.1 * elapsed + 1, (recorded, elapsed)
        summaries = dl.wait_for(
            lambda _t, doc: doc.get("summary") is True,
            timeout=30,
            count=1,
        )
        wait_until(
            "summaries cover every reject not stored",
            lambda: (
                sum(doc["rejected"] for _t, doc, _n in dl.snapshot() if doc.get("summary"))
                == not_stored
            ),
        )
        summaries = [(t, doc) for t, doc, _n in dl.snapshot() if doc.get("summary")]
        assert all(t == f"{REJECT_PREFIX}/flood-2" for t, _doc in summaries)
        assert all(set(doc["reasons"]) == {"bad_encoding"} for _t, doc in summaries)
        assert len(summaries) <= elapsed + 5
        singles = [doc for _t, doc, _n in dl.snapshot() if "reason" in doc]
        assert len(singles) == recorded
    rows = reject_rows(gw)
    assert rows == recorded + len(summaries)
    growth = stop(gw) - before
    print(f"\n10,000 rejects from one device under the default budget: {growth} spool bytes")
    assert growth <= 150 * 1500, growth


def test_a_flood_of_rejects_from_one_device_does_not_pause_intake_for_others(
    sandbox: Sandbox,
) -> None:
    d = deploy(
        sandbox,
        nodes=1,
        quorum=1,
        batch="max_tx = 200\nmax_age_s = 0.3",
        extra="\n[rejects]\nsummary_every_s = 1\n",
    )
    gw = d.start_gateway()
    paused: list[bool] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            paused.append(gateway_status(gw).intake_paused)
            done.wait(0.2)

    def flood() -> None:
        with device(sandbox, d.broker.port, "flooder") as dev:
            dev.publish_many(("devices/flood-3/tx", p) for p in garbage(20_000, 4))

    watcher = threading.Thread(target=watch, daemon=True)
    flooder = threading.Thread(target=flood, daemon=True)
    watcher.start()
    flooder.start()
    good = [(f"devices/good-{i % 50}/tx", json.dumps({"seq": i}).encode()) for i in range(500)]
    t0 = time.monotonic()
    with device(sandbox, d.broker.port, "honest") as dev:
        for topic, payload in good:
            dev.publish(topic, payload)
            time.sleep(0.005)
    published = time.monotonic() - t0
    st = wait_drained(gw, 500, timeout=60)
    honest_done = time.monotonic() - t0
    flooder.join(180)
    assert not flooder.is_alive()
    done.set()
    watcher.join(10)
    print(f"\n500 honest messages stored {honest_done - published:.1f} s after the last was sent")
    assert st.transactions_stored == 500
    # The honest devices' transactions were stored while the flood was still arriving.
    assert honest_done - published < 10
    assert paused and not any(paused), "intake paused during the flood"
    wait_until("the flood counted", lambda: received(gw) >= 20_500, 120)
    assert reject_rows(gw) <= 100 + 0.1 * (time.monotonic() - t0) + 1 + 60
    assert gw.proc.terminate(30) == 0
    assert os.path.getsize(gw.spool) < 4 * 1024 * 1024
