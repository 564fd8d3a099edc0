"""Fault-injection fixtures: one fake engine process per test module (tests kill and restart
it); each module starts the gateway it needs in front of it (tests/faults/harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.harness import Engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    e = Engine(tmp_path_factory.mktemp("engine"))
    e.start()
    try:
        yield e
    finally:
        e.stop()
