"""What device receipts cost the gateway's main process, per receipt, measured on the
receipt stage's own code: reading them from the spool (`load_chunk`: the leaf, an
inclusion proof from the stored tiles, the committed checkpoint's signatures, the binary
encoding) and publishing them QoS 1 to a real Mosquitto until the broker acknowledged
every one (`ReceiptPublisher._publish`, paho's network thread included).

The log comes from a demo run (SoftHSM-signed checkpoints cosigned by three ledger
nodes); here every transaction in it gets a receipt, as if every profile opted in.

    python -m gateway.lab.receiptcost [--seconds 8]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gateway.edge.ingest import make_client
from gateway.edge.profiles.spec import ReceiptSpec
from gateway.edge.receipts import ReceiptPublisher, load_chunk
from gateway.lab import demo
from gateway.lab.sandbox import Sandbox, loopback_mqtt_config

SPEC = ReceiptSpec("receipts/{device}")


class EveryProfile(dict[str, ReceiptSpec]):
    """Receipt specs that opt every profile in."""

    def get(self, _key: str, _default: object = None) -> ReceiptSpec:
        return SPEC


def measure(spool: Path, mqtt_port: int) -> dict[str, float]:
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        conn.execute("BEGIN")
        specs = EveryProfile()
        chunks = []
        mark = 0
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(1_000_000):  # bounded: one chunk per turn, as the stage reads them
            chunk = load_chunk(conn, mark, specs)
            if chunk is None:
                break
            chunks.append(chunk.receipts)
            mark = chunk.end
        read_cpu, read_wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        conn.close()
    receipts = [r for ch in chunks for r in ch]
    if not receipts:
        raise SystemExit("no committed transactions in the demo's spool")
    cfg = loopback_mqtt_config(mqtt_port, "receipt-cost", topics=(), receive_maximum=100)
    pub = ReceiptPublisher(cfg, None, dict, make_client)  # type: ignore[arg-type]
    pub._start_client()
    deadline = time.monotonic() + 20
    while not pub.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    if not pub.connected:
        raise SystemExit(f"no MQTT connection to 127.0.0.1:{mqtt_port}")
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        acked = 0
        for ch in chunks:
            if ch:
                done = pub._publish(ch)
                if done is None:
                    raise SystemExit("the broker did not acknowledge a chunk")
                acked += done[0]
        pub_cpu, pub_wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        pub.close()
    sizes = [len(r.payload) for r in receipts]
    n = len(receipts)
    return {
        "receipts": n,
        "acknowledged": acked,
        "log_size": mark,
        "read_cpu_us": read_cpu / n * 1e6,
        "read_wall_s": read_wall,
        "publish_cpu_us": pub_cpu / n * 1e6,
        "publish_wall_s": pub_wall,
        "publish_per_s": n / pub_wall,
        "size_median": statistics.median(sizes),
        "size_max": max(sizes),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway.lab.receiptcost", description=__doc__)
    p.add_argument("--seconds", type=float, default=8.0, help="length of the demo's load")
    a = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="edge-gateway-receiptcost-"))
    try:
        print(f"a demo run of {a.seconds:g} s for a cosigned log ...", file=sys.stderr)
        demo.run_demo(root / "demo", a.seconds, 200, 1000.0, quiet=True, rotate=False)
        spool = next((root / "demo").rglob("spool.db"))
        sb = Sandbox(root / "broker", tls=False)
        try:
            broker = sb.mosquitto()
            m = measure(spool, broker.port)
        finally:
            sb.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"receipts for a log of {m['log_size']:,.0f} leaves: {m['receipts']:,.0f} built, "
        f"{m['acknowledged']:,.0f} acknowledged by Mosquitto (QoS 1)\n"
        f"  read from the spool (leaf, proof from tiles, signatures, encoding): "
        f"{m['read_cpu_us']:.1f} µs CPU per receipt\n"
        f"  published until acknowledged (paho, its network thread):          "
        f"{m['publish_cpu_us']:.1f} µs CPU per receipt, {m['publish_per_s']:,.0f} receipts/s\n"
        f"  receipt size: median {m['size_median']:.0f} B, largest {m['size_max']:.0f} B"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
