"""The persistent adapter registry: versions, aliases, tenants and the audit log.

Storage is SQLAlchemy 2 async: a SQLite file by default (WAL, one gateway replica) or
PostgreSQL by URL (several replicas). Every mutation is one transaction that also writes its
audit entry and bumps a generation counter; the request path never queries the database, it
reads an immutable in-memory `Snapshot` that is swapped after each local change and reloaded
when another replica's change bumped the generation (`refresh_if_changed`).

When the database is away (stopped, unreachable, locked) every method raises
`RegistryUnavailable` (503 `registry_unavailable`) instead of a driver error; the snapshot
stays as it was, so serving goes on, and the pool reconnects by itself once it is back.

The engine, migrations and the database-away test are in `registry_db.py`; the statements
mutations share and the row conversions in `registry_rows.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from adapters import registry_schema as t
from adapters.registry_db import create_engine, database_away, migrate
from adapters.registry_rows import (
    audit,
    bump,
    get_experiment,
    get_tenant,
    get_version,
    load_snapshot,
    version_audit,
    version_from_row,
    version_users,
)
from adapters.registry_types import (
    SYSTEM,
    Actor,
    AuditEntry,
    ExperimentExists,
    ExperimentNotFound,
    ExperimentRecord,
    InvalidTransition,
    NewVersion,
    Quotas,
    RegistryUnavailable,
    Snapshot,
    TenantExists,
    TenantNotFound,
    TenantRecord,
    VersionInUse,
    VersionNotFound,
)
from adapters.types import AdapterVersion, VersionState
from server.errors import Conflict

__all__ = [
    "SYSTEM",
    "Actor",
    "AuditEntry",
    "ExperimentExists",
    "ExperimentNotFound",
    "ExperimentRecord",
    "InvalidTransition",
    "NewVersion",
    "Quotas",
    "Registry",
    "RegistryUnavailable",
    "Snapshot",
    "TenantExists",
    "TenantNotFound",
    "TenantRecord",
    "VersionInUse",
    "VersionNotFound",
]

log = logging.getLogger("loraplex.registry")
LIVE_STATES = (VersionState.REGISTERED, VersionState.VALIDATED)


class Registry:
    """Async facade over the registry database; one per gateway process."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.snapshot = Snapshot()
        self._write_lock = asyncio.Lock()  # SQLite has one writer; keeps audit order simple
        # When the database stopped answering (None: the last access worked).
        self.unavailable_since: float | None = None

    @classmethod
    async def open(
        cls, url: str, interrupted_after_s: float = 600.0, timeout_s: float = 5.0
    ) -> Registry:
        """Connect, migrate to the newest schema, repair interrupted registrations, load.
        `timeout_s`: see `registry_db.create_engine`."""
        engine = create_engine(url, timeout_s)
        registry = cls(engine)
        await migrate(engine)
        # A SQLite file has one gateway; with PostgreSQL another replica may be mid-registration.
        cutoff = (
            time.time() if engine.dialect.name == "sqlite" else time.time() - interrupted_after_s
        )
        await registry._reject_interrupted(cutoff)
        await registry.reload()
        return registry

    async def close(self) -> None:
        await self._engine.dispose()

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    # -- reading -----------------------------------------------------------------------------

    async def generation(self) -> int:
        async with self._connect() as conn:
            return int((await conn.execute(sa.select(t.registry_meta.c.generation))).scalar_one())

    async def refresh_if_changed(self) -> bool:
        """Reload the snapshot when another replica changed the registry."""
        if await self.generation() == self.snapshot.generation:
            return False
        await self.reload()
        return True

    async def reload(self) -> Snapshot:
        async with self._connect() as conn:
            self.snapshot = await load_snapshot(conn)
        return self.snapshot

    async def audit_entries(
        self, limit: int = 100, before_id: int | None = None
    ) -> list[AuditEntry]:
        q = sa.select(t.audit_log).order_by(t.audit_log.c.id.desc()).limit(limit)
        if before_id is not None:
            q = q.where(t.audit_log.c.id < before_id)
        async with self._connect() as conn:
            rows = (await conn.execute(q)).mappings().all()
        return [
            AuditEntry(
                r["id"],
                r["at"],
                r["actor"],
                r["action"],
                r["target"],
                r["before"],
                r["after"],
                r["request_id"],
            )
            for r in rows
        ]

    # -- adapter versions ----------------------------------------------------------------------

    async def add_version(
        self, name: str, new: NewVersion, state: VersionState, actor: Actor
    ) -> AdapterVersion:
        """Number and store a version in one transaction (a kill leaves it whole or absent)."""
        now = time.time()
        async with self._mutation() as conn:
            last = (
                await conn.execute(
                    sa.select(t.adapter_names.c.last_version).where(t.adapter_names.c.name == name)
                )
            ).scalar_one_or_none()
            if last is None:
                await conn.execute(
                    sa.insert(t.adapter_names).values(name=name, last_version=0, created_at=now)
                )
                last = 0
            # Row lock on PostgreSQL: concurrent registrations of one name get distinct numbers.
            number = (
                await conn.execute(
                    sa.update(t.adapter_names)
                    .where(t.adapter_names.c.name == name, t.adapter_names.c.last_version == last)
                    .values(last_version=last + 1)
                    .returning(t.adapter_names.c.last_version)
                )
            ).scalar_one_or_none()
            if number is None:
                raise Conflict(f"adapter {name!r} was registered concurrently; try again")
            row = {
                "name": name,
                "version": number,
                "digest": new.digest,
                "base_digest": new.base_digest,
                "rank": new.rank,
                "alpha": new.alpha,
                "target_modules": list(new.target_modules),
                "size_bytes": new.size_bytes,
                "source_uri": new.source_uri,
                "path": new.path,
                "state": state.value,
                "state_reason": None,
                "pinned": False,
                "meta": dict(new.metadata),
                "created_at": now,
                "updated_at": now,
            }
            await conn.execute(sa.insert(t.adapter_versions).values(**row))
            version = version_from_row(row)
            await audit(
                conn, actor, "adapter.register", version.label, None, version_audit(version)
            )
        return version

    async def set_state(
        self,
        name: str,
        version: int,
        state: VersionState,
        actor: Actor,
        reason: str | None = None,
        expect: tuple[VersionState, ...] | None = None,
    ) -> AdapterVersion:
        """Move a version's state; `expect` guards against a concurrent change."""
        async with self._mutation() as conn:
            before = await get_version(conn, name, version)
            if expect is not None and before.state not in expect:
                raise InvalidTransition(
                    f"{before.label} is {before.state.value}, expected "
                    + " or ".join(s.value for s in expect)
                )
            if state in (VersionState.RETIRED, VersionState.REJECTED):
                in_use = await version_users(conn, name, version)
                if in_use:
                    raise VersionInUse(
                        f"{before.label} is in use by {', '.join(in_use)}; move or end it first"
                    )
            await conn.execute(
                sa.update(t.adapter_versions)
                .where(t.adapter_versions.c.name == name, t.adapter_versions.c.version == version)
                .values(state=state.value, state_reason=reason, updated_at=time.time())
            )
            after = replace(before, state=state, state_reason=reason)
            await audit(
                conn,
                actor,
                f"adapter.{state.value}",
                before.label,
                {"state": before.state.value},
                {"state": state.value, "reason": reason},
            )
        return after

    async def set_pinned(
        self, name: str, version: int, pinned: bool, actor: Actor
    ) -> AdapterVersion:
        async with self._mutation() as conn:
            before = await get_version(conn, name, version)
            await conn.execute(
                sa.update(t.adapter_versions)
                .where(t.adapter_versions.c.name == name, t.adapter_versions.c.version == version)
                .values(pinned=pinned, updated_at=time.time())
            )
            await audit(
                conn,
                actor,
                "adapter.pin" if pinned else "adapter.unpin",
                before.label,
                {"pinned": before.pinned},
                {"pinned": pinned},
            )
        return replace(before, pinned=pinned)

    async def set_alias(
        self, name: str, alias: str, version: int | None, actor: Actor, *, ready_only: bool = True
    ) -> tuple[int | None, int | None]:
        """Point `name@alias` at `version` (None removes it) atomically; returns (before, after)."""
        async with self._mutation() as conn:
            c = t.aliases.c
            before = (
                await conn.execute(sa.select(c.version).where(c.name == name, c.alias == alias))
            ).scalar_one_or_none()
            if version is None:
                if before is None:
                    raise VersionNotFound(f"no alias {name}@{alias}")
                await conn.execute(sa.delete(t.aliases).where(c.name == name, c.alias == alias))
            elif before == version:
                return before, version  # no change: no audit entry, no generation bump
            else:
                target = await get_version(conn, name, version)
                if ready_only and target.state is not VersionState.READY:
                    raise InvalidTransition(
                        f"{target.label} is {target.state.value}; only ready versions take aliases"
                    )
                now = time.time()
                if before is None:
                    await conn.execute(
                        sa.insert(t.aliases).values(
                            name=name, alias=alias, version=version, updated_at=now
                        )
                    )
                else:
                    await conn.execute(
                        sa.update(t.aliases)
                        .where(c.name == name, c.alias == alias)
                        .values(version=version, updated_at=now)
                    )
            await audit(
                conn,
                actor,
                "alias.set" if version is not None else "alias.delete",
                f"{name}@{alias}",
                {"version": before},
                {"version": version},
            )
        return before, version

    async def delete_version(self, name: str, version: int, actor: Actor) -> AdapterVersion:
        """Forget a version (its number is never reused); refused while an alias points at it."""
        async with self._mutation() as conn:
            before = await get_version(conn, name, version)
            users = await version_users(conn, name, version)
            if users:
                raise VersionInUse(
                    f"{before.label} is in use by {', '.join(users)}; "
                    "move or delete the alias, or end the experiment, first"
                )
            await conn.execute(
                sa.delete(t.adapter_versions).where(
                    t.adapter_versions.c.name == name, t.adapter_versions.c.version == version
                )
            )
            await audit(conn, actor, "adapter.delete", before.label, version_audit(before), None)
        return before

    # -- tenants ---------------------------------------------------------------------------------

    async def put_tenant(
        self, record: TenantRecord, actor: Actor, *, create: bool | None = None
    ) -> TenantRecord | None:
        """Create or replace a tenant; `create=True` refuses an existing name, False a new one.
        Returns the previous record."""
        async with self._mutation() as conn:
            before = await get_tenant(conn, record.name)
            if create is True and before is not None:
                raise TenantExists(f"tenant {record.name!r} exists")
            if create is False and before is None:
                raise TenantNotFound(f"no tenant named {record.name!r}")
            now = time.time()
            values = {
                "key_digests": list(record.key_digests),
                "adapters": sorted(record.adapters),
                "default_model": record.default,
                "quotas": record.quotas.as_dict(),
                "updated_at": now,
            }
            if before is None:
                await conn.execute(
                    sa.insert(t.tenants).values(name=record.name, created_at=now, **values)
                )
            else:
                await conn.execute(
                    sa.update(t.tenants).where(t.tenants.c.name == record.name).values(**values)
                )
            await audit(
                conn,
                actor,
                "tenant.create" if before is None else "tenant.update",
                f"tenant:{record.name}",
                before.as_audit() if before else None,
                record.as_audit(),
            )
        return before

    async def delete_tenant(self, name: str, actor: Actor) -> TenantRecord:
        async with self._mutation() as conn:
            before = await get_tenant(conn, name)
            if before is None:
                raise TenantNotFound(f"no tenant named {name!r}")
            await conn.execute(sa.delete(t.tenants).where(t.tenants.c.name == name))
            await audit(conn, actor, "tenant.delete", f"tenant:{name}", before.as_audit(), None)
        return before

    async def seed_tenants(self, records: list[TenantRecord]) -> list[str]:
        """Insert tenants from the bootstrap file that the registry does not hold yet."""
        added = []
        for record in records:
            if record.name in self.snapshot.tenants:
                continue
            try:
                await self.put_tenant(record, SYSTEM, create=True)
            except TenantExists:
                continue  # another replica seeded it first
            added.append(record.name)
        return added

    async def record_audit(self, actor: Actor, action: str, target: str, after: Any) -> None:
        """An audit entry for an action that changed nothing stored (e.g. a refused register)."""
        async with self._begin() as conn:
            await audit(conn, actor, action, target, None, after)

    # -- experiments -------------------------------------------------------------------------

    async def put_experiment(
        self,
        record: ExperimentRecord,
        actor: Actor,
        *,
        create: bool = False,
        expect_status: tuple[str, ...] | None = None,
        action: str = "experiment.update",
    ) -> ExperimentRecord | None:
        """Create (refusing an existing name) or replace an experiment; `expect_status` guards
        against a concurrent change (another replica's controller or an operator)."""
        async with self._mutation() as conn:
            before = await get_experiment(conn, record.name)
            if create and before is not None:
                raise ExperimentExists(f"experiment {record.name!r} exists")
            if not create and before is None:
                raise ExperimentNotFound(f"no experiment named {record.name!r}")
            if before is not None and expect_status and before.status not in expect_status:
                raise InvalidTransition(
                    f"experiment {record.name!r} is {before.status}, expected "
                    + " or ".join(expect_status)
                )
            now = time.time()
            values = {
                "target": record.target,
                "definition": dict(record.definition),
                "status": record.status,
                "weights": dict(record.weights),
                "ramp_step": record.ramp_step,
                "step_started_at": record.step_started_at,
                "reason": record.reason,
                "updated_at": now,
            }
            if before is None:
                await conn.execute(
                    sa.insert(t.experiments).values(name=record.name, created_at=now, **values)
                )
            else:
                await conn.execute(
                    sa.update(t.experiments)
                    .where(t.experiments.c.name == record.name)
                    .values(**values)
                )
            await audit(
                conn,
                actor,
                "experiment.create" if before is None else action,
                f"experiment:{record.name}",
                before.as_audit() if before else None,
                record.as_audit() | ({"definition": dict(record.definition)} if create else {}),
            )
        return before

    async def delete_experiment(self, name: str, actor: Actor) -> ExperimentRecord:
        async with self._mutation() as conn:
            before = await get_experiment(conn, name)
            if before is None:
                raise ExperimentNotFound(f"no experiment named {name!r}")
            await conn.execute(sa.delete(t.experiments).where(t.experiments.c.name == name))
            await audit(
                conn, actor, "experiment.delete", f"experiment:{name}", before.as_audit(), None
            )
        return before

    # -- leader leases ---------------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew lease `name` for `holder` unless another holder's is still valid.
        One conditional UPDATE (or the first INSERT): atomic on SQLite and PostgreSQL alike."""
        now = time.time()
        c = t.leases.c
        async with self._begin() as conn:
            taken = await conn.execute(
                sa.update(t.leases)
                .where(c.name == name, sa.or_(c.holder == holder, c.expires_at < now))
                .values(holder=holder, expires_at=now + ttl_s)
            )
            if taken.rowcount:
                return True
        try:
            async with self._begin() as conn:
                await conn.execute(
                    sa.insert(t.leases).values(name=name, holder=holder, expires_at=now + ttl_s)
                )
        except sa.exc.IntegrityError:
            return False  # held by someone else
        return True

    async def release_lease(self, name: str, holder: str) -> None:
        c = t.leases.c
        async with self._begin() as conn:
            await conn.execute(sa.delete(t.leases).where(c.name == name, c.holder == holder))

    # -- drift references ------------------------------------------------------------------------

    async def drift_references(self) -> dict[str, dict[str, Any]]:
        async with self._connect() as conn:
            rows = (await conn.execute(sa.select(t.drift_references))).mappings().all()
        return {r["tenant"]: dict(r["payload"]) for r in rows}

    async def put_drift_reference(
        self, tenant: str, payload: Mapping[str, Any] | None, actor: Actor
    ) -> None:
        """Store (None: forget) a tenant's drift reference window; audited without the payload."""
        c = t.drift_references.c
        async with self._begin() as conn:
            await conn.execute(sa.delete(t.drift_references).where(c.tenant == tenant))
            if payload is not None:
                await conn.execute(
                    sa.insert(t.drift_references).values(
                        tenant=tenant, payload=dict(payload), updated_at=time.time()
                    )
                )
            await audit(
                conn,
                actor,
                "drift.reference.set" if payload is not None else "drift.reference.reset",
                f"tenant:{tenant}",
                None,
                None,
            )

    # -- plumbing ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        with self._availability():
            async with self._engine.connect() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        with self._availability():
            async with self._engine.begin() as conn:
                yield conn

    @contextlib.contextmanager
    def _availability(self) -> Iterator[None]:
        """Database-away errors → `RegistryUnavailable` (anything else, e.g. a constraint,
        passes through unchanged); `unavailable_since` follows what the last access saw."""
        try:
            yield
        except Exception as exc:
            if not database_away(exc):
                raise
            if self.unavailable_since is None:
                self.unavailable_since = time.time()
                log.warning("registry database unavailable", extra={"error": repr(exc)[:300]})
            raise RegistryUnavailable(
                "The adapter registry database is unavailable; try again shortly."
            ) from exc
        if self.unavailable_since is not None:
            away = round(time.time() - self.unavailable_since, 1)
            self.unavailable_since = None
            log.warning("registry database reachable again", extra={"unavailable_s": away})

    @contextlib.asynccontextmanager
    async def _mutation(self) -> AsyncIterator[AsyncConnection]:
        """One serialized transaction (its audit rows bump the generation), then a reload."""
        async with self._write_lock, self._begin() as conn:
            yield conn
        await self.reload()

    async def _reject_interrupted(self, cutoff: float) -> None:
        c = t.adapter_versions.c
        async with self._begin() as conn:
            rows = (
                await conn.execute(
                    sa.select(c.name, c.version).where(
                        c.state.in_([s.value for s in LIVE_STATES]), c.updated_at <= cutoff
                    )
                )
            ).all()
            if not rows:
                return
            reason = "registration interrupted before it finished; register again"
            for name, version in rows:
                await conn.execute(
                    sa.update(t.adapter_versions)
                    .where(c.name == name, c.version == version)
                    .values(
                        state=VersionState.REJECTED.value,
                        state_reason=reason,
                        updated_at=time.time(),
                    )
                )
                await audit(
                    conn,
                    SYSTEM,
                    "adapter.rejected",
                    f"{name}@{version}",
                    None,
                    {"state": "rejected", "reason": reason},
                )
            await bump(conn)
