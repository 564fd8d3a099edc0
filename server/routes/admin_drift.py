"""Operator API for traffic drift under /admin/v1/drift, and the monitor's place in the app.

- `GET /admin/v1/drift`: per tenant, the reference and current windows, the statistics, the
  alarm levels (value / threshold) and alarms, plus the settings they were judged with.
- `POST /admin/v1/drift/{tenant}/reference` with `{"from": "current"}`: the current window
  becomes the tenant's reference (after a deliberate change of traffic: a new customer segment,
  a retrained router); with `{"reset": true}`: the tenant's next requests form a new first-N
  reference.

References are stored in the registry (audited, shared by replicas): the automatic first-N one
when it completes, and the ones set here. Each replica loads them at start and follows changes
made by others when the registry generation moves (`sync_drift`).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request

from adapters.registry import SYSTEM, TenantNotFound
from server.errors import Conflict
from server.protocol import error_responses, openapi_body
from server.routes.admin_common import ADMIN_AUTH_ERRORS, actor, json_body, require_admin
from server.routing import AutoRouting
from server.state import GatewayState, get_state
from server.telemetry.drift import DriftMonitor, WindowTooSmall
from server.telemetry.drift_export import report

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=ADMIN_AUTH_ERRORS,
)
log = logging.getLogger("loraplex.drift")


class ReferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: Literal["current"] | None = Field(
        None, alias="from", description='"current": the current window becomes the reference'
    )
    reset: bool = Field(False, description="collect a new reference from the next requests")

    @model_validator(mode="after")
    def _one(self) -> ReferenceRequest:
        if (self.from_ is not None) == self.reset:
            raise ValueError('give either "from": "current" or "reset": true')
        return self


def _monitor(state: GatewayState) -> DriftMonitor:
    if state.drift is None:
        raise Conflict(
            "Drift monitoring is off (LORAPLEX_DRIFT__ENABLED=false).", code="drift_disabled"
        )
    return state.drift


def _view(monitor: DriftMonitor, tenant: str) -> dict[str, Any]:
    windows = monitor.windows(tenant)
    if windows is None:  # not seen since start: nothing collected yet
        return {"tenant": tenant, "reference": None, "windows": None, "alarms": {}}
    return report(windows)


@router.get("/drift")
async def drift(request: Request) -> dict[str, Any]:
    """Every observed tenant's drift windows, statistics and alarms."""
    state = get_state(request)
    settings = state.settings.drift.model_dump(mode="json")
    if state.drift is None:
        return {"object": "drift", "enabled": False, "settings": settings, "data": []}
    state.drift.refresh()
    data = [_view(state.drift, name) for name in state.drift.tenants()]
    return {"object": "drift", "enabled": True, "settings": settings, "data": data}


@router.post(
    "/drift/{tenant}/reference",
    openapi_extra=openapi_body(ReferenceRequest),
    responses=error_responses(400, 404, 409, 413, 503),
)
async def set_reference(tenant: str, request: Request) -> dict[str, Any]:
    """Set (from the current window) or reset a tenant's drift reference; audited."""
    state = get_state(request)
    body = await json_body(request, ReferenceRequest)
    if tenant not in state.registry.snapshot.tenants:
        raise TenantNotFound(f"no tenant named {tenant[:64]!r}")
    monitor = _monitor(state)
    if body.reset:
        await state.registry.put_drift_reference(tenant, None, actor(request))
        monitor.reset(tenant)
    else:
        try:
            payload = monitor.current_payload(tenant)
        except WindowTooSmall as exc:
            raise Conflict(str(exc), code="drift_window_too_small") from None
        await state.registry.put_drift_reference(tenant, payload, actor(request))
        monitor.load_reference(tenant, payload)
    monitor.refresh()
    return _view(monitor, tenant)


async def start_drift(state: GatewayState, auto: AutoRouting | None) -> DriftMonitor | None:
    """The app's monitor (None when off), with the references the registry holds."""
    settings = state.settings.drift
    if not settings.enabled:
        return None

    def persist(tenant: str, payload: dict[str, Any]) -> None:
        state.background(_store_first_n(state, tenant, payload))

    monitor = DriftMonitor(
        state.metrics,
        settings,
        list(auto.policy.domains) if auto is not None else None,
        tenants=lambda: state.registry.snapshot.tenants,
        on_reference=persist,
    )
    state.drift = monitor
    await sync_drift(state)
    return monitor


async def sync_drift(state: GatewayState) -> None:
    """Adopt the references stored in the registry (at start, and when another replica may
    have changed them). A database hiccup keeps the references in memory."""
    if state.drift is None:
        return
    try:
        stored = await state.registry.drift_references()
    except Exception:
        log.warning("drift references could not be read", exc_info=True)
        return
    state.drift.sync_references(stored)


async def _store_first_n(state: GatewayState, tenant: str, payload: dict[str, Any]) -> None:
    windows = state.drift.windows(tenant) if state.drift is not None else None
    if windows is None or windows.ref_id != payload["id"]:
        return  # replaced (set or reset by an operator) before this task ran
    try:
        await state.registry.put_drift_reference(tenant, payload, SYSTEM)
    except Exception:
        log.warning("drift reference not stored", exc_info=True, extra={"tenant": tenant})
        return
    if state.drift is not None:
        state.drift.mark_persisted(tenant, payload["id"])
