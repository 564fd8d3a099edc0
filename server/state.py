"""Typed lifespan state of one gateway app and its accessor."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from adapters.lifecycle import AdapterLifecycle
from adapters.placement import EnginePool
from adapters.registry import Registry
from server.auth import TenantDirectory
from server.experiments.service import ExperimentService
from server.experiments.shadow import ShadowMirror
from server.quotas import QuotaBook
from server.settings import Settings
from server.telemetry.drift import DriftMonitor
from server.telemetry.metrics import GatewayMetrics

if TYPE_CHECKING:
    from server.engine_process import LocalEngine
    from server.experiments.controller import ExperimentController


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """What the health watcher last saw of the engines, in sum."""

    up: bool  # at least one engine answers
    reconciled: bool  # at least one is up with its adapters registered
    restarts_seen: int


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    registry: Registry
    engines: EnginePool
    lifecycle: AdapterLifecycle
    metrics: GatewayMetrics
    admin_digests: tuple[str, ...]
    experiments: ExperimentService
    shadow: ShadowMirror
    quotas: QuotaBook = field(default_factory=QuotaBook)
    local_engine: LocalEngine | None = None
    drift: DriftMonitor | None = None  # traffic drift per tenant (None: off)
    controller: ExperimentController | None = None
    # Set when a request finds an adapter missing on an engine, or an engine unreachable: the
    # watcher probes and reconciles now.
    reconcile_wanted: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[object]] = field(default_factory=set)
    _tenants: TenantDirectory | None = None
    _tenants_generation: int = -2

    @property
    def ready(self) -> bool:
        return self.engines.ready

    @property
    def engine_status(self) -> EngineStatus:
        pool = self.engines
        return EngineStatus(pool.up, pool.ready, sum(m.restarts_seen for m in pool))

    def background(self, work: Coroutine[object, object, object]) -> None:
        """Run `work` without awaiting it (kept referenced until done)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def tenants(self) -> TenantDirectory:
        """Tenants of the current registry snapshot (rebuilt only when the snapshot changes)."""
        snap = self.registry.snapshot
        if self._tenants is None or self._tenants_generation != snap.generation:
            self._tenants = TenantDirectory.from_records(
                snap.tenants.values(), self.admin_digests, self.settings.engine.served_model_name
            )
            self._tenants_generation = snap.generation
        return self._tenants


def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.loraplex
    return state
