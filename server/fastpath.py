"""The generation endpoints served straight from ASGI, ahead of FastAPI's router and layers.

Profiling the gateway under load (docs/benchmarks.md, "Profile") showed FastAPI's per-request
layers — route matching over every route, dependency solving, the exit-stack and exception
middlewares — costing about as much CPU as the gateway's own work (auth, parsing, selection,
metrics, relay). `POST /v1/chat/completions` and `POST /v1/completions` are the hot path, so
`GenerationFastPath` answers them itself with the same handler and the same error rendering;
every other request (admin, health, metrics, docs, other methods) goes through FastAPI as
before, and the FastAPI routes stay declared for the OpenAPI schema. It sits inside
RequestIdMiddleware (the request id is set) and inside Starlette's ServerErrorMiddleware
(unexpected errors still become the registered 500 answer).

Two more layers are skipped for those two paths:

- `GatewayApp` (the app class): FastAPI's own `__call__` checks its native OpenTelemetry set-up
  on every request (opentelemetry's global providers, read through the environment) and wraps
  the app in exception-telemetry and body-limit middlewares. The gateway configures neither
  (its telemetry is Prometheus; its body limit is `read_body`'s), so generation POSTs run the
  app's own middleware (request ids, this fast path) inside the same ServerErrorMiddleware, with
  the app's 500 handler, and skip FastAPI's layers; anything else is FastAPI's as before.
- Streams: on an ASGI server of spec < 2.4 (uvicorn says 2.3: sends after a disconnect are
  silently dropped), Starlette runs every StreamingResponse in an anyio task group with a second
  task that waits for `http.disconnect` and then cancels the stream. The fast path does the
  same with one plain asyncio task per stream that cancels the streaming task on a disconnect
  (and is cancelled itself when the stream ends), and lets the response stream as it would on a
  2.4 server. What a disconnect does is unchanged: the relay stops, upstream is closed, the
  request is counted 499.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.asyncexitstack import AsyncExitStackMiddleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
        if isinstance(response, StreamingResponse) and _spec_version(scope) < (2, 4):
            await stream_watching_disconnect(response, scope, receive, send)
        else:
            await response(scope, receive, send)


def _spec_version(scope: Scope) -> tuple[int, ...]:
    asgi: dict[str, Any] = scope.get("asgi") or {}
    return tuple(map(int, str(asgi.get("spec_version", "2.0")).split(".")))


async def stream_watching_disconnect(
    response: StreamingResponse, scope: Scope, receive: Receive, send: Send
) -> None:
    """Send `response`, cancelling it if the client disconnects first (module docstring)."""
    task = asyncio.current_task()
    assert task is not None
    finished = False
    cancelled_by_listener = False
    listener_error: BaseException | None = None

    async def listen() -> None:
        nonlocal cancelled_by_listener, listener_error
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception as exc:  # Starlette's task group would re-raise it from the response
            listener_error = exc
        if not finished:
            cancelled_by_listener = True
            task.cancel()

    async def send_noting_the_end(message: Message) -> None:
        nonlocal finished
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            # The body is complete: from here on (the response's own clean-up included, as
            # outside Starlette's task group) a disconnect, or the server reporting one because
            # the response is complete, cancels nothing.
            finished = True
        await send(message)

    listener = asyncio.get_running_loop().create_task(listen())
    as_2_4 = {**scope, "asgi": {**(scope.get("asgi") or {}), "spec_version": "2.4"}}
    try:
        await response(as_2_4, receive, send_noting_the_end)
    except asyncio.CancelledError:
        if not cancelled_by_listener or task.uncancel() > 0:
            raise  # cancelled from elsewhere too (shutdown): keep cancelling
        if listener_error is not None:
            raise listener_error from None
    finally:
        finished = True
        listener.cancel()


class GatewayApp(FastAPI):
    """FastAPI that takes generation POSTs past its own per-request layers (module docstring);
    that stack is built lazily, once, from the middleware and handlers the app ended up with."""

    _generation_app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in GENERATION_PATHS
            and self.max_body_size is None  # FastAPI's body limit would apply: keep its layer
        ):
            app = self._generation_app
            if app is None:
                app = self._generation_app = self._build_generation_app()
            if self.root_path:
                scope["root_path"] = self.root_path
            scope["app"] = self
            await app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def _build_generation_app(self) -> ASGIApp:
        """The stack FastAPI builds (`build_middleware_stack`) minus its exception-telemetry and
        body-limit layers: ServerErrorMiddleware, the user middleware (request ids, the fast
        path), ExceptionMiddleware and AsyncExitStackMiddleware around the router. The fast
        path answers every request this class routes here; the rest of the stack is the same
        as FastAPI's so that it behaves the same if it is ever reached."""
        error_handler = None
        handlers = {}
        for key, value in self.exception_handlers.items():
            if key in (500, Exception):
                error_handler = value
            else:
                handlers[key] = value
        app: ASGIApp = AsyncExitStackMiddleware(self.router)
        app = ExceptionMiddleware(app, handlers=handlers, debug=self.debug)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return ServerErrorMiddleware(app, handler=error_handler, debug=self.debug)
