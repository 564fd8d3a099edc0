"""Liveness, readiness and Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from server.errors import EngineUnavailable
from server.protocol import error_responses
from server.state import get_state

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (says nothing about the engine)."""
    return {"status": "ok"}


@router.get("/readyz", responses=error_responses(503))
async def readyz(request: Request) -> Response:
    """Ready when an engine answers now and the desired adapters are registered on it.

    The engines the watcher holds ready are probed live (one cheap GET each, until one
    answers) rather than trusting the watcher's last poll, so an engine that died a moment ago
    takes this replica out of rotation at once when it was the only one.
    """
    state = get_state(request)
    for member in state.engines:
        if member.up and member.reconciled:
            if await member.client.health():
                return JSONResponse({"status": "ready"})
            state.reconcile_wanted.set()  # wake the watcher: it notices the loss right away
    up = state.engine_status.up and not state.ready
    what = "adapters not registered yet" if up else "engine not reachable"
    raise EngineUnavailable(
        f"Not ready: {what}.", retry_after_s=state.settings.engine.retry_after_s
    )


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
