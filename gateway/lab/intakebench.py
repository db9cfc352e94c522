"""Microbenchmarks of the intake path's parts, in CPU time (user and system) per row or
payload, not wall time: what each stage costs whatever else shares the machine.

    python -m gateway.lab.intakebench spool [--prefill 200000] [--rows 60000] [--group 500]
    python -m gateway.lab.intakebench decode
    python -m gateway.lab.intakebench lookup [--prefill 1000000] [--lookups 2000]
    python -m gateway.lab.intakebench handoff [--rows 100000] [--read 64]

`spool` runs the group commit's statements (multi-row INSERT into tx, the device upsert,
COMMIT, as Spool._commit_appends does) on a spool file under /tmp prefilled with
`--prefill` rows of 1,000 devices: as shipped, where the main process also stores a
batch every `--batch` rows, which keys the rows in tx_key once spool.TX_KEY_CHUNK_ROWS
are waiting (as Spool.w_store_batch does; its cost is shown apart); with the index on
tx (tx_id) the intake maintained before; without the (device_id, device_seq) unique
index; without any. `decode` runs the json@1 decoder on load
generator payloads of 120 B, 1 KiB and 4 KiB. `lookup` builds a spool of `--prefill`
rows in batches of `--batch` (tx_key filled as Spool.w_store_batch fills it, then
spool.TX_KEY_CHUNK_ROWS + 500 rows batched but not keyed yet and 500 not batched), then
times GetTransaction's spool work (the API's proof view: the lookup, the batch, its
tx_ids, the inclusion proof) for keyed rows, for rows in the tail and for unknown tx_ids
(a full tail scan), wall time on one reader connection.
`handoff` is the intake process without its socket: a real MqttIngest is handed the
PUBLISH packets of `--read` messages at a time as its bulk read path hands them over
(json@1 payloads of the load generator, 1,000 devices), decodes them, hands them to a
real Spool's writer thread, whose group commits answer them and queue their PUBACKs
(counted, not sent); CPU µs per transaction of the whole process, in which MQTT parsing
and the socket are all that is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gateway.common import gctune
from gateway.edge import spool as spoolmod
from gateway.edge.config import SpoolConfig
from gateway.edge.profiles.builtin import JsonDecoder
from gateway.lab.loadgen import build_payload, payload_head, payload_tail, sample_payload

DEVICES = 1000
SHIPPED = "as shipped (Spool, tx_dev)"
UNIQUE = "before: unique index (device_id, device_seq)"
VARIANTS = (SHIPPED, UNIQUE, "no check of (device_id, device_seq)")


def _schema(variant: str) -> tuple[str, str]:
    schema = spoolmod.SCHEMA + spoolmod.TX_KEY_SCHEMA
    if variant != UNIQUE:
        return schema, ""
    tx_end = "    received_ms INTEGER NOT NULL\n);\nCREATE TABLE IF NOT EXISTS device"
    assert tx_end in schema
    schema = schema.replace(
        tx_end,
        "    received_ms INTEGER NOT NULL,\n    UNIQUE (device_id, device_seq)\n);\n"
        "CREATE TABLE IF NOT EXISTS device",
    )
    return schema, " ON CONFLICT (device_id, device_seq) DO NOTHING"


class _Shipped:
    """The group commit as the intake runs it: Spool._commit_appends on a real Spool's
    writer connection (its writer thread idle), items as intake hands them over."""

    def __init__(self, path: Path) -> None:
        self.spool = spoolmod.Spool(SpoolConfig(path, 2000, 0, 10**9, 0, 600, 0), "intakebench")
        self.spool.open(check_integrity=False)
        conn = self.spool._wconn
        assert conn is not None
        self.conn: sqlite3.Connection = conn

    def commit(self, group: list[tuple[object, ...]]) -> None:
        def done(res: object) -> None:
            if isinstance(res, BaseException):
                raise res

        items = [
            (spoolmod.Incoming(r[0], r[1], r[2], r[3], r[4], r[6]), done)  # type: ignore[arg-type]
            for r in group
        ]
        self.spool._commit_appends(self.conn, items)()

    def close(self) -> None:
        self.spool.close(checkpoint=False)


def _key(conn: sqlite3.Connection, last: int) -> None:
    """What Spool.w_store_batch adds for a batch ending at rowid `last`: keying the rows
    before it once they are spool.TX_KEY_CHUNK_ROWS (in its own transaction here)."""
    conn.execute("BEGIN IMMEDIATE")
    spoolmod._key_rows(conn, last)
    conn.execute("COMMIT")


def _rows(start: int, n: int) -> list[tuple[object, ...]]:
    return [
        (
            f"dev-{i % DEVICES:05d}",
            i // DEVICES,
            hashlib.sha256(i.to_bytes(8, "big")).digest(),
            hashlib.sha256(b"\x00" + i.to_bytes(8, "big")).digest(),
            b"L" * 190,
            190,
            1_700_000_000_000 + i,
        )
        for i in range(start, start + n)
    ]


def _commit(conn: sqlite3.Connection, conflict: str, group: list[tuple[object, ...]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    spoolmod.insert_rows(
        conn,
        "INSERT INTO tx (device_id, device_seq, payload_sha256, tx_id, leaf, size, received_ms)"
        " VALUES ",
        conflict,
        group,
    )
    devices = {r[0]: (r[1], r[6]) for r in group}
    spoolmod.insert_rows(
        conn,
        "INSERT INTO device (device_id, last_seq, last_seen_ms) VALUES ",
        " ON CONFLICT (device_id) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq),"
        " last_seen_ms = excluded.last_seen_ms",
        [(d, s, t) for d, (s, t) in devices.items()],
    )
    conn.execute("COMMIT")


def spool_variant(
    variant: str, prefill: int, rows: int, group: int, batch: int
) -> tuple[float, float, float, float]:
    """CPU µs per row (user, system) of `rows` rows in groups of `group` after `prefill`,
    and (user, system) of keying them in tx_key every `batch` rows (as shipped only)."""
    keyed = variant == SHIPPED
    with tempfile.TemporaryDirectory(prefix="intakebench-") as tmp:
        shipped = _Shipped(Path(tmp) / "spool.db") if keyed else None
        conn: sqlite3.Connection
        commit: Callable[[sqlite3.Connection, str, list[tuple[object, ...]]], None]
        if shipped is not None:
            conn, conflict = shipped.conn, ""

            def commit(_conn: sqlite3.Connection, _c: str, g: list[tuple[object, ...]]) -> None:
                assert shipped is not None
                shipped.commit(g)

        else:
            conn = spoolmod._connect(Path(tmp) / "spool.db")
            schema, conflict = _schema(variant)
            conn.executescript(schema)
            commit = _commit
        step = 50_000
        done = 0
        for k in range(0, prefill, step):
            data = _rows(k, min(step, prefill - k))
            for g in range(0, len(data), group):
                commit(conn, conflict, data[g : g + group])
            while keyed and done + batch <= k + len(data):
                _key(conn, done + batch)
                done += batch
        data = _rows(prefill, rows)
        intake = [0.0, 0.0]
        main = [0.0, 0.0]
        for g in range(0, len(data), group):
            t0 = os.times()
            commit(conn, conflict, data[g : g + group])
            t1 = os.times()
            intake[0] += t1.user - t0.user
            intake[1] += t1.system - t0.system
            while keyed and done + batch <= prefill + g + group:
                _key(conn, done + batch)
                done += batch
            t2 = os.times()
            main[0] += t2.user - t1.user
            main[1] += t2.system - t1.system
        if shipped is not None:
            shipped.close()
        else:
            conn.close()
    return (
        intake[0] / rows * 1e6,
        intake[1] / rows * 1e6,
        main[0] / rows * 1e6,
        main[1] / rows * 1e6,
    )


def lookup_latency(prefill: int, lookups: int, batch: int) -> dict[str, list[float]]:
    """GetTransaction's spool work in ms, by where the row is (see the module's doc)."""
    from gateway.edge.api import _proof_view

    tail_batched = spoolmod.TX_KEY_CHUNK_ROWS + 500
    total = prefill + tail_batched + 500
    with tempfile.TemporaryDirectory(prefix="intakebench-") as tmp:
        path = Path(tmp) / "spool.db"
        conn = spoolmod._connect(path)
        conn.executescript(spoolmod.SCHEMA + spoolmod.TX_KEY_SCHEMA)
        conflict = " ON CONFLICT (device_id, device_seq) DO NOTHING"
        seq = 0
        step = 50_000
        for k in range(0, total, step):
            data = _rows(k, min(step, total - k))
            for g in range(0, len(data), 5000):
                _commit(conn, conflict, data[g : g + 5000])
            last = k + len(data)
            while (seq + 1) * batch <= min(last, prefill + tail_batched):
                first, last_rowid = seq * batch + 1, (seq + 1) * batch
                b = spoolmod.StoredCheckpoint(
                    last_rowid, seq, first - 1, first, last_rowid, bytes(32), b"", 0, 1
                )
                conn.execute("BEGIN IMMEDIATE")
                spoolmod.Spool.w_store_checkpoint(conn, b, [])
                conn.execute("COMMIT")
                seq += 1
        conn.close()
        reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        reader.execute(f"PRAGMA cache_size=-{spoolmod.READER_CACHE_KIB}")
        rng = random.Random(7)
        keyed = reader.execute("SELECT value FROM meta WHERE key = 'tx_keyed_upto'").fetchone()
        upto = int(keyed[0])

        def tx_id(i: int) -> bytes:
            return hashlib.sha256(b"\x00" + i.to_bytes(8, "big")).digest()

        kinds = {
            "keyed (batched)": [tx_id(rng.randrange(upto)) for _ in range(lookups)],
            "tail, batched": [tx_id(rng.randrange(upto, seq * batch)) for _ in range(lookups)],
            "tail, not batched": [tx_id(rng.randrange(seq * batch, total)) for _ in range(lookups)],
            "unknown tx_id": [
                hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(lookups)
            ],
        }
        out: dict[str, list[float]] = {}
        for kind, ids in kinds.items():
            times = []
            for t in ids:
                t0 = time.perf_counter()
                view = _proof_view(reader, t)
                times.append((time.perf_counter() - t0) * 1000)
                if (view is None) != (kind == "unknown tx_id"):
                    raise SystemExit(f"lookup of a {kind} row answered {view!r}")
            out[kind] = sorted(times)
        reader.close()
    return out


def decode_cost(size: int, n: int = 20_000) -> float:
    dec = JsonDecoder("gw-bench", 64 * 1024)
    payloads = [sample_payload(size, seq=1_000 + i) for i in range(2_000)]
    now = time.time_ns() // 1_000_000
    t0 = time.process_time()
    done = 0
    while done < n:
        for p in payloads:
            dec.decode("dev-00001", "devices/dev-00001/tx", p, now, "mqtt")
        done += len(payloads)
    return (time.process_time() - t0) / done * 1e6


class _PubackCounter:
    """What MqttIngest queues its PUBACKs on (paho's _packet_queue), counting them."""

    def __init__(self) -> None:
        self.acked = 0
        self.cond = threading.Condition()

    def _packet_queue(self, _command: int, packet: bytes, _mid: int, _qos: int) -> None:
        with self.cond:
            self.acked += len(packet) // 4
            self.cond.notify_all()

    def wait_for(self, acked: int, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.acked >= acked, timeout=timeout):
                raise SystemExit(f"handoff: {self.acked} acknowledged, {acked} awaited")

    def ack(self, _mid: int, _qos: int) -> None:
        with self.cond:
            self.acked += 1
            self.cond.notify_all()


def handoff_cost(rows: int, read: int, inflight: int = 4000) -> tuple[float, float, float]:
    """(CPU µs per transaction, user share, transactions per wall second) of `rows`
    messages through MqttIngest._on_publishes, the decoder and the spool writer."""
    from gateway.edge.ingest import MqttIngest
    from gateway.edge.profiles import ProfileSet
    from gateway.lab.sandbox import loopback_mqtt_config

    cfg = loopback_mqtt_config(1, "intakebench", receive_maximum=inflight)
    now = time.time_ns() // 1_000_000
    seqs = [rows // DEVICES + 10 for _ in range(DEVICES)]
    rng = random.Random(1)
    tails = [payload_tail(rng, 120, len(payload_head(10**9))) for _ in range(64)]
    publishes: list[tuple[str, bytes, int, int]] = []
    for i in range(rows):
        d = i % DEVICES
        seqs[d] += 1
        payload = build_payload(seqs[d], now, tails[i % len(tails)])
        publishes.append((f"devices/bench-{d:05d}/tx", payload, 0, 1))
    with tempfile.TemporaryDirectory(prefix="intakebench-") as tmp:
        spool = spoolmod.Spool(
            SpoolConfig(Path(tmp) / "spool.db", 2000, 2, 10**9, 0, 600, 0), "intakebench"
        )
        spool.open(check_integrity=False)
        ing = MqttIngest(cfg, spool, ProfileSet.load(None, gateway_id="intakebench"))
        sink = _PubackCounter()
        ing._client = sink  # type: ignore[assignment]
        gctune.settle_heap()  # as the intake process does once started
        try:
            t0, c0 = time.perf_counter(), os.times()
            mid = 0
            for k in range(0, rows, read):
                chunk = []
                for topic, payload, _m, qos in publishes[k : k + read]:
                    mid = mid % 65535 + 1
                    chunk.append((topic, payload, mid, qos))
                sink.wait_for(k - inflight + 1, 30.0)
                ing._on_publishes(chunk)
            sink.wait_for(rows, 60.0)
            c1, wall = os.times(), time.perf_counter() - t0
        finally:
            spool.close(checkpoint=False)
        if spool.stored != rows:
            raise SystemExit(f"handoff: {spool.stored} of {rows} stored")
    user, system = c1.user - c0.user, c1.system - c0.system
    return (user + system) / rows * 1e6, user / (user + system), rows / wall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m gateway.lab.intakebench")
    ap.add_argument("what", choices=("spool", "decode", "lookup", "handoff"))
    ap.add_argument("--read", type=int, default=64, help="handoff: messages per socket read")
    ap.add_argument("--prefill", type=int, help="rows before (default 200000; lookup 1000000)")
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--group", type=int, default=500)
    ap.add_argument("--batch", type=int, default=500, help="rows per batch (batch.max_tx)")
    args = ap.parse_args(argv)
    if args.what == "lookup":
        prefill = args.prefill or 1_000_000
        print(
            f"GetTransaction's spool work at {prefill} rows, batches of {args.batch},"
            f" {args.lookups} lookups each; ms"
        )
        for kind, t in lookup_latency(prefill, args.lookups, args.batch).items():
            p50, p99 = t[len(t) // 2], t[min(len(t) - 1, int(len(t) * 0.99))]
            print(f"  {kind:20s} p50 {p50:6.2f}  p99 {p99:6.2f}  max {t[-1]:6.2f}")
        return
    if args.what == "handoff":
        rows = args.rows if args.rows != 60_000 else 100_000
        cpu, user_share, rate = handoff_cost(rows, args.read)
        print(
            f"MqttIngest -> json@1 -> spool writer -> PUBACKs queued, {rows} messages, "
            f"{args.read} a read: {cpu:.1f} µs CPU per transaction (user {user_share:.0%}), "
            f"{rate:,.0f} tx/s on the wall"
        )
        return
    args.prefill = args.prefill or 200_000
    if args.what == "spool":
        print(
            f"group commit of {args.group} rows, {DEVICES} devices, after {args.prefill} rows;"
            f" batches of {args.batch}, keyed by {spoolmod.TX_KEY_CHUNK_ROWS}; CPU µs per row"
        )
        for v in VARIANTS:
            user, system, kuser, ksys = spool_variant(
                v, args.prefill, args.rows, args.group, args.batch
            )
            print(f"  {v:42s} {user + system:6.1f}  (user {user:.1f}, system {system:.1f})")
            if v == SHIPPED:
                print(
                    f"  {'  + tx_key fill (main process)':42s} {kuser + ksys:6.1f}"
                    f"  (user {kuser:.1f}, system {ksys:.1f})"
                )
    else:
        for size in (120, 1024, 4096):
            print(f"  json@1 decode, {size} B payload: {decode_cost(size):.2f} µs CPU")


if __name__ == "__main__":
    main()
