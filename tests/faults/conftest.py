"""Fault-injection fixtures: one fake engine process per test module (tests kill and restart
it) and one gateway process in front of it, started with the module's `gateway_env`
(tests/faults/harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.harness import Engine, Gateway, gateway


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    e = Engine(tmp_path_factory.mktemp("engine"))
    e.start()
    try:
        yield e
    finally:
        e.stop()


@pytest.fixture(scope="module")
def gateway_env() -> dict[str, str]:
    """Settings (environment variables) of the module's gateway; modules override it."""
    return {}


@pytest.fixture(scope="module")
def gw(
    engine: Engine, gateway_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with gateway(tmp_path_factory.mktemp("gw"), engine.url, gateway_env) as g:
        yield g


@pytest.fixture
def no_faults(engine: Engine) -> Iterator[None]:
    """The engine behaves during the test and after it."""
    engine.faults()
    yield
    engine.faults()
