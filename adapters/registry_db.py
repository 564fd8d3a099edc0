"""The registry's database plumbing: the SQLAlchemy engine (PostgreSQL timeouts, SQLite
pragmas), schema migration at start, and which errors mean the database is away."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The newest migration in adapters/migrations/versions (a unit test keeps the two in step):
# a database already there skips loading Alembic at start.
HEAD_REVISION = "0003"
MIGRATION_LOCK_ID = 0x10AA_B1E4  # PostgreSQL advisory lock: one replica migrates at a time


def create_engine(url: str, timeout_s: float) -> AsyncEngine:
    """An engine for `url`. `timeout_s` bounds a PostgreSQL connect, a wait for a pooled
    connection and each statement (SQLite waits out its busy timeout instead)."""
    if url.startswith("sqlite"):
        db = url.split("///", 1)[1] if "///" in url else ""
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url, pool_pre_ping=True, pool_timeout=timeout_s, connect_args=_timeouts(url, timeout_s)
    )


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (one replica at a time on PostgreSQL)."""
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_ID)))
        if await _revision(conn) != HEAD_REVISION:
            await conn.run_sync(_upgrade)


def database_away(exc: BaseException) -> bool:
    """Connection-level trouble, not a problem with the statement: refused or lost
    connections, pool or connect timeouts, SQLite's locked / unopenable file, and
    PostgreSQL's SQLSTATE classes 08 (connection exception) and 57 (operator intervention:
    shutting down, starting up)."""
    if isinstance(
        exc,
        OSError
        | TimeoutError
        | sa.exc.OperationalError
        | sa.exc.InterfaceError
        | sa.exc.DisconnectionError
        | sa.exc.TimeoutError,
    ):
        return True
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(exc, "sqlstate", None) or getattr(orig, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in ("08", "57")


def _timeouts(url: str, timeout_s: float) -> dict[str, Any]:
    """Driver arguments that bound a connect and each statement (asyncpg's)."""
    if "+asyncpg" in url.split("://", 1)[0]:
        return {"timeout": timeout_s, "command_timeout": timeout_s}
    return {}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


async def _revision(conn: AsyncConnection) -> str | None:
    def read(sync_conn: Connection) -> str | None:
        if not sa.inspect(sync_conn).has_table("alembic_version"):
            return None
        row = sync_conn.execute(sa.text("SELECT version_num FROM alembic_version")).first()
        return None if row is None else str(row[0])

    return await conn.run_sync(read)


def _upgrade(sync_conn: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")
