"""A registry whose database is away raises `RegistryUnavailable` (503), keeps its snapshot,
and works again by itself once the database is back; errors that are not about reaching the
database pass through unchanged. The real-process version is tests/faults."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from adapters.registry import (
    SYSTEM,
    Registry,
    RegistryUnavailable,
    TenantExists,
    TenantRecord,
)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    reg = await Registry.open(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    try:
        yield reg
    finally:
        await reg.close()


def tenant(name: str) -> TenantRecord:
    return TenantRecord(name, ("0" * 64,), frozenset())


async def test_database_away_is_a_503_and_recovers(registry: Registry) -> None:
    await registry.put_tenant(tenant("before"), SYSTEM)
    snapshot = registry.snapshot
    working = registry._engine
    away = create_async_engine(f"postgresql+asyncpg://x@127.0.0.1:{closed_port()}/db")
    registry._engine = away  # as if the database host stopped answering
    try:
        for attempt in (
            registry.generation(),
            registry.refresh_if_changed(),
            registry.audit_entries(),
            registry.put_tenant(tenant("during"), SYSTEM),
        ):
            with pytest.raises(RegistryUnavailable) as err:
                await attempt
            assert err.value.status == 503
            assert err.value.error_code == "registry_unavailable"
            assert err.value.headers == {"Retry-After": "5"}
        assert registry.snapshot is snapshot  # serving keeps the last snapshot
        assert registry.unavailable_since is not None
    finally:
        registry._engine = working
        await away.dispose()
    await registry.put_tenant(tenant("after"), SYSTEM)
    assert registry.unavailable_since is None
    assert {"before", "after"} <= set(registry.snapshot.tenants)
    assert "during" not in registry.snapshot.tenants


async def test_other_errors_pass_through(registry: Registry) -> None:
    await registry.put_tenant(tenant("dup"), SYSTEM)
    with pytest.raises(TenantExists):
        await registry.put_tenant(tenant("dup"), SYSTEM, create=True)
    assert registry.unavailable_since is None
    # A lease held by another holder is an IntegrityError inside: still just False.
    assert await registry.acquire_lease("l", "a", 60)
    assert not await registry.acquire_lease("l", "b", 60)
