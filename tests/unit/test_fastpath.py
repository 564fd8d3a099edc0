"""The ASGI fast path serves POSTs to the generation endpoints; everything else (other methods,
other paths, the OpenAPI schema) is still FastAPI's, and errors keep their shape and ids."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.fastpath import (
    GENERATION_PATHS,
    GatewayApp,
    GenerationFastPath,
    stream_watching_disconnect,
)
from tests.unit.helpers import ACME_KEY, Gateway, assert_error, auth, wait_until


def test_fast_path_sits_inside_the_request_id_middleware(gw: Gateway) -> None:
    names = [getattr(m.cls, "__name__", "") for m in gw.app.user_middleware]
    assert names.index("RequestIdMiddleware") < names.index(GenerationFastPath.__name__)


async def test_generation_posts_are_answered_with_ids_and_headers(gw: Gateway) -> None:
    for path in GENERATION_PATHS:
        body = (
            {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "x"}
        )
        resp = await gw.client.post(
            path, json=body, headers={**auth(ACME_KEY), "X-Request-Id": "r-1"}
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-request-id"] == "r-1"
        assert resp.headers["x-loraplex-adapter"]


async def test_errors_keep_the_openai_shape(gw: Gateway) -> None:
    resp = await gw.client.post("/v1/chat/completions", content=b"{", headers=auth(ACME_KEY))
    assert_error(resp, 400, "invalid_json")
    assert resp.headers["x-request-id"]
    resp = await gw.client.post("/v1/chat/completions", json={"messages": []})
    assert_error(resp, 401, "invalid_api_key", type_="authentication_error")


@pytest.mark.parametrize("method", ["GET", "PUT"])
async def test_other_methods_fall_through_to_fastapi(gw: Gateway, method: str) -> None:
    resp = await gw.client.request(method, "/v1/chat/completions", headers=auth(ACME_KEY))
    assert resp.status_code == 405


async def test_openapi_still_documents_the_generation_routes(gw: Gateway) -> None:
    paths = (await gw.client.get("/openapi.json")).json()["paths"]
    assert set(GENERATION_PATHS) <= set(paths)


# --- streams without Starlette's per-response task group -----------------------------------


class _Peer:
    """receive/send of one streamed response; `gone` makes receive report a disconnect."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)


def _scope() -> Scope:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "headers": []}


async def _events(stall: asyncio.Event, closed: list[bool]) -> AsyncIterator[bytes]:
    try:
        yield b"data: 1\n\n"
        await stall.wait()
        yield b"data: 2\n\n"
    finally:
        closed.append(True)


async def test_a_stream_ends_normally_and_its_listener_goes_away() -> None:
    peer, stall, closed = _Peer(), asyncio.Event(), list[bool]()
    stall.set()
    response = StreamingResponse(_events(stall, closed))
    await stream_watching_disconnect(response, _scope(), peer.receive, peer.send)
    assert [m.get("body") for m in peer.sent[1:]] == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert closed == [True]
    await asyncio.sleep(0)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert all(t.done() for t in others)  # the disconnect listener was cancelled


async def test_a_disconnect_cancels_the_stream_and_returns_normally() -> None:
    peer, stall, closed = _Peer(), asyncio.Event(), list[bool]()
    response = StreamingResponse(_events(stall, closed))
    task = asyncio.create_task(
        stream_watching_disconnect(response, _scope(), peer.receive, peer.send)
    )
    await wait_until(lambda: len(peer.sent) == 2, what="first event")
    peer.gone.set()
    async with asyncio.timeout(3):
        await task  # no CancelledError: the cancellation was the listener's own
    assert closed == [True]
    assert not task.cancelled()
    assert task.cancelling() == 0


async def test_a_cancellation_from_elsewhere_still_cancels() -> None:
    peer, stall, closed = _Peer(), asyncio.Event(), list[bool]()
    response = StreamingResponse(_events(stall, closed))
    task = asyncio.create_task(
        stream_watching_disconnect(response, _scope(), peer.receive, peer.send)
    )
    await wait_until(lambda: len(peer.sent) == 2, what="first event")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed == [True]


async def test_the_end_of_the_body_is_not_cancelled_by_the_server_reporting_it() -> None:
    """uvicorn answers receive() with http.disconnect once the response is complete; clean-up
    that still awaits after the last body message must not be cancelled by that."""
    peer, stall, closed = _Peer(), asyncio.Event(), list[bool]()
    stall.set()
    cleaned: list[bool] = []

    async def send(message: Message) -> None:
        peer.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            peer.gone.set()  # what uvicorn does once the response is complete

    class SlowCleanUp(StreamingResponse):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                for _ in range(3):
                    await asyncio.sleep(0)  # the listener gets to run meanwhile
                cleaned.append(True)

    response = SlowCleanUp(_events(stall, closed))
    await stream_watching_disconnect(response, _scope(), peer.receive, send)
    assert cleaned == [True]
    assert closed == [True]


# --- GatewayApp: generation POSTs skip FastAPI's own per-request layers -----------------------


def _tiny_app() -> tuple[GatewayApp, list[str]]:
    """A GatewayApp with one user middleware that notes each request, a generation route that
    fails on demand, and a 500 handler; no GenerationFastPath, so requests reach the routes
    (through the rest of the stack GatewayApp builds)."""
    seen: list[str] = []
    app = GatewayApp()

    class Note:
        def __init__(self, inner: ASGIApp) -> None:
            self.inner = inner

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            seen.append(scope["path"])
            await self.inner(scope, receive, send)

    @app.post("/v1/completions")
    async def completions(fail: bool = False) -> dict[str, bool]:
        if fail:
            raise RuntimeError("boom")
        return {"ok": True}

    @app.get("/other")
    async def other() -> dict[str, bool]:
        return {"ok": True}

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        return Response(b"custom 500", 500)

    app.add_exception_handler(Exception, on_unexpected)
    app.add_middleware(Note)
    return app, seen


async def test_gateway_app_skips_fastapis_telemetry_check_for_generation_posts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, seen = _tiny_app()
    checks: list[bool] = []

    def enabled() -> bool:
        checks.append(True)
        return False

    monkeypatch.setattr(app._native_telemetry, "enabled", enabled)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/v1/completions")).json() == {"ok": True}
        assert checks == []  # not through FastAPI.__call__ ...
        assert seen == ["/v1/completions"]  # ... but through the app's middleware
        assert (await client.get("/other")).json() == {"ok": True}
        assert checks == [True]
        assert seen == ["/v1/completions", "/other"]


async def test_gateway_app_answers_unexpected_errors_with_the_apps_500_handler() -> None:
    app, _ = _tiny_app()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        resp = await client.post("/v1/completions", params={"fail": "true"})
    assert (resp.status_code, resp.content) == (500, b"custom 500")
    transport = httpx.ASGITransport(app=app)  # and the error is re-raised to the server
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(RuntimeError, match="boom"):
            await client.post("/v1/completions", params={"fail": "true"})
