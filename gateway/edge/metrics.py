"""Prometheus metrics of every stage, on one registry the service exposes."""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry(auto_describe=True)

received = Counter(
    "edge_gateway_received_total", "Payloads received", ["channel"], registry=REGISTRY
)
stored = Counter(
    "edge_gateway_stored_total",
    "Transactions committed to the spool",
    ["channel"],
    registry=REGISTRY,
)
duplicates = Counter(
    "edge_gateway_duplicates_total",
    "Payloads whose (device, seq) and content were already stored",
    ["channel"],
    registry=REGISTRY,
)
rejected = Counter(
    "edge_gateway_rejected_total",
    "Payloads rejected, by reason",
    ["channel", "reason"],
    registry=REGISTRY,
)
rejects_not_stored = Counter(
    "edge_gateway_rejects_not_stored_total",
    "Rejected payloads past their device's reject budget: counted (in rejected_total too) "
    "and acknowledged, not stored or dead-lettered one by one",
    ["channel"],
    registry=REGISTRY,
)
dead_letters_published = Counter(
    "edge_gateway_dead_letters_published_total",
    "Rejections published to the dead-letter topic",
    registry=REGISTRY,
)
group_commit_size = Histogram(
    "edge_gateway_group_commit_size",
    "Appends per spool transaction",
    buckets=(1, 4, 16, 64, 256, 1024, 4096),
    registry=REGISTRY,
)
batches_signed = Counter(
    "edge_gateway_batches_signed_total", "Batches cut and signed", registry=REGISTRY
)
batch_size = Histogram(
    "edge_gateway_batch_transactions",
    "Transactions per batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
    registry=REGISTRY,
)
sign_seconds = Histogram(
    "edge_gateway_hsm_sign_seconds",
    "HSM signing latency of a batch's checkpoint (one signature; two in a key rotation's overlap)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 1),
    registry=REGISTRY,
)
hsm_signatures = Counter(
    "edge_gateway_hsm_signatures_total",
    "Signatures the HSM made (PKCS#11 C_Sign calls that returned one)",
    registry=REGISTRY,
)
forward_seconds = Histogram(
    "edge_gateway_forward_seconds",
    "AddCheckpoint latency per node (a checkpoint and its leaves, to its cosignature)",
    ["node"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
    registry=REGISTRY,
)
forward_errors = Counter(
    "edge_gateway_forward_errors_total",
    "Failed GetHead and AddCheckpoint calls",
    ["node", "code"],
    registry=REGISTRY,
)
batches_committed = Counter(
    "edge_gateway_batches_committed_total",
    "Batches a checkpoint cosigned by the quorum committed",
    registry=REGISTRY,
)


class BulkHistogram:
    """A histogram observed a list of values at a time, exposed as prometheus-client's
    Histogram exposes one (the same series: _bucket{le}, _count, _sum, _created).
    Histogram.observe costs 1.5-2 µs a value (a lock and a bucket search in Python);
    the commit latency is observed for every transaction, 10,000 and more a second,
    where this sorts a batch's values once and counts each bucket with a bisection."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = tuple(float(b) for b in buckets)
        # The le label as Histogram writes it (prometheus_client.utils is untyped).
        self._le = [str(floatToGoString(b)) for b in self._bounds]  # type: ignore[no-untyped-call]
        self._cumulative = [0] * len(self._bounds)  # values <= each bound
        self._count = 0
        self._sum = 0.0
        self._created = time.time()
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: list[float]) -> None:
        if not values:
            return
        ordered = sorted(values)
        below = [bisect.bisect_right(ordered, b) for b in self._bounds]
        total = math.fsum(ordered)
        with self._lock:
            for i, n in enumerate(below):
                self._cumulative[i] += n
            self._count += len(ordered)
            self._sum += total

    def observe(self, value: float) -> None:
        self.observe_many([value])

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            cumulative, count, total = list(self._cumulative), self._count, self._sum
        m = HistogramMetricFamily(self.name, self.documentation)
        m.add_metric(
            [],
            [(le, n) for le, n in zip(self._le, cumulative, strict=True)] + [("+Inf", count)],
            total,
        )
        m.add_sample(f"{self.name}_created", {}, self._created)
        yield m


commit_latency = BulkHistogram(
    "edge_gateway_publish_to_commit_seconds",
    "Device time to quorum commit, per transaction",
    (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60),
    REGISTRY,
)
spool_depth = Gauge(
    "edge_gateway_spool_depth", "Transactions spooled, not yet batched", registry=REGISTRY
)
oldest_pending = Gauge(
    "edge_gateway_oldest_pending_seconds",
    "Age of the oldest transaction not yet batched",
    registry=REGISTRY,
)
last_signed_seq = Gauge("edge_gateway_last_signed_seq", "Last signed batch seq", registry=REGISTRY)
last_committed_seq = Gauge(
    "edge_gateway_last_committed_seq", "Last committed batch seq", registry=REGISTRY
)
intake_paused = Gauge("edge_gateway_intake_paused", "1 while intake is paused", registry=REGISTRY)
mqtt_connected = Gauge(
    "edge_gateway_mqtt_connected", "1 while connected to the broker", registry=REGISTRY
)
# Each node's state as one series per state (1 for the current one, 0 for the others),
# so an alert can say `state="forked"` rather than decode a number.
LEDGER_NODE_STATES = ("connecting", "ok", "resyncing", "unreachable", "refused", "forked")
ledger_node_state = Gauge(
    "edge_gateway_ledger_node_state",
    "1 for the ledger node's current state, 0 for the others",
    ["node", "state"],
    registry=REGISTRY,
)
ledger_nodes_ok = Gauge(
    "edge_gateway_ledger_nodes_ok", "Ledger nodes in state ok", registry=REGISTRY
)
forwarder_quorum = Gauge(
    "edge_gateway_forwarder_quorum",
    "Ledger nodes whose cosignatures of a checkpoint commit the batches it covers "
    "(forwarder.quorum)",
    registry=REGISTRY,
)
hsm_up = Gauge("edge_gateway_hsm_up", "1 while the HSM signer's state is ok", registry=REGISTRY)
build_info = Gauge(
    "edge_gateway_build_info",
    "Always 1; the gateway's version and Python version as labels",
    ["version", "python"],
    registry=REGISTRY,
)
receipts_published = Counter(
    "edge_gateway_receipts_published_total",
    "Device receipts the broker acknowledged (QoS 1) on devices' receipt topics",
    registry=REGISTRY,
)
receipts_pending = Gauge(
    "edge_gateway_receipts_pending",
    "Committed log entries the receipt publisher has not reached yet (receipts go out for "
    "those of profiles with [receipts] enabled)",
    registry=REGISTRY,
)
receipts_skipped = Counter(
    "edge_gateway_receipts_skipped_total",
    "Receipts not published, by reason (pruned: retention removed the transaction first; "
    "refused: the broker refused the publish; device_id: not usable in a topic)",
    ["reason"],
    registry=REGISTRY,
)
start_time = Gauge(
    "edge_gateway_start_time_seconds",
    "Unix time the gateway service started",
    registry=REGISTRY,
)


class BoxCollector:
    """The edge box and this process, read from psutil at scrape time.

    Each reading is skipped on its own when /proc hides it (the unit's sandbox
    may), so a scrape never fails for the box's sake.
    """

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        self.proc = psutil.Process()
        # cpu_percent() compares with the previous call; prime it so the first
        # scrape does not read 0.
        psutil.cpu_percent()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        readings: list[tuple[str, str, Callable[[], float]]] = [
            ("edge_gateway_box_cpu_percent", "CPU use of the box", lambda: psutil.cpu_percent()),
            (
                "edge_gateway_box_memory_percent",
                "Memory use of the box",
                lambda: psutil.virtual_memory().percent,
            ),
            (
                "edge_gateway_spool_disk_free_bytes",
                "Free bytes on the spool's filesystem",
                lambda: float(psutil.disk_usage(str(self.spool_dir)).free),
            ),
            (
                "edge_gateway_spool_disk_used_percent",
                "Use of the spool's filesystem",
                lambda: psutil.disk_usage(str(self.spool_dir)).percent,
            ),
            (
                "edge_gateway_process_rss_bytes",
                "Resident memory of the gateway process",
                lambda: float(self.proc.memory_info().rss),
            ),
            (
                "edge_gateway_process_open_fds",
                "Open file descriptors of the gateway process",
                lambda: float(self.proc.num_fds()),
            ),
            (
                "edge_gateway_process_threads",
                "Threads of the gateway process",
                lambda: float(self.proc.num_threads()),
            ),
        ]
        for name, doc, read in readings:
            try:
                value = read()
            except (OSError, psutil.Error):
                continue
            yield GaugeMetricFamily(name, doc, value=value)


def register_box_collector(spool_dir: Path) -> None:
    REGISTRY.register(BoxCollector(spool_dir))
