"""Fault scenarios run on the real components; `make faults` ends with their figures. The
`sandbox` fixture is tests/conftest.py's."""

from __future__ import annotations

import pytest

from tests.faults import harness

FAULT_BATCH = "max_tx = 500\nmax_age_s = 0.5"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if harness.ROWS:
        terminalreporter.write_sep(
            "=", "fault scenarios: nothing acknowledged lost, nothing applied twice"
        )
        terminalreporter.write_line(harness.table())
