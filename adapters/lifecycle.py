"""Operator workflows over the registry and the engine: register (fetch → validate → smoke
generation → ready), pin, retire, delete, revalidate.

A version becomes routable only in state `ready`, which it reaches only after its files passed
every static check against the served base and a real generation through the engine worked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from adapters.errors import AdapterRejected
from adapters.placement import EnginePool
from adapters.registry import Actor, NewVersion, Registry, VersionNotFound
from adapters.sources import redact_url
from adapters.types import DEFAULT_ALIAS, AdapterVersion, VersionState
from adapters.validate import AdapterFacts, BaseModelInfo, ValidationLimits, check_against_base
from adapters.validate import inspect_adapter as inspect_dir
from server.errors import LoraplexError

log = logging.getLogger("loraplex.lifecycle")

Progress = Callable[[int, int | None], None]


class Materialized(Protocol):
    @property
    def path(self) -> Path: ...


class SourceResolver(Protocol):
    async def materialize(self, uri: str, progress: Progress | None = None) -> Materialized: ...

    async def aclose(self) -> None: ...


class SmokeFailed(AdapterRejected):
    code = "adapter_smoke_failed"


@dataclass(frozen=True, slots=True)
class Inspection:
    path: Path
    facts: AdapterFacts


SMOKE_PROMPT = "Hello"


class AdapterLifecycle:
    """The one place registry state and engine registration change together."""

    def __init__(
        self,
        registry: Registry,
        engines: EnginePool,
        sources: SourceResolver,
        limits: ValidationLimits,
        base: Callable[[], Awaitable[BaseModelInfo]],
        *,
        allow_unknown_base: bool = False,
        smoke_max_tokens: int = 4,
    ) -> None:
        self.registry = registry
        self.engines = engines
        self._sources = sources
        self.limits = limits
        self._base = base
        self._allow_unknown_base = allow_unknown_base
        self._smoke_max_tokens = smoke_max_tokens
        self._name_locks: dict[str, asyncio.Lock] = {}

    async def aclose(self) -> None:
        await self._sources.aclose()

    async def inspect(self, source: str, base_digest: str | None = None) -> Inspection:
        """Fetch and run every static check (no registry change): `validate` without register."""
        path = (await self._sources.materialize(source, _log_progress(source))).path
        facts = await asyncio.to_thread(inspect_dir, path, self.limits)
        base = await self._base()
        await asyncio.to_thread(
            check_against_base,
            facts,
            base,
            declared_base_digest=base_digest,
            allow_unknown_base=self._allow_unknown_base,
        )
        return Inspection(path, facts)

    async def register(
        self,
        name: str,
        source: str,
        actor: Actor,
        *,
        base_digest: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        alias: str | None = None,
    ) -> tuple[AdapterVersion, bool]:
        """Register a new version (or return the ready one with the same content: False)."""
        try:
            found = await self.inspect(source, base_digest)
        except LoraplexError as exc:
            await self.registry.record_audit(
                actor, "adapter.refused", name, {"source": source, "code": exc.error_code}
            )
            raise
        lock = self._name_locks.setdefault(name, asyncio.Lock())
        async with lock:
            same = next(
                (
                    v
                    for v in self.registry.snapshot.versions_of(name)
                    if v.digest == found.facts.digest and v.state is VersionState.READY
                ),
                None,
            )
            if same is not None:
                if alias:
                    await self.registry.set_alias(name, alias, same.version, actor)
                return same, False
            facts = found.facts
            version = await self.registry.add_version(
                name,
                NewVersion(
                    digest=facts.digest,
                    base_digest=base_digest or facts.declared_base_digest,
                    rank=facts.rank,
                    alpha=facts.alpha,
                    target_modules=facts.target_modules,
                    size_bytes=facts.size_bytes,
                    source_uri=source,
                    path=str(found.path),
                    metadata=dict(metadata or {}),
                ),
                VersionState.VALIDATED,
                actor,
            )
            version = await self._smoke_and_ready(version, actor)
            if (name, DEFAULT_ALIAS) not in self.registry.snapshot.aliases:
                await self.registry.set_alias(name, DEFAULT_ALIAS, version.version, actor)
            if alias:
                await self.registry.set_alias(name, alias, version.version, actor)
        return self.registry.snapshot.versions[(name, version.version)], True

    async def revalidate(self, name: str, number: int, actor: Actor) -> AdapterVersion:
        """Run the checks again on a stored version (e.g. one an interrupted start rejected)."""
        version = self._get(name, number)
        if version.state is VersionState.READY:
            return version
        facts = await asyncio.to_thread(inspect_dir, Path(version.path), self.limits)
        if facts.digest != version.digest:
            raise AdapterRejected(f"{version.label}: stored files no longer match its digest")
        await asyncio.to_thread(
            check_against_base,
            facts,
            await self._base(),
            declared_base_digest=version.base_digest,
            allow_unknown_base=self._allow_unknown_base,
        )
        version = await self.registry.set_state(
            name,
            number,
            VersionState.VALIDATED,
            actor,
            expect=(VersionState.REJECTED, VersionState.REGISTERED),
        )
        return await self._smoke_and_ready(version, actor)

    async def set_pinned(
        self, name: str, number: int, pinned: bool, actor: Actor
    ) -> AdapterVersion:
        version = await self.registry.set_pinned(name, number, pinned, actor)
        self.engines.set_pinned(version.served_name, pinned)
        if pinned and version.routable:
            await self.engines.ensure(version)  # warm-up: a pinned version is always resident
        return version

    async def retire(self, name: str, number: int, actor: Actor) -> AdapterVersion:
        """Stop routing to a version, then drain and unregister it from the engine."""
        version = await self.registry.set_state(name, number, VersionState.RETIRED, actor)
        await self.engines.unregister(version.served_name)
        return version

    async def delete(self, name: str, number: int, actor: Actor) -> AdapterVersion:
        """Forget a version; the registry refuses (409) while an alias points at it."""
        version = await self.registry.delete_version(name, number, actor)
        await self.engines.unregister(version.served_name)
        return version

    async def _smoke_and_ready(self, version: AdapterVersion, actor: Actor) -> AdapterVersion:
        try:
            await self._smoke(version)
        except LoraplexError as exc:
            reason = f"smoke generation failed: {exc.message}"
            await self.registry.set_state(
                version.name, version.version, VersionState.REJECTED, actor, reason=reason
            )
            await self.engines.unregister(version.served_name, drain_timeout_s=0)
            raise SmokeFailed(f"{version.label} rejected: {reason}") from exc
        return await self.registry.set_state(
            version.name,
            version.version,
            VersionState.READY,
            actor,
            expect=(VersionState.VALIDATED,),
        )

    async def _smoke(self, version: AdapterVersion) -> None:
        """One short greedy generation through the engine under the version's served name."""
        lease = await self.engines.acquire(version)
        try:
            payload = {
                "model": lease.served_name,
                "prompt": SMOKE_PROMPT,
                "max_tokens": self._smoke_max_tokens,
                "temperature": 0,
            }
            resp = await lease.engine.post("/v1/completions", orjson.dumps(payload))
        finally:
            lease.release()
        if resp.status != 200:
            raise SmokeFailed(f"the engine answered {resp.status} to a generation")
        try:
            body = orjson.loads(resp.body)
            text = body["choices"][0]["text"]
            completion_tokens = int(body["usage"]["completion_tokens"])
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
            raise SmokeFailed("the engine's answer to a generation was malformed") from None
        if not isinstance(text, str) or completion_tokens < 1:
            raise SmokeFailed("the generation produced no tokens")

    def _get(self, name: str, number: int) -> AdapterVersion:
        version = self.registry.snapshot.versions.get((name, number))
        if version is None:
            raise VersionNotFound(f"no adapter version {name}@{number}")
        return version


def _log_progress(source: str) -> Progress:
    state = {"next": 0}
    shown = redact_url(source)  # presigned URLs carry their signature in the query

    def report(done: int, total: int | None) -> None:
        if done >= state["next"] or (total is not None and done >= total):
            state["next"] = done + (16 << 20)
            log.info("fetching adapter", extra={"source": shown, "bytes": done, "total": total})

    return report
