"""The commit-latency histogram is observed a batch at a time (metrics.BulkHistogram);
its exposition must be prometheus-client's Histogram's for the same values."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.edge import metrics
from gateway.edge.metrics import BulkHistogram

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60)


def samples(registry: CollectorRegistry) -> dict[str, float]:
    text = generate_latest(registry).decode()
    return {
        s.name + repr(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_same_series_as_prometheus_histogram() -> None:
    rng = random.Random(5)
    # Bucket bounds themselves (le is inclusive), zero, beyond the last bound, and noise.
    values = [rng.choice([0.0, 0.05, 0.1, 1.0, 60.0, 61.0, 0.3, 2.5]) for _ in range(1000)]
    values += [rng.random() * 70 for _ in range(1000)]
    ref_reg, bulk_reg = CollectorRegistry(), CollectorRegistry()
    ref = Histogram("x_seconds", "doc", buckets=BUCKETS, registry=ref_reg)
    bulk = BulkHistogram("x_seconds", "doc", BUCKETS, bulk_reg)
    for v in values:
        ref.observe(v)
    bulk.observe_many(values[:700])
    bulk.observe_many([])
    bulk.observe_many(values[700:1999])
    bulk.observe(values[1999])
    want, got = samples(ref_reg), samples(bulk_reg)
    assert want.keys() == got.keys()
    for k, v in want.items():
        assert abs(got[k] - v) <= 1e-9 * max(1.0, abs(v)), k
    assert got["x_seconds_count[]"] == 2000
    assert got["x_seconds_bucket[('le', '0.1')]"] == sum(1 for v in values if v <= 0.1)
    assert "x_seconds_created" in generate_latest(bulk_reg).decode()


def test_commit_latency_on_the_gateway_registry() -> None:
    before = samples(metrics.REGISTRY)["edge_gateway_publish_to_commit_seconds_count[]"]
    metrics.commit_latency.observe_many([0.2, 0.7])
    after = samples(metrics.REGISTRY)
    assert after["edge_gateway_publish_to_commit_seconds_count[]"] == before + 2
    assert "edge_gateway_publish_to_commit_seconds_bucket[('le', '+Inf')]" in after
