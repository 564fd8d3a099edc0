"""The persistent registry against real databases: SQLite (WAL file) and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from adapters import registry_schema
from adapters.registry import (
    Actor,
    ExperimentExists,
    ExperimentNotFound,
    ExperimentRecord,
    InvalidTransition,
    NewVersion,
    Quotas,
    Registry,
    TenantExists,
    TenantRecord,
    VersionInUse,
    VersionNotFound,
)
from adapters.registry_db import HEAD_REVISION, MIGRATIONS
from adapters.types import AdapterRef, VersionState
from tests.pg import postgres_cluster

ADMIN = Actor("admin:test", "req-1")


def new_version(digest: str = "sha256:" + "ab" * 32, **kw: object) -> NewVersion:
    fields: dict[str, object] = {
        "digest": digest,
        "base_digest": "sha256:" + "cd" * 32,
        "rank": 8,
        "alpha": 16.0,
        "target_modules": ("q_proj", "v_proj"),
        "size_bytes": 1234,
        "source_uri": "/adapters/x",
        "path": "/cache/x",
        "metadata": {"tag": "base=w4/data=v1"},
    }
    fields.update(kw)
    return NewVersion(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def registry(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Registry]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    else:
        base = request.getfixturevalue("pg_url")
        # One database per test keeps them independent on the shared cluster.
        db = f"t_{abs(hash(request.node.nodeid)) % 10**9}"
        admin = create_async_engine(base, isolation_level="AUTOCOMMIT")
        async with admin.connect() as conn:
            await conn.execute(sa.text(f"DROP DATABASE IF EXISTS {db}"))
            await conn.execute(sa.text(f"CREATE DATABASE {db}"))
        await admin.dispose()
        url = base.rsplit("/", 1)[0] + f"/{db}"
    reg = await Registry.open(url)
    yield reg
    await reg.close()


async def ready(reg: Registry, name: str, digest: str = "sha256:" + "ab" * 32) -> int:
    v = await reg.add_version(name, new_version(digest), VersionState.VALIDATED, ADMIN)
    await reg.set_state(name, v.version, VersionState.READY, ADMIN)
    return v.version


async def test_versions_are_numbered_per_name_and_never_reused(registry: Registry) -> None:
    assert await ready(registry, "medical") == 1
    assert await ready(registry, "medical", digest="sha256:" + "01" * 32) == 2
    assert await ready(registry, "legal") == 1
    await registry.delete_version("medical", 2, ADMIN)
    assert await ready(registry, "medical", digest="sha256:" + "02" * 32) == 3
    snap = registry.snapshot
    assert [v.version for v in snap.versions_of("medical")] == [1, 3]
    v1 = snap.versions[("medical", 1)]
    assert v1.target_modules == ("q_proj", "v_proj")
    assert v1.metadata == {"tag": "base=w4/data=v1"}
    assert v1.served_name == "medical@1-" + "ab" * 5


async def test_aliases_resolve_and_move_atomically(registry: Registry) -> None:
    await ready(registry, "medical")
    await ready(registry, "medical", digest="sha256:" + "01" * 32)
    await registry.set_alias("medical", "stable", 1, ADMIN)
    await registry.set_alias("medical", "canary", 2, ADMIN)
    snap = registry.snapshot
    assert snap.resolve(AdapterRef.parse("medical")).version == 1  # type: ignore[arg-type,union-attr]
    assert snap.resolve(AdapterRef("medical", alias="canary")).version == 2  # type: ignore[union-attr]
    assert snap.resolve(AdapterRef("medical", version=2)).version == 2  # type: ignore[union-attr]
    assert snap.resolve(AdapterRef("medical", alias="nope")) is None
    before, after = await registry.set_alias("medical", "stable", 2, ADMIN)
    assert (before, after) == (1, 2)
    assert registry.snapshot.resolve(AdapterRef("medical")).version == 2  # type: ignore[union-attr]
    assert snap.resolve(AdapterRef("medical")).version == 1  # type: ignore[union-attr]  # old view


async def test_alias_needs_a_ready_version_and_pins_the_version(registry: Registry) -> None:
    v = await registry.add_version("medical", new_version(), VersionState.VALIDATED, ADMIN)
    with pytest.raises(InvalidTransition):
        await registry.set_alias("medical", "stable", v.version, ADMIN)
    with pytest.raises(VersionNotFound):
        await registry.set_alias("medical", "stable", 9, ADMIN)
    await registry.set_state("medical", 1, VersionState.READY, ADMIN)
    await registry.set_alias("medical", "stable", 1, ADMIN)
    with pytest.raises(VersionInUse):
        await registry.delete_version("medical", 1, ADMIN)
    with pytest.raises(VersionInUse):
        await registry.set_state("medical", 1, VersionState.RETIRED, ADMIN)
    await registry.set_alias("medical", "stable", None, ADMIN)
    retired = await registry.set_state("medical", 1, VersionState.RETIRED, ADMIN)
    assert not retired.routable
    await registry.delete_version("medical", 1, ADMIN)
    assert registry.snapshot.versions == {}


async def test_state_guard_refuses_a_concurrent_change(registry: Registry) -> None:
    v = await registry.add_version("medical", new_version(), VersionState.VALIDATED, ADMIN)
    await registry.set_state("medical", v.version, VersionState.REJECTED, ADMIN, reason="smoke")
    with pytest.raises(InvalidTransition):
        await registry.set_state(
            "medical", v.version, VersionState.READY, ADMIN, expect=(VersionState.VALIDATED,)
        )
    assert registry.snapshot.versions[("medical", 1)].state_reason == "smoke"


async def test_concurrent_registrations_of_one_name_get_distinct_numbers(
    registry: Registry,
) -> None:
    made = await asyncio.gather(
        *(
            registry.add_version(
                "medical", new_version(f"sha256:{i:064x}"), VersionState.VALIDATED, ADMIN
            )
            for i in range(8)
        )
    )
    assert sorted(v.version for v in made) == list(range(1, 9))


async def test_tenants_and_audit(registry: Registry) -> None:
    rec = TenantRecord("acme", ("a" * 64,), frozenset({"medical"}), "medical", Quotas(2, 60, None))
    await registry.put_tenant(rec, ADMIN, create=True)
    with pytest.raises(TenantExists):
        await registry.put_tenant(rec, ADMIN, create=True)
    rotated = TenantRecord("acme", ("b" * 64,), rec.adapters, rec.default, rec.quotas)
    before = await registry.put_tenant(rotated, ADMIN, create=False)
    assert before == rec
    assert registry.snapshot.tenants["acme"].key_digests == ("b" * 64,)
    assert registry.snapshot.tenants["acme"].quotas.requests_per_minute == 60
    assert await registry.seed_tenants([rec]) == []  # present: the file does not overwrite
    entries = await registry.audit_entries(limit=10)
    assert [e.action for e in entries] == ["tenant.update", "tenant.create"]
    assert entries[0].actor == "admin:test"
    assert entries[0].request_id == "req-1"
    assert entries[0].before["keys"] == ["a" * 12]
    assert entries[0].after["keys"] == ["b" * 12]


async def test_another_replica_sees_changes_through_the_generation(
    registry: Registry, tmp_path: Path
) -> None:
    other = await Registry.open(str(registry._engine.url.render_as_string(hide_password=False)))
    try:
        assert await other.refresh_if_changed() is False
        await ready(registry, "medical")
        await registry.set_alias("medical", "stable", 1, ADMIN)
        assert other.snapshot.resolve(AdapterRef("medical")) is None
        assert await other.refresh_if_changed() is True
        assert other.snapshot.resolve(AdapterRef("medical")).version == 1  # type: ignore[union-attr]
    finally:
        await other.close()


async def test_experiments_are_stored_guarded_audited_and_in_the_snapshot(
    registry: Registry,
) -> None:
    rec = ExperimentRecord(
        name="exp1",
        target="support@stable",
        definition={"variants": [{"name": "control", "model": "support@1"}]},
        status="running",
        weights={"control": 0.9, "candidate": 0.1},
        ramp_step=0,
        step_started_at=1.0,
    )
    await registry.put_experiment(rec, ADMIN, create=True)
    with pytest.raises(ExperimentExists):
        await registry.put_experiment(rec, ADMIN, create=True)
    got = registry.snapshot.experiments["exp1"]
    assert got.weights == {"control": 0.9, "candidate": 0.1}
    assert got.status == "running"
    rolled = replace(rec, status="rolled_back", weights={"control": 1.0, "candidate": 0.0})
    await registry.put_experiment(rolled, ADMIN, expect_status=("running",), action="x.rollback")
    with pytest.raises(InvalidTransition):  # a second controller lost the race
        await registry.put_experiment(rolled, ADMIN, expect_status=("running",))
    assert registry.snapshot.experiments["exp1"].status == "rolled_back"
    actions = [e.action for e in await registry.audit_entries()]
    assert actions[:2] == ["x.rollback", "experiment.create"]
    await registry.delete_experiment("exp1", ADMIN)
    assert "exp1" not in registry.snapshot.experiments
    with pytest.raises(ExperimentNotFound):
        await registry.delete_experiment("exp1", ADMIN)


async def test_versions_in_an_active_experiment_cannot_be_retired_or_deleted(
    registry: Registry,
) -> None:
    await ready(registry, "support")
    await ready(registry, "support", "sha256:" + "ef" * 32)
    await registry.set_alias("support", "canary", 2, ADMIN)
    rec = ExperimentRecord(
        name="exp",
        target="support@stable",
        definition={
            "variants": [
                {"name": "control", "model": "support@1"},
                {"name": "candidate", "model": "support@canary"},
            ]
        },
        status="running",
        weights={"control": 0.5, "candidate": 0.5},
        ramp_step=0,
        step_started_at=1.0,
    )
    await registry.put_experiment(rec, ADMIN, create=True)
    await registry.set_alias("support", "canary", None, ADMIN)
    await registry.set_alias("support", "canary", 2, ADMIN)
    with pytest.raises(VersionInUse, match="experiment exp"):
        await registry.delete_version("support", 2, ADMIN)  # through its alias
    await registry.set_alias("support", "stable", 2, ADMIN)
    with pytest.raises(VersionInUse, match="experiment exp"):
        await registry.set_state("support", 1, VersionState.RETIRED, ADMIN)  # by number
    await registry.put_experiment(replace(rec, status="aborted"), ADMIN)
    await registry.set_state("support", 1, VersionState.RETIRED, ADMIN)


async def test_leases_have_one_holder_until_they_expire(registry: Registry) -> None:
    assert await registry.acquire_lease("controller", "a", ttl_s=30)
    assert not await registry.acquire_lease("controller", "b", ttl_s=30)
    assert await registry.acquire_lease("controller", "a", ttl_s=30)  # renewal
    await registry.release_lease("controller", "a")
    assert await registry.acquire_lease("controller", "b", ttl_s=0.05)
    await asyncio.sleep(0.1)
    assert await registry.acquire_lease("controller", "a", ttl_s=30)  # b's expired


async def test_drift_references_round_trip(registry: Registry) -> None:
    await registry.put_drift_reference("acme", {"domains": {"medical": 3}}, ADMIN)
    assert await registry.drift_references() == {"acme": {"domains": {"medical": 3}}}
    await registry.put_drift_reference("acme", None, ADMIN)
    assert await registry.drift_references() == {}


def test_migrated_schema_matches_the_tables_module(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    db = tmp_path / "r.db"
    asyncio.run(_open_close(f"sqlite+aiosqlite:///{db}"))
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), registry_schema.metadata)
    engine.dispose()
    assert diff == []


async def _open_close(url: str) -> None:
    reg = await Registry.open(url)
    await reg.close()


KILLER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from adapters.registry import Actor, Registry
    from adapters.types import VersionState
    from tests.unit.test_registry_store import new_version

    async def main() -> None:
        reg = await Registry.open(sys.argv[1])
        v = await reg.add_version("medical", new_version(), VersionState.VALIDATED, Actor("a"))
        await reg.set_state("medical", v.version, VersionState.READY, Actor("a"))
        await reg.set_alias("medical", "stable", v.version, Actor("a"))
        # Mid-registration of v2: validated row stored, smoke test not finished.
        await reg.add_version("medical", new_version("sha256:" + "ee" * 32),
                              VersionState.VALIDATED, Actor("a"))
        print("killing", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


def test_kill_9_mid_registration_leaves_no_half_registered_version(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    url = f"sqlite+aiosqlite:///{db}"
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, url],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert proc.returncode == -9, proc.stderr
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    asyncio.run(_check_after_kill(url))


async def _check_after_kill(url: str) -> None:
    reg = await Registry.open(url)
    try:
        snap = reg.snapshot
        assert snap.resolve(AdapterRef("medical")).version == 1  # type: ignore[union-attr]
        v2 = snap.versions[("medical", 2)]
        assert v2.state is VersionState.REJECTED
        assert not v2.routable
        assert "interrupted" in (v2.state_reason or "")
        assert await ready(reg, "medical", digest="sha256:" + "ff" * 32) == 3
    finally:
        await reg.close()


def test_head_revision_constant_matches_the_migrations() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION
