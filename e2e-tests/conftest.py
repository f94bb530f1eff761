"""
pytest set-up of the end-to-end suite (run it with run.sh): the C{report} fixture, whose
lines are printed after the results, passed or failed, where pytest -q would hide a print.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

_REPORT = pytest.StashKey[list[str]]()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Call with a line of text to show in the "e2e report" section at the end of the run."""
    lines = request.config.stash.setdefault(_REPORT, [])
    name = request.node.name
    return lambda text: lines.append(f"{name}: {text}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    lines = config.stash.get(_REPORT, [])
    if lines:
        terminalreporter.section("e2e report")
        for line in lines:
            terminalreporter.write_line(line)
