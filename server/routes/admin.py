"""Operator API under /admin/v1: adapter load/unload/list, engine status.

Only the admin key is accepted (tenant keys get 403). Every mutating call leaves an audit
line on the `loraplex.audit` logger (the registry issue persists these).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from adapters.catalog import AdapterEntry, UnknownAdapter
from server.pipeline import parse_request, read_body
from server.protocol import openapi_body
from server.state import GatewayState, get_state

audit = logging.getLogger("loraplex.audit")


def require_admin(request: Request) -> GatewayState:
    state = get_state(request)
    state.tenants.authenticate_admin(request.headers.get("authorization"))
    return state


router = APIRouter(prefix="/admin/v1", tags=["admin"], dependencies=[Depends(require_admin)])


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    path: str = Field(min_length=1, max_length=4096)


class AdapterView(BaseModel):
    name: str
    path: str
    state: str
    loaded: bool
    loaded_at: float | None
    last_error: str | None


class AdapterListView(BaseModel):
    object: str = "list"
    data: list[AdapterView]


def _view(e: AdapterEntry) -> AdapterView:
    return AdapterView(
        name=e.name,
        path=e.path,
        state=e.state,
        loaded=e.loaded,
        loaded_at=e.loaded_at,
        last_error=e.last_error,
    )


def _audit(request: Request, action: str, **fields: Any) -> None:
    audit.info(action, extra={"request_id": request.state.request_id, "action": action, **fields})


@router.get("/adapters", response_model=AdapterListView)
async def list_adapters(request: Request) -> AdapterListView:
    state = get_state(request)
    return AdapterListView(data=[_view(e) for e in state.catalog.entries()])


@router.post(
    "/adapters",
    status_code=201,
    response_model=AdapterView,
    openapi_extra=openapi_body(LoadAdapterRequest),
)
async def load_adapter(request: Request) -> AdapterView:
    """Register an adapter directory (on the engine's filesystem) under `name` and load it."""
    state = get_state(request)
    # Read the body here, not as a FastAPI body param: FastAPI decodes JSON before running
    # dependencies, which answered unauthenticated callers 400 instead of 401.
    raw = await read_body(request, state.settings.max_body_bytes)
    body: LoadAdapterRequest = parse_request(raw, LoadAdapterRequest)[1]
    try:
        entry = await state.catalog.load(body.name, body.path)
    except Exception as exc:
        _audit(
            request,
            "adapter.load",
            adapter=body.name,
            path=body.path,
            result="error",
            error=type(exc).__name__,
        )
        raise
    _audit(request, "adapter.load", adapter=body.name, path=body.path, result="ok")
    return _view(entry)


@router.delete("/adapters/{name}", response_model=AdapterView)
async def unload_adapter(name: str, request: Request) -> AdapterView:
    state = get_state(request)
    if state.catalog.get(name) is None:
        raise UnknownAdapter(f"no adapter named {name[:64]!r}")
    entry = await state.catalog.unload(name)
    _audit(request, "adapter.unload", adapter=name, result="ok")
    return _view(entry)


@router.get("/engine")
async def engine_status(request: Request) -> dict[str, Any]:
    state = get_state(request)
    local = state.local_engine
    return {
        "url": state.settings.engine.url,
        "mode": state.settings.engine.mode,
        "up": state.engine_status.up,
        "ready": state.ready,
        "pid": local.pid if local else None,
        "starts": local.starts if local else None,
    }
