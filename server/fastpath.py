"""The generation endpoints served straight from ASGI, ahead of FastAPI's router.

Profiling the gateway under load (docs/benchmarks.md, "Profile") showed FastAPI's per-request
layers — route matching over every route, dependency solving, the exit-stack and exception
middlewares — costing about as much CPU as the gateway's own work (auth, parsing, selection,
metrics, relay). `POST /v1/chat/completions` and `POST /v1/completions` are the hot path, so
this middleware answers them itself with the same handler and the same error rendering; every
other request (admin, health, metrics, docs, other methods) goes through FastAPI as before, and
the FastAPI routes stay declared for the OpenAPI schema. It sits inside RequestIdMiddleware (the
request id is set) and inside Starlette's ServerErrorMiddleware (unexpected errors still become
the registered 500 answer).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import LoraplexError
from server.routes.openai import serve_generation

GENERATION_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


class GenerationFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = GENERATION_PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            response = await serve_generation(Request(scope, receive), kind)
        except LoraplexError as exc:
            response = Response(
                exc.json_bytes(), exc.status, headers=exc.headers, media_type="application/json"
            )
        await response(scope, receive, send)
