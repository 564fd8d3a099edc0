"""`create_app(settings)`: builds the FastAPI app; all resources live in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import yaml
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.catalog import AdapterCatalog
from server.auth import hash_key, load_tenants
from server.engine_process import LocalEngine
from server.errors import HTTP_STATUS_CODES, LoraplexError, error_payload
from server.routes import admin, health, openai
from server.settings import Settings
from server.state import GatewayState
from server.telemetry.metrics import GatewayMetrics
from server.upstream import AiohttpEngineClient, EngineClient

log = logging.getLogger("loraplex.app")

EngineFactory = Callable[[Settings], EngineClient]


def create_app(settings: Settings, engine_factory: EngineFactory | None = None) -> FastAPI:
    """Build the gateway. `engine_factory` lets tests swap the engine client for a fake."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = _build_state(settings, engine_factory)
        app.state.loraplex = state
        if settings.engine.mode == "local":
            state.local_engine = LocalEngine(settings.engine)
            await state.local_engine.start()
        watcher = asyncio.create_task(watch_engine(state), name="engine-watcher")
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if state.local_engine is not None:
                await state.local_engine.stop()
            await state.engine.aclose()

    app = FastAPI(
        title="loraplex",
        version="0.1.0",
        summary="OpenAI-compatible multi-adapter LoRA gateway for vLLM",
        lifespan=lifespan,
    )
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    _install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    return app


def _build_state(settings: Settings, engine_factory: EngineFactory | None) -> GatewayState:
    metrics = GatewayMetrics()
    engine = engine_factory(settings) if engine_factory else AiohttpEngineClient(settings.engine)
    admin = []
    if settings.admin_key_sha256:
        admin.append(settings.admin_key_sha256.lower())
    if settings.admin_key is not None:
        admin.append(hash_key(settings.admin_key.get_secret_value()))
    tenants = load_tenants(settings.tenants_file, tuple(admin))
    catalog = AdapterCatalog(engine, settings.engine.served_model_name, metrics.observe_adapter_op)
    for name, path in _read_adapters_file(settings.adapters_file).items():
        catalog.declare(name, path)
    return GatewayState(settings, tenants, catalog, engine, metrics)


def _read_adapters_file(path: Path | None) -> dict[str, str]:
    """Adapters to register at start: YAML `adapters: {name: /abs/path, ...}`."""
    if path is None:
        return {}
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    adapters = raw.get("adapters", {}) if isinstance(raw, dict) else None
    if not isinstance(adapters, dict):
        raise ValueError(f"{path}: expected 'adapters: {{name: path}}'")
    return {str(k): str(v) for k, v in adapters.items()}


async def watch_engine(state: GatewayState) -> None:
    """Track engine health; after it (re)appears, register the desired adapters again."""
    status = state.engine_status
    interval = state.settings.engine.health_interval_s
    while True:
        # Consume the wake-up flag every round: left set, the wait below would spin.
        wanted = state.reconcile_wanted.is_set()
        state.reconcile_wanted.clear()
        up = await state.engine.health()
        if up and (not status.up or not status.reconciled or wanted):
            try:
                await state.catalog.reconcile()
                status.reconciled = True
            except LoraplexError as exc:
                log.warning("adapter reconcile failed", extra={"error": exc.message})
                status.reconciled = False
            except Exception:  # a bug must not stop the watcher (and readiness) for good
                log.exception("adapter reconcile crashed")
                status.reconciled = False
        elif not up and status.up:
            log.warning("engine is down")
            status.restarts_seen += 1
            state.catalog.mark_engine_lost()
            status.reconciled = False
        status.up = up
        state.metrics.engine_up.set(1 if up else 0)
        state.metrics.adapters_resident.set(sum(e.loaded for e in state.catalog.entries()))
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that races with
        # the event being set, and the lifespan's `await watcher` then never returns.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await state.reconcile_wanted.wait()


def _install_error_handlers(app: FastAPI) -> None:
    async def on_loraplex_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoraplexError)
        return Response(
            exc.json_bytes(), exc.status, headers=exc.headers, media_type="application/json"
        )

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        body = error_payload(
            f"Invalid request: {first.get('msg')}",
            "invalid_request_error",
            "invalid_request",
            param,
        )
        return _json(body, 400)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        fallback = ("http_error", "invalid_request_error")
        code, type_ = HTTP_STATUS_CODES.get(exc.status_code, fallback)
        body = error_payload(str(exc.detail), type_, code)
        return _json(body, exc.status_code, dict(exc.headers or {}))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Starlette answers this from outside RequestIdMiddleware: add the id here.
        rid = getattr(request.state, "request_id", None)
        log.exception("unhandled error", exc_info=exc, extra={"request_id": rid})
        body = error_payload("Internal gateway error.", "server_error", "internal_error")
        return _json(body, 500, {"X-Request-Id": rid} if rid else None)

    app.add_exception_handler(LoraplexError, on_loraplex_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


def _json(body: object, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


class RequestIdMiddleware:
    """Gives every request an id (client's `X-Request-Id` if sane) and echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _client_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        raw = rid.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", raw)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _client_request_id(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            text: str = bytes(value).decode("latin-1")
            if 0 < len(text) <= 128 and all(
                c.isascii() and (c.isalnum() or c in "-_.:") for c in text
            ):
                return text
            return None
    return None
