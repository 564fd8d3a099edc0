"""OpenAI-compatible routes. Bodies are read raw (not by FastAPI) so limits and errors are ours."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
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
    error_responses,
    openapi_body,
)
from server.relay import FinishingResponse, RequestRecord
from server.state import get_state

router = APIRouter(tags=["openai"])

# A generation answers JSON, or server-sent events when the body asks for `stream: true`.
_GENERATED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The engine's answer (JSON), or its SSE stream when `stream` is true",
        "content": {"application/json": {}, "text/event-stream": {}},
    },
    **error_responses(400, 401, 404, 413, 429, 502, 503, 504),
}
# Header parameters the generation endpoints read (docs/api.md).
_HEADERS = [
    {
        "name": "X-Loraplex-Adapter",
        "in": "header",
        "required": False,
        "description": "adapter to serve (`name`, `name@3`, `name@alias`); wins over `model`",
        "schema": {"type": "string"},
    },
    {
        "name": "X-Loraplex-User",
        "in": "header",
        "required": False,
        "description": "sticky experiment assignment key (default: the API key)",
        "schema": {"type": "string"},
    },
]


def _generation_doc(model: type[BaseModel]) -> dict[str, Any]:
    return {**openapi_body(model), "parameters": _HEADERS}


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
    if not record.stream and not isinstance(response, FinishingResponse):
        record.finish()  # streams finish when the relay closes; JSON answers once sent
    return response


@router.post(
    "/v1/chat/completions",
    responses=_GENERATED,
    openapi_extra=_generation_doc(ChatCompletionRequest),
)
async def chat_completions(request: Request) -> Response:
    return await serve_generation(request, "chat")


@router.post(
    "/v1/completions", responses=_GENERATED, openapi_extra=_generation_doc(CompletionRequest)
)
async def completions(request: Request) -> Response:
    return await serve_generation(request, "completions")


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
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
