"""The unit tests' gateway fixtures (config files, fake engine, bootstrapped registry), and the
fuzz run's closing line."""

from __future__ import annotations

import pytest

from tests.fuzz.tally import TALLY
from tests.unit.conftest import (  # noqa: F401  (fixtures: registered by being imported here)
    _clean_env,
    bootstrapped,
    config,
    engine,
    migrated_db,
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TALLY.requests:
        terminalreporter.write_line(TALLY.summary())
        if terminalreporter.config.option.verbose > 0:
            for line in TALLY.per_operation():
                terminalreporter.write_line(line)
