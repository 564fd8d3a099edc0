"""OpenAI-compatible routes. Bodies are read raw (not by FastAPI) so limits and errors are ours."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from adapters.types import AdapterRef
from server.errors import LoraplexError
from server.pipeline import generate
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    openapi_body,
)
from server.relay import RequestRecord
from server.state import get_state

router = APIRouter(tags=["openai"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": desc}
    for code, desc in [
        (400, "Malformed JSON or invalid fields"),
        (401, "Missing or unknown API key"),
        (404, "Unknown model or not entitled"),
        (413, "Body too large"),
        (502, "Engine error"),
        (503, "Engine unavailable (Retry-After)"),
        (504, "Engine timeout"),
    ]
}


async def serve_generation(request: Request, kind: str) -> Response:
    """Authenticate, run the pipeline, account the request (also the ASGI fast path's entry)."""
    state = get_state(request)
    record = RequestRecord(
        state.metrics, request.state.request_id, "anonymous", kind, stream=False, drift=state.drift
    )
    try:
        tenant = state.tenants.authenticate(request.headers.get("authorization"))
        record.admit(tenant.name)
        response = await generate(state, request, tenant, kind, record)
    except BaseException as exc:
        if isinstance(exc, LoraplexError):
            record.fail(exc)
        elif isinstance(exc, Exception):
            record.status, record.error_code = 500, "internal_error"
        else:  # cancelled: the client went away while we waited for the engine
            record.status, record.error_code = 499, "client_disconnected"
        record.finish()
        raise
    if not record.stream:
        record.finish()  # streams finish when the relay closes
    return response


@router.post(
    "/v1/chat/completions", responses=_ERRORS, openapi_extra=openapi_body(ChatCompletionRequest)
)
async def chat_completions(request: Request) -> Response:
    return await serve_generation(request, "chat")


@router.post("/v1/completions", responses=_ERRORS, openapi_extra=openapi_body(CompletionRequest))
async def completions(request: Request) -> Response:
    return await serve_generation(request, "completions")


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> ModelList:
    """Only the models this tenant may use that are servable right now."""
    state = get_state(request)
    tenant = state.tenants.authenticate(request.headers.get("authorization"))
    now = int(time.time())
    snap = state.registry.snapshot
    base = state.settings.engine.served_model_name
    names = sorted(
        a
        for a in tenant.adapters
        if a == base or ((v := snap.resolve(AdapterRef(a))) is not None and v.routable)
    )
    return ModelList(data=[ModelCard(id=n, created=now) for n in names])
