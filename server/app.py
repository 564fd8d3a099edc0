"""`create_app(settings)`: builds the FastAPI app; all resources live in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.archive import ArchiveLimits
from adapters.lifecycle import AdapterLifecycle
from adapters.loader import Residency
from adapters.placement import EnginePool
from adapters.registry import Registry
from adapters.sources import SourceResolver, SourceSettings
from adapters.types import NAME_RE
from adapters.validate import ValidationLimits
from server.auth import TenantDirectory, hash_key, read_tenants_file
from server.base_model import BaseModelCache
from server.engine_process import LocalEngine
from server.engine_watch import watch_engines
from server.errors import HTTP_STATUS_CODES, LoraplexError, error_payload
from server.experiments.controller import start_controller
from server.experiments.service import ExperimentService, FeedbackMemory
from server.experiments.shadow import ShadowMirror
from server.fastpath import GatewayApp, GenerationFastPath
from server.protocol import without_fastapi_422
from server.routes import (
    admin,
    admin_experiments,
    admin_runtime,
    admin_tenants,
    feedback,
    health,
    openai,
)
from server.routes.admin_drift import router as drift_router
from server.routes.admin_drift import start_drift
from server.routing import AutoRouting
from server.settings import Settings
from server.state import GatewayState
from server.telemetry.metrics import GatewayMetrics
from server.upstream import AiohttpEngineClient, EngineClient, engine_session

log = logging.getLogger("loraplex.app")

EngineFactory = Callable[[Settings], EngineClient]


def create_app(settings: Settings, engine_factory: EngineFactory | None = None) -> FastAPI:
    """Build the gateway. `engine_factory` lets tests swap the engine client for a fake."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        session = None if engine_factory else engine_session(settings.engine)
        state = await build_state(settings, engine_factory, session)
        app.state.loraplex = state
        try:
            app.state.loraplex_router = AutoRouting.start(settings)  # model="auto" (None: off)
            await start_drift(state, app.state.loraplex_router)
            if settings.engine.mode == "local":
                state.local_engine = LocalEngine(settings.engine)
                await state.local_engine.start()
            bootstrap = read_adapters_file(settings.adapters_file)
            watcher = asyncio.create_task(watch_engines(state, bootstrap), name="engine-watcher")
            state.controller = start_controller(state)
            controller = asyncio.create_task(state.controller.run(), name="experiments")
            try:
                yield
            finally:
                for task in (watcher, controller):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await state.controller.close()
                if state.local_engine is not None:
                    await state.local_engine.stop()
        finally:
            for member in state.engines:
                await member.client.aclose()
            if session is not None:
                await session.close()
            await state.lifecycle.aclose()
            await state.registry.close()

    app = GatewayApp(  # FastAPI; generation POSTs skip its per-request layers (fastpath.py)
        title="loraplex",
        version="0.1.0",
        summary="OpenAI-compatible multi-adapter LoRA gateway for vLLM",
        lifespan=lifespan,
    )
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(admin_tenants.router)
    app.include_router(drift_router)
    app.include_router(admin_experiments.router)
    app.include_router(admin_runtime.router)
    app.include_router(feedback.router)
    app.include_router(health.router)
    _install_error_handlers(app)
    app.add_middleware(GenerationFastPath)  # inner: runs after the request id is set
    app.add_middleware(RequestIdMiddleware)
    return app


async def build_state(
    settings: Settings,
    engine_factory: EngineFactory | None,
    session: aiohttp.ClientSession | None = None,
) -> GatewayState:
    """Open the registry (migrating it), seed bootstrap tenants, wire engines + lifecycle."""
    metrics = GatewayMetrics()
    admin = []
    if settings.admin_key_sha256:
        admin.append(settings.admin_key_sha256.lower())
    if settings.admin_key is not None:
        admin.append(hash_key(settings.admin_key.get_secret_value()))
    seed = read_tenants_file(settings.tenants_file)
    read_adapters_file(settings.adapters_file)  # refuse a bad file before anything starts
    reg = settings.registry
    registry = await Registry.open(
        reg.url, interrupted_after_s=reg.interrupted_after_s, timeout_s=reg.timeout_s
    )
    try:
        await registry.seed_tenants(seed)
        TenantDirectory.from_records(registry.snapshot.tenants.values(), tuple(admin), "")
    except BaseException:
        await registry.close()
        raise
    engines = EnginePool(
        partial(_connect, settings, engine_factory, session),
        lambda client: Residency(
            client,
            reg.budget,
            drain_timeout_s=reg.drain_timeout_s,
            retry_after_s=settings.engine.retry_after_s,
            observer=metrics.observe_residency,
        ),
        [] if settings.engine.discovery_dns else settings.engine.engine_urls,
        base_name=settings.engine.served_model_name,
        budget=reg.budget,
        spill_threshold=settings.engine.spill_threshold,
        retry_after_s=settings.engine.retry_after_s,
        on_pick=metrics.observe_pick,
    )
    lifecycle = AdapterLifecycle(
        registry,
        engines,
        SourceResolver(
            SourceSettings(
                cache_dir=reg.cache_dir,
                limits=ArchiveLimits(
                    max_archive_bytes=reg.max_archive_bytes,
                    max_extracted_bytes=reg.max_extracted_bytes,
                ),
                s3_endpoint_url=reg.s3_endpoint_url,
            )
        ),
        ValidationLimits(
            max_rank=settings.engine.max_lora_rank, max_adapter_bytes=reg.max_adapter_bytes
        ),
        BaseModelCache(reg.base_model_dir or settings.engine.model),
        allow_unknown_base=reg.allow_unknown_base,
    )
    exp = settings.experiments
    return GatewayState(
        settings,
        registry,
        engines,
        lifecycle,
        metrics,
        tuple(admin),
        ExperimentService(metrics, FeedbackMemory(exp.feedback_max_entries, exp.feedback_ttl_s)),
        ShadowMirror(exp.shadow_max_concurrency),
    )


def _connect(
    settings: Settings,
    factory: EngineFactory | None,
    session: aiohttp.ClientSession | None,
    url: str,
) -> EngineClient:
    """A client for the engine at `url`: the real one over the shared session, or the test
    factory's (called with settings whose engine url is `url`)."""
    if factory is not None:
        engine = settings.engine.model_copy(update={"url": url})
        return factory(settings.model_copy(update={"engine": engine}))
    return AiohttpEngineClient(settings.engine, base_url=url, session=session)


def read_adapters_file(path: Path | None) -> dict[str, str]:
    """Bootstrap adapters: YAML `adapters: {name: source}`, registered once the engine is up
    (idempotent: a ready version with the same content is reused)."""
    if path is None:
        return {}
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    adapters = raw.get("adapters", {}) if isinstance(raw, dict) else None
    if not isinstance(adapters, dict):
        raise ValueError(f"{path}: expected 'adapters: {{name: path}}'")
    bad = [str(k) for k in adapters if not NAME_RE.match(str(k))]
    if bad:
        raise ValueError(f"{path}: adapter names use 1-64 characters from [A-Za-z0-9._-]: {bad}")
    return {str(k): str(v) for k, v in adapters.items()}


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

    # What on_validation_error answers (400, error shape) is what the OpenAPI document says.
    openapi = app.openapi

    def documented() -> dict[str, Any]:
        return without_fastapi_422(openapi())  # FastAPI caches the document it returns

    app.openapi = documented  # type: ignore[method-assign]
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
