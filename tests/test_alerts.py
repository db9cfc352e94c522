"""The Prometheus alert rules in alerts/: valid, unit-tested with promtool, and only about
metrics the gateway exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "alerts"
RULES = ALERTS / "edge-gateway.rules.yml"
RULE_TESTS = ALERTS / "edge-gateway.rules.test.yml"
METRICS_SOURCE = ROOT / "gateway" / "edge" / "metrics.py"
TIMEOUT_S = 120

# Metric names the rules may use besides those spelled out in gateway/edge/metrics.py.
NEW_METRICS = {
    "edge_gateway_ledger_node_state",
    "edge_gateway_ledger_nodes_ok",
    "edge_gateway_forwarder_quorum",
    "edge_gateway_hsm_up",
    "edge_gateway_build_info",
    "edge_gateway_start_time_seconds",
}
# The alerts operators are promised; each needs a firing and a quiet case in RULE_TESTS.
ALERT_NAMES = {
    "QuorumLost",
    "LedgerNodeForked",
    "LedgerNodeDown",
    "IntakePaused",
    "OldestPendingAge",
    "SpoolDiskLow",
    "HsmDown",
    "GatewayRestarting",
    "WatchdogRestarts",
    "GatewayDown",
    "MqttDisconnected",
}
_SERIES_SUFFIXES = ("_bucket", "_count", "_sum", "_created")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: install the Debian package prometheus "
            "(scripts/install-system-deps does, without leaving its server running)"
        )
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args],
        cwd=ALERTS,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def rule_blocks(text: str) -> dict[str, list[str]]:
    """Alert name -> the text of each rule with that name (a name may have one rule per
    severity)."""
    blocks: dict[str, list[str]] = {}
    parts = re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]
    for part in parts:
        name, _, body = part.partition("\n")
        blocks.setdefault(name.strip(), []).append(body)
    return blocks


def unknown_metric_names(rules_text: str, metrics_source: str) -> set[str]:
    """edge_gateway_* names in the rules that neither the metrics module spells out
    (as a whole name, or the base of a histogram's series) nor NEW_METRICS lists."""
    known = set(re.findall(r'"(edge_gateway_[a-z0-9_]+)"', metrics_source)) | NEW_METRICS
    unknown = set()
    for name in set(re.findall(r"\bedge_gateway_[a-z0-9_]+", rules_text)):
        base = name
        for suffix in _SERIES_SUFFIXES:
            base = base.removesuffix(suffix)
        if name not in known and base not in known:
            unknown.add(name)
    return unknown


def test_promtool_checks_the_rules() -> None:
    proc = run_promtool("check", "rules", RULES.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_pass() -> None:
    proc = run_promtool("test", "rules", RULE_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    # Guards the test above: the same unit tests against a quorum rule that fires
    # at the quorum itself must fail.
    rules = RULES.read_text()
    wrong = "edge_gateway_ledger_nodes_ok <= edge_gateway_forwarder_quorum"
    changed = rules.replace("edge_gateway_ledger_nodes_ok < edge_gateway_forwarder_quorum", wrong)
    assert wrong in changed
    (tmp_path / RULES.name).write_text(changed)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    proc = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode != 0
    assert "QuorumLost" in proc.stdout + proc.stderr


def test_missing_promtool_fails_with_the_package_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(pytest.fail.Exception, match="install the Debian package prometheus"):
        promtool()


def test_every_promised_alert_has_severity_summary_and_runbook() -> None:
    blocks = rule_blocks(RULES.read_text())
    assert set(blocks) == ALERT_NAMES
    for name, bodies in blocks.items():
        for body in bodies:
            assert re.search(r"^\s+severity: (critical|warning)$", body, re.MULTILINE), name
            assert re.search(r"^\s+summary: \S", body, re.MULTILINE), name
            description = re.search(r"^\s+description: >-\n((?:\s{12}.*\n?)+)", body, re.MULTILINE)
            assert description is not None, name
            # A runbook, not a restatement of the expression.
            assert len(description.group(1).split()) >= 40, name


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = RULE_TESTS.read_text()
    cases = re.split(r"^\s*- alertname: ", tests, flags=re.MULTILINE)[1:]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        name, _, body = case.partition("\n")
        body = re.split(r"^\s*- (?:interval|alertname):", body, flags=re.MULTILINE)[0]
        if re.search(r"exp_alerts: \[\]", body):
            quiet.add(name.strip())
        elif "exp_labels:" in body:
            firing.add(name.strip())
    assert firing == ALERT_NAMES, ALERT_NAMES - firing
    assert quiet == ALERT_NAMES, ALERT_NAMES - quiet


def test_rules_use_only_metrics_the_gateway_exports() -> None:
    rules = RULES.read_text()
    assert unknown_metric_names(rules, METRICS_SOURCE.read_text()) == set()
    # Every name the rules rely on is really there, new ones included.
    used = set(re.findall(r"\bedge_gateway_[a-z0-9_]+", rules))
    assert {
        "edge_gateway_ledger_node_state",
        "edge_gateway_ledger_nodes_ok",
        "edge_gateway_forwarder_quorum",
        "edge_gateway_hsm_up",
        "edge_gateway_start_time_seconds",
        "edge_gateway_intake_paused",
        "edge_gateway_oldest_pending_seconds",
        "edge_gateway_spool_disk_free_bytes",
        "edge_gateway_spool_disk_used_percent",
        "edge_gateway_mqtt_connected",
    } <= used


def test_a_renamed_metric_is_caught() -> None:
    rules = RULES.read_text().replace("edge_gateway_intake_paused", "edge_gateway_intake_halted")
    source = METRICS_SOURCE.read_text()
    assert unknown_metric_names(rules, source) == {"edge_gateway_intake_halted"}
    source = source.replace('"edge_gateway_mqtt_connected"', '"edge_gateway_mqtt_up"')
    assert "edge_gateway_mqtt_connected" in unknown_metric_names(RULES.read_text(), source)
