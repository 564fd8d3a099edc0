"""Registry rows and records: the statements mutations share (audit entry plus generation
bump, lookups, what keeps a version in use) and the row ↔ record conversions."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from adapters import registry_schema as t
from adapters.registry_types import (
    Actor,
    ExperimentRecord,
    Quotas,
    Snapshot,
    TenantRecord,
    VersionNotFound,
)
from adapters.types import DEFAULT_ALIAS, AdapterRef, AdapterVersion, VersionState

ACTIVE_EXPERIMENTS = ("running", "paused")  # router.experiments.ACTIVE (adapters sits below)


async def bump(conn: AsyncConnection) -> None:
    await conn.execute(
        sa.update(t.registry_meta).values(generation=t.registry_meta.c.generation + 1)
    )


async def audit(
    conn: AsyncConnection, actor: Actor, action: str, target: str, before: Any, after: Any
) -> None:
    await conn.execute(
        sa.insert(t.audit_log).values(
            at=time.time(),
            actor=actor.name,
            action=action,
            target=target[:200],
            before=before,
            after=after,
            request_id=actor.request_id,
        )
    )
    await bump(conn)


async def version_users(conn: AsyncConnection, name: str, version: int) -> list[str]:
    """What keeps a version routable: aliases pointing at it and active experiments serving
    it in a variant (`["alias stable", "experiment x"]`)."""
    c = t.aliases.c
    rows = await conn.execute(
        sa.select(c.alias).where(c.name == name, c.version == version).order_by(c.alias)
    )
    users = [f"alias {a}" for a in rows.scalars().all()]
    e = t.experiments.c
    active = await conn.execute(
        sa.select(e.name, e.definition).where(e.status.in_(ACTIVE_EXPERIMENTS)).order_by(e.name)
    )
    for exp_name, definition in active.all():
        for variant in (definition or {}).get("variants", []):
            ref = AdapterRef.parse(str(variant.get("model", "")))
            if ref is None or ref.name != name:
                continue
            number = ref.version
            if number is None:
                number = (
                    await conn.execute(
                        sa.select(c.version).where(
                            c.name == name, c.alias == (ref.alias or DEFAULT_ALIAS)
                        )
                    )
                ).scalar_one_or_none()
            if number == version:
                users.append(f"experiment {exp_name}")
                break
    return users


async def get_version(conn: AsyncConnection, name: str, version: int) -> AdapterVersion:
    c = t.adapter_versions.c
    row = (
        (
            await conn.execute(
                sa.select(t.adapter_versions).where(c.name == name, c.version == version)
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise VersionNotFound(f"no adapter version {name}@{version}")
    return version_from_row(row)


async def get_tenant(conn: AsyncConnection, name: str) -> TenantRecord | None:
    row = (
        (await conn.execute(sa.select(t.tenants).where(t.tenants.c.name == name)))
        .mappings()
        .first()
    )
    return None if row is None else tenant_from_row(row)


async def get_experiment(conn: AsyncConnection, name: str) -> ExperimentRecord | None:
    row = (
        (await conn.execute(sa.select(t.experiments).where(t.experiments.c.name == name)))
        .mappings()
        .first()
    )
    return None if row is None else experiment_from_row(row)


def experiment_from_row(row: Mapping[Any, Any]) -> ExperimentRecord:
    return ExperimentRecord(
        name=row["name"],
        target=row["target"],
        definition=dict(row["definition"]),
        status=row["status"],
        weights={str(k): float(v) for k, v in dict(row["weights"]).items()},
        ramp_step=row["ramp_step"],
        step_started_at=row["step_started_at"],
        reason=row["reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def load_snapshot(conn: AsyncConnection) -> Snapshot:
    generation = int((await conn.execute(sa.select(t.registry_meta.c.generation))).scalar_one())
    versions = {}
    for row in (await conn.execute(sa.select(t.adapter_versions))).mappings():
        v = version_from_row(row)
        versions[(v.name, v.version)] = v
    aliases = {
        (r.name, r.alias): r.version for r in (await conn.execute(sa.select(t.aliases))).all()
    }
    tenants = {
        r["name"]: tenant_from_row(r) for r in (await conn.execute(sa.select(t.tenants))).mappings()
    }
    experiments = {
        r["name"]: experiment_from_row(r)
        for r in (await conn.execute(sa.select(t.experiments))).mappings()
    }
    return Snapshot(generation, versions, aliases, tenants, experiments)


def version_from_row(row: Mapping[Any, Any]) -> AdapterVersion:
    return AdapterVersion(
        name=row["name"],
        version=row["version"],
        digest=row["digest"],
        base_digest=row["base_digest"],
        rank=row["rank"],
        alpha=row["alpha"],
        target_modules=tuple(row["target_modules"]),
        size_bytes=row["size_bytes"],
        source_uri=row["source_uri"],
        path=row["path"],
        state=VersionState(row["state"]),
        created_at=row["created_at"],
        state_reason=row["state_reason"],
        pinned=bool(row["pinned"]),
        metadata=dict(row["meta"] or {}),
    )


def tenant_from_row(row: Mapping[Any, Any]) -> TenantRecord:
    return TenantRecord(
        name=row["name"],
        key_digests=tuple(row["key_digests"]),
        adapters=frozenset(row["adapters"]),
        default=row["default_model"],
        quotas=Quotas.from_dict(row["quotas"]),
    )


def version_audit(v: AdapterVersion) -> dict[str, Any]:
    return {
        "digest": v.digest,
        "base_digest": v.base_digest,
        "rank": v.rank,
        "source": v.source_uri,
        "state": v.state.value,
        "metadata": v.metadata,
    }
