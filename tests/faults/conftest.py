"""Fault scenarios run on the real components; `make faults` ends with their figures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.lab.sandbox import Sandbox
from tests.faults import harness

FAULT_BATCH = "max_tx = 500\nmax_age_s = 0.5"


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    sb = Sandbox(tmp_path / "sb")
    try:
        yield sb
    finally:
        sb.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if harness.ROWS:
        terminalreporter.write_sep(
            "=", "fault scenarios: nothing acknowledged lost, nothing applied twice"
        )
        terminalreporter.write_line(harness.table())
