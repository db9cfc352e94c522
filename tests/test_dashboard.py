"""The Grafana dashboard only charts metrics the gateway exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gateway.edge import metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "edge-gateway.json"
BOX = {
    "edge_gateway_box_cpu_percent",
    "edge_gateway_box_memory_percent",
    "edge_gateway_spool_disk_free_bytes",
    "edge_gateway_spool_disk_used_percent",
    "edge_gateway_process_rss_bytes",
    "edge_gateway_process_open_fds",
    "edge_gateway_process_threads",
}


def exported() -> set[str]:
    names = set(BOX)
    for family in metrics.REGISTRY.collect():
        # Labelled families have no samples until first used; derive their series names.
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


def test_every_dashboard_query_names_an_exported_metric() -> None:
    dash = json.loads(DASHBOARD.read_text())
    names = exported()
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\bedge_gateway_[a-z0-9_]+", target["expr"]):
                assert name in names, f"panel {panel['title']!r} charts unknown metric {name}"
                used.add(name)
    assert len(dash["panels"]) >= 12 and len(used) >= 20
