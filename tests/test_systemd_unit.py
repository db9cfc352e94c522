"""The shipped systemd units: sandbox exposure, a clean `systemd-analyze verify`, and
the directives the gateway's lifecycle relies on.

`systemd-analyze verify` checks that ExecStart's binary exists. On a development
machine /opt/edge-gateway/bin/edge-gateway usually does not, so verify runs on a copy
of the unit in which only that executable path is replaced by a stub script; every
other line is verified as shipped. The untouched unit is verified too, and there the
missing binary is the one message allowed. A template unit is checked as systemd loads
it: as one of its instances.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.common.errors import (
    EXIT_CERTIFICATE,
    EXIT_CONFIG,
    EXIT_DATAERR,
    EXIT_NOPERM,
    EXIT_USAGE,
)

UNITS_DIR = Path(__file__).resolve().parent.parent / "systemd"
GATEWAY_UNIT = UNITS_DIR / "edge-gateway.service"
LEDGER_UNIT = UNITS_DIR / "edge-ledger-node.service"
# Several reference ledger nodes on one box; checked as systemd loads it, as an instance.
LEDGER_TEMPLATE = UNITS_DIR / "edge-ledger-node@.service"
TEMPLATE_INSTANCE = "ledger-1"
ALL_UNITS = [GATEWAY_UNIT, LEDGER_UNIT, LEDGER_TEMPLATE]
INSTALLED_BINARY = "/opt/edge-gateway/bin/edge-gateway"
MAX_EXPOSURE = 2.0
TIMEOUT_S = 60

_EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)")


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze not found: install the Debian package `systemd` "
            "(apt-get install systemd) to check the units"
        )
    return path


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", SYSTEMD_LOG_COLOR="0")
    return subprocess.run(
        [systemd_analyze(), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        check=False,
    )


def exposure(unit: Path) -> float:
    proc = run_analyze("security", "--offline=true", "--no-pager", str(unit))
    assert proc.returncode == 0, proc.stderr
    m = _EXPOSURE.search(proc.stdout)
    assert m is not None, f"no exposure figure in:\n{proc.stdout}\n{proc.stderr}"
    assert m.group(1) == unit.name
    return float(m.group(2))


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    # --recursive-errors=no: judge this unit, not whatever else the host has installed.
    return run_analyze("verify", "--recursive-errors=no", "--man=no", "--generators=no", str(unit))


def loaded_name(unit: Path) -> str:
    """The unit name systemd loads the file as: a template as one of its instances."""
    prefix, at, suffix = unit.name.partition("@.")
    return f"{prefix}@{TEMPLATE_INSTANCE}.{suffix}" if at else unit.name


def as_loaded(unit: Path, tmp_path: Path) -> Path:
    """The unit itself, or for a template an unchanged copy named as an instance."""
    if loaded_name(unit) == unit.name:
        return unit
    copy = tmp_path / loaded_name(unit)
    copy.write_text(unit.read_text())
    return copy


def with_stub_binary(unit: Path, tmp_path: Path) -> Path:
    stub = tmp_path / "edge-gateway"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = unit.read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    copy = tmp_path / loaded_name(unit)  # verify names the unit after the file
    copy.write_text(text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={stub} "))
    return copy


def directives(unit: Path) -> dict[str, list[str]]:
    """Service-section assignments, repeated keys kept in order."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        if section == "[Service]":
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("unit", ALL_UNITS, ids=lambda u: u.name)
def test_sandbox_exposure_is_at_most_2(
    unit: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    level = exposure(as_loaded(unit, tmp_path))
    record_property("exposure", level)
    print(f"{unit.name}: overall exposure {level}")
    assert level <= MAX_EXPOSURE


@pytest.mark.parametrize("unit", ALL_UNITS, ids=lambda u: u.name)
def test_verify_is_clean_with_the_binary_present(unit: Path, tmp_path: Path) -> None:
    proc = verify(with_stub_binary(unit, tmp_path))
    assert proc.stderr == ""
    assert proc.returncode == 0


@pytest.mark.parametrize("unit", ALL_UNITS, ids=lambda u: u.name)
def test_verify_as_shipped_only_misses_the_installed_binary(unit: Path, tmp_path: Path) -> None:
    proc = verify(as_loaded(unit, tmp_path))
    lines = proc.stderr.splitlines()
    if not os.access(INSTALLED_BINARY, os.X_OK):
        expected = f"{loaded_name(unit)}: Command {INSTALLED_BINARY} is not executable"
        lines = [ln for ln in lines if not ln.startswith(expected)]
    assert lines == []


def test_missing_systemd_analyze_fails_with_the_package_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(pytest.fail.Exception, match="install the Debian package `systemd`"):
        systemd_analyze()


def test_verify_catches_a_misspelt_directive(tmp_path: Path) -> None:
    # Guards the two tests above against passing because verify checks nothing.
    copy = with_stub_binary(GATEWAY_UNIT, tmp_path)
    copy.write_text(copy.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHom=yes"))
    proc = verify(copy)
    assert "Unknown key 'ProtectHom'" in proc.stderr


def test_gateway_unit_matches_the_lifecycle() -> None:
    d = directives(GATEWAY_UNIT)
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] == ["30"]
    assert d["ExecStart"] == [f"{INSTALLED_BINARY} run --config /etc/edge-gateway/gateway.toml"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["LoadCredential"] == ["hsm-pin:/etc/edge-gateway/hsm-pin"]
    assert d["StateDirectory"] == ["edge-gateway"]
    assert "DynamicUser" not in d


@pytest.mark.parametrize(
    ("unit", "codes"),
    [
        pytest.param(
            GATEWAY_UNIT,
            {EXIT_USAGE, EXIT_DATAERR, EXIT_NOPERM, EXIT_CONFIG, EXIT_CERTIFICATE},
            id=GATEWAY_UNIT.name,
        ),
        pytest.param(
            LEDGER_UNIT,
            {EXIT_USAGE, EXIT_DATAERR, EXIT_CONFIG, EXIT_CERTIFICATE},
            id=LEDGER_UNIT.name,
        ),
        pytest.param(
            LEDGER_TEMPLATE,
            {EXIT_USAGE, EXIT_DATAERR, EXIT_CONFIG, EXIT_CERTIFICATE},
            id=LEDGER_TEMPLATE.name,
        ),
    ],
)
def test_operator_exit_codes_are_not_restarted(unit: Path, codes: set[int]) -> None:
    d = directives(unit)
    assert d["Restart"] == ["on-failure"]
    assert {int(c) for c in d["RestartPreventExitStatus"][0].split()} == codes


@pytest.mark.parametrize("unit", ALL_UNITS, ids=lambda u: u.name)
def test_no_capabilities_and_no_new_privileges(unit: Path) -> None:
    d = directives(unit)
    assert d["CapabilityBoundingSet"] == [""]
    assert d["AmbientCapabilities"] == [""]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["UMask"] == ["0077"]
    assert d["StateDirectoryMode"] == ["0700"]


def test_ledger_template_has_the_single_node_units_sandbox() -> None:
    # Only where an instance lives differs: its config file and its state directory.
    single, template = directives(LEDGER_UNIT), directives(LEDGER_TEMPLATE)
    differ = {"ExecStart", "StateDirectory"}
    assert {k: v for k, v in template.items() if k not in differ} == {
        k: v for k, v in single.items() if k not in differ
    }
    assert template["ExecStart"] == [
        f"{INSTALLED_BINARY} ledger-node --config /etc/edge-ledger/%i.toml"
    ]
    assert template["StateDirectory"] == ["edge-ledger/%i"]
    assert template["StateDirectoryMode"] == ["0700"]
