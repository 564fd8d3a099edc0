"""Typed lifespan state of one gateway app and its accessor."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from adapters.catalog import AdapterCatalog
from server.auth import TenantDirectory
from server.settings import Settings
from server.telemetry.metrics import GatewayMetrics
from server.upstream import EngineClient

if TYPE_CHECKING:
    from server.engine_process import LocalEngine


@dataclass(slots=True)
class EngineStatus:
    """What the health watcher last saw of the engine."""

    up: bool = False
    reconciled: bool = False
    restarts_seen: int = 0


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    tenants: TenantDirectory
    catalog: AdapterCatalog
    engine: EngineClient
    metrics: GatewayMetrics
    engine_status: EngineStatus = field(default_factory=EngineStatus)
    local_engine: LocalEngine | None = None
    # Set when a request finds an adapter missing on the engine: the watcher reconciles now.
    reconcile_wanted: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ready(self) -> bool:
        return self.engine_status.up and self.engine_status.reconciled


def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.loraplex
    return state
