"""Parity tests: the table of every cell compared in this session, printed in the summary."""

from __future__ import annotations

TABLE: list = []
"""CellResults gathered by test_parity.py, in the order they were compared."""


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not TABLE:
        return
    from parity.harness import format_table

    terminalreporter.section("loss parity (largest deviation per cell)")
    for line in format_table(TABLE).splitlines():
        terminalreporter.write_line(line)
