"""The audit log is append-only in the database itself (migration 0003), on SQLite and
PostgreSQL: UPDATE, DELETE (and TRUNCATE) are refused whoever sends them; inserts go on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from adapters.registry import Actor, Registry, TenantRecord
from adapters.registry_db import MIGRATIONS
from tests.pg import postgres_cluster

ADMIN = Actor("admin:test", "req-1")
TAMPER = [
    "UPDATE audit_log SET actor = 'someone-else'",
    "UPDATE audit_log SET after = NULL WHERE id = 1",
    "DELETE FROM audit_log",
    "DELETE FROM audit_log WHERE id = 1",
]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database: a SQLite file, or a fresh database on the module's cluster."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
        return
    base: str = request.getfixturevalue("pg_url")
    db = f"a_{abs(hash(request.node.nodeid)) % 10**9}"
    admin = create_async_engine(base, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(sa.text(f"DROP DATABASE IF EXISTS {db}"))
        await conn.execute(sa.text(f"CREATE DATABASE {db}"))
    await admin.dispose()
    yield base.rsplit("/", 1)[0] + f"/{db}"


def tenant(name: str) -> TenantRecord:
    return TenantRecord(name, ("ab" * 32,), frozenset({"medical"}))


async def rows(engine: AsyncEngine) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        result = await conn.execute(sa.text("SELECT id, actor, action, target FROM audit_log"))
        return [tuple(r) for r in result.all()]


async def refused(engine: AsyncEngine, statement: str) -> str:
    """Run `statement` in its own transaction; it must fail. Returns the error text."""
    with pytest.raises(sa.exc.DBAPIError) as caught:
        async with engine.begin() as conn:
            await conn.execute(sa.text(statement))
    return str(caught.value)


async def test_update_and_delete_of_audit_rows_are_refused(url: str) -> None:
    reg = await Registry.open(url)
    engine = create_async_engine(url)
    try:
        await reg.put_tenant(tenant("acme"), ADMIN, create=True)
        await reg.put_tenant(tenant("beta"), ADMIN, create=True)
        await reg.delete_tenant("beta", ADMIN)
        before = await rows(engine)
        assert [r[2] for r in before] == ["tenant.create", "tenant.create", "tenant.delete"]
        statements = list(TAMPER)
        if engine.dialect.name == "postgresql":
            statements.append("TRUNCATE audit_log")
        for statement in statements:
            assert "append-only" in await refused(engine, statement), statement
        assert await rows(engine) == before
        # Appending still works, through the registry and by hand.
        await reg.put_tenant(tenant("gamma"), ADMIN, create=True)
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO audit_log (at, actor, action, target) "
                    "VALUES (1.0, 'ops', 'note', 'manual')"
                )
            )
        after = await rows(engine)
        assert after[: len(before)] == before
        assert [r[2] for r in after[len(before) :]] == ["tenant.create", "note"]
        assert [e.action for e in await reg.audit_entries()][:2] == ["note", "tenant.create"]
    finally:
        await engine.dispose()
        await reg.close()


async def test_upgrading_a_0002_database_keeps_its_audit_rows_and_locks_them(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_migrate, "upgrade", "0002")
            await conn.execute(
                sa.text(
                    "INSERT INTO audit_log (at, actor, action, target) "
                    "VALUES (1.0, 'old', 'tenant.create', 'tenant:old')"
                )
            )
        reg = await Registry.open(url)  # migrates 0002 → head
        await reg.close()
        assert await rows(engine) == [(1, "old", "tenant.create", "tenant:old")]
        assert "append-only" in await refused(engine, "DELETE FROM audit_log")
        # The migration is reversible: downgraded, rows can be changed again.
        async with engine.begin() as conn:
            await conn.run_sync(_migrate, "downgrade", "0002")
        async with engine.begin() as conn:
            await conn.execute(sa.text("UPDATE audit_log SET actor = 'changed'"))
        assert (await rows(engine))[0][1] == "changed"
    finally:
        await engine.dispose()


def _migrate(sync_conn: Connection, direction: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = sync_conn
    getattr(command, direction)(cfg, revision)
