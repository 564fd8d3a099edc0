"""AiohttpEngineClient against a tiny real HTTP server on 127.0.0.1 (aiohttp.web)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import orjson
import pytest
from aiohttp import web

from server.errors import (
    AdapterLoadFailed,
    EngineUnavailable,
    LoraplexError,
    UpstreamError,
    UpstreamTimeout,
)
from server.settings import EngineSettings
from server.upstream import AiohttpEngineClient, UpstreamStream

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    path: str
    content_type: str
    body: bytes


@dataclass
class EngineServer:
    """Routes (method, path) to per-test handlers and records every request."""

    port: int = 0
    handlers: dict[tuple[str, str], Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            Seen(request.method, request.path, request.headers.get("Content-Type", ""), body)
        )
        handler = self.handlers.get((request.method, request.path))
        if handler is None:
            return web.Response(status=404, text="no handler")
        return await handler(request)

    def json(self, method: str, path: str, status: int, obj: object) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(
                status=status, body=orjson.dumps(obj), content_type="application/json"
            )

        self.handlers[(method, path)] = handler

    def sse(self, path: str, *chunks: bytes, then: str = "end") -> None:
        """Stream raw chunks (drained one by one); then "end", "drop" or "stall"."""

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for chunk in chunks:
                await resp.write(chunk)
            if then == "drop":
                assert request.transport is not None
                request.transport.close()
                return resp
            if then == "stall":
                await self.release.wait()
            await resp.write_eof()
            return resp

        self.handlers[("POST", path)] = handler


@pytest.fixture
async def server() -> AsyncIterator[EngineServer]:
    srv = EngineServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", srv.dispatch)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    srv.port = runner.addresses[0][1]
    try:
        yield srv
    finally:
        srv.release.set()
        await runner.cleanup()


def _settings(url: str, **kw: float) -> EngineSettings:
    return EngineSettings(url=url, **{"connect_timeout_s": 1.0, "read_timeout_s": 2.0, **kw})


@pytest.fixture
async def client(server: EngineServer) -> AsyncIterator[AiohttpEngineClient]:
    c = AiohttpEngineClient(_settings(server.url))
    try:
        yield c
    finally:
        await c.aclose()


async def _collect(stream: UpstreamStream) -> list[bytes]:
    out = []
    async with asyncio.timeout(3):
        async for data in stream.events():
            out.append(data)
    return out


async def _drain(stream: UpstreamStream, into: list[bytes]) -> None:
    async with asyncio.timeout(3):
        async for data in stream.events():
            into.append(data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- plain requests ------------------------------------------------------------------------------


async def test_post_sends_payload_and_returns_status_and_body(
    server: EngineServer, client: AiohttpEngineClient
) -> None:
    server.json("POST", "/v1/chat/completions", 200, {"id": "x", "choices": []})
    payload = b'{"model":"legal","messages":[]}'
    resp = await client.post("/v1/chat/completions", payload)
    assert resp.status == 200
    assert orjson.loads(resp.body) == {"id": "x", "choices": []}
    [seen] = server.seen
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/chat/completions", payload)
    assert seen.content_type == "application/json"


async def test_post_returns_error_statuses_unchanged(
    server: EngineServer, client: AiohttpEngineClient
) -> None:
    server.json("POST", "/v1/completions", 404, {"error": {"message": "nope"}})
    resp = await client.post("/v1/completions", b"{}")
    assert resp.status == 404
    assert b"nope" in resp.body


async def test_trailing_slash_in_url_is_stripped(server: EngineServer) -> None:
    server.json("POST", "/v1/completions", 200, {})
    c = AiohttpEngineClient(_settings(server.url + "/"))
    try:
        assert (await c.post("/v1/completions", b"{}")).status == 200
    finally:
        await c.aclose()
    assert server.seen[0].path == "/v1/completions"


# -- SSE parsing ---------------------------------------------------------------------------------


async def test_sse_parsing(server: EngineServer, client: AiohttpEngineClient) -> None:
    server.sse(
        "/v1/chat/completions",
        b'data: {"a":1}\n\n',
        b": keep-alive comment\n\n",
        b"data: line1\ndata: line2\n\n",
        b"data:nospace\r\n\r\n",
        b"event: message\nid: 7\nretry: 10\ndata: x\n\n",
        b"data:  two-spaces\n\n",
        b'data: {"split":',  # one event split over three writes
        b' "across"}\n',
        b"\n",
        b"data: crlf-1\r\ndata: crlf-2\r\n\r\n",
        b"\n\n\n",  # stray blank lines are not events
        b"data: [DONE]\n\n",
    )
    stream = await client.open_stream("/v1/chat/completions", b"{}")
    assert stream.status == 200
    events = await _collect(stream)
    assert events == [
        b'{"a":1}',
        b"line1\nline2",
        b"nospace",
        b"x",
        b" two-spaces",
        b'{"split": "across"}',
        b"crlf-1\ncrlf-2",
        b"[DONE]",
    ]
    await stream.aclose()


async def test_sse_last_event_without_blank_line(
    server: EngineServer, client: AiohttpEngineClient
) -> None:
    server.sse("/v1/completions", b"data: a\n\n", b"data: tail")
    stream = await client.open_stream("/v1/completions", b"{}")
    assert await _collect(stream) == [b"a", b"tail"]
    await stream.aclose()


async def test_sse_large_event(server: EngineServer, client: AiohttpEngineClient) -> None:
    big = b"x" * 300_000
    server.sse("/v1/completions", b"data: " + big + b"\n\n", b"data: [DONE]\n\n")
    stream = await client.open_stream("/v1/completions", b"{}")
    assert await _collect(stream) == [big, b"[DONE]"]
    await stream.aclose()


async def test_sse_oversized_line_is_a_gateway_error(
    server: EngineServer, client: AiohttpEngineClient
) -> None:
    """Over aiohttp's line limit: a LoraplexError, never a raw aiohttp exception."""
    server.sse("/v1/completions", b"data: " + b"x" * 2_000_000 + b"\n\n", b"data: [DONE]\n\n")
    stream = await client.open_stream("/v1/completions", b"{}")
    with pytest.raises(UpstreamError):
        await _collect(stream)
    await stream.aclose()


async def test_stream_error_status_and_body(
    server: EngineServer, client: AiohttpEngineClient
) -> None:
    server.json("POST", "/v1/chat/completions", 400, {"error": {"message": "bad"}})
    stream = await client.open_stream("/v1/chat/completions", b"{}")
    assert stream.status == 400
    assert orjson.loads(await stream.read_body()) == {"error": {"message": "bad"}}
    await stream.aclose()


async def test_aclose_mid_stream_drops_the_connection(server: EngineServer) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b'data: {"tick":1}\n\n')
                await asyncio.sleep(0.005)
        except (ConnectionError, asyncio.CancelledError):
            server.client_gone.set()
            raise

    server.handlers[("POST", "/v1/completions")] = endless
    c = AiohttpEngineClient(_settings(server.url))
    try:
        stream = await c.open_stream("/v1/completions", b"{}")
        events = stream.events()
        assert await anext(events) == b'{"tick":1}'
        await stream.aclose()
        await asyncio.wait_for(server.client_gone.wait(), 3)
    finally:
        await c.aclose()


# -- transport failures --------------------------------------------------------------------------


async def test_connection_refused_is_engine_unavailable() -> None:
    c = AiohttpEngineClient(EngineSettings(url=f"http://127.0.0.1:{_free_port()}", retry_after_s=7))
    try:
        with pytest.raises(EngineUnavailable) as info:
            await c.post("/v1/completions", b"{}")
        assert info.value.headers == {"Retry-After": "7"}
        with pytest.raises(EngineUnavailable):
            await c.open_stream("/v1/completions", b"{}")
        with pytest.raises(EngineUnavailable):
            await c.served_models()
        with pytest.raises(EngineUnavailable):
            await c.load_adapter("a", "/x")
        with pytest.raises(EngineUnavailable):
            await c.unload_adapter("a")
        assert await c.health() is False
    finally:
        await c.aclose()


async def test_slow_answer_is_upstream_timeout(server: EngineServer) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await server.release.wait()
        return web.Response(text="{}")

    server.handlers[("POST", "/v1/completions")] = slow
    c = AiohttpEngineClient(_settings(server.url, read_timeout_s=0.1))
    try:
        with pytest.raises(UpstreamTimeout):
            await c.post("/v1/completions", b"{}")
        with pytest.raises(UpstreamTimeout):
            await c.open_stream("/v1/completions", b"{}")
    finally:
        await c.aclose()


async def test_stalled_stream_is_upstream_timeout(server: EngineServer) -> None:
    server.sse("/v1/completions", b"data: first\n\n", then="stall")
    c = AiohttpEngineClient(_settings(server.url, read_timeout_s=0.1))
    try:
        stream = await c.open_stream("/v1/completions", b"{}")
        got: list[bytes] = []
        with pytest.raises(UpstreamTimeout):
            await _drain(stream, got)
        assert got == [b"first"]
        await stream.aclose()
    finally:
        await c.aclose()


async def test_dropped_connection_mid_stream_is_an_error(
    server: EngineServer, client: AiohttpEngineClient
) -> None:
    server.sse("/v1/completions", b"data: one\n\n", then="drop")
    stream = await client.open_stream("/v1/completions", b"{}")
    got: list[bytes] = []
    with pytest.raises(LoraplexError) as info:
        await _drain(stream, got)
    assert got == [b"one"]
    assert isinstance(info.value, EngineUnavailable | UpstreamError)
    await stream.aclose()


async def test_dropped_connection_before_answer(
    server: EngineServer, client: AiohttpEngineClient
) -> None:
    async def drop(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        await server.release.wait()
        return web.Response()

    server.handlers[("POST", "/v1/completions")] = drop
    with pytest.raises(EngineUnavailable):
        await client.post("/v1/completions", b"{}")


# -- health and models ---------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "up"), [(200, True), (503, False), (500, False)])
async def test_health(
    server: EngineServer, client: AiohttpEngineClient, status: int, up: bool
) -> None:
    server.json("GET", "/health", status, {})
    assert await client.health() is up


async def test_served_models(server: EngineServer, client: AiohttpEngineClient) -> None:
    server.json(
        "GET", "/v1/models", 200, {"object": "list", "data": [{"id": "base"}, {"id": "legal"}]}
    )
    assert await client.served_models() == {"base", "legal"}


async def test_served_models_error_status(
    server: EngineServer, client: AiohttpEngineClient
) -> None:
    server.json("GET", "/v1/models", 500, {})
    with pytest.raises(UpstreamError):
        await client.served_models()


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"data": [{"name": "x"}]}'])
async def test_served_models_garbage_is_upstream_error(
    server: EngineServer, client: AiohttpEngineClient, body: bytes
) -> None:
    async def garbage(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    server.handlers[("GET", "/v1/models")] = garbage
    with pytest.raises(UpstreamError):
        await client.served_models()


# -- adapter API ---------------------------------------------------------------------------------


def _error(message: str) -> dict[str, object]:
    return {"error": {"message": message, "type": "BadRequestError", "code": 400}}


async def test_load_adapter_ok(server: EngineServer, client: AiohttpEngineClient) -> None:
    server.json("POST", "/v1/load_lora_adapter", 200, {})
    await client.load_adapter("legal", "/adapters/legal")
    [seen] = server.seen
    assert orjson.loads(seen.body) == {"lora_name": "legal", "lora_path": "/adapters/legal"}


async def test_load_adapter_already_loaded_reloads_in_place(
    server: EngineServer, client: AiohttpEngineClient
) -> None:
    answers = [(400, _error("The lora adapter 'legal' has already been loaded.")), (200, {})]

    async def handler(request: web.Request) -> web.StreamResponse:
        status, obj = answers.pop(0)
        return web.Response(status=status, body=orjson.dumps(obj))

    server.handlers[("POST", "/v1/load_lora_adapter")] = handler
    await client.load_adapter("legal", "/new/path")
    bodies = [orjson.loads(s.body) for s in server.seen]
    assert bodies == [
        {"lora_name": "legal", "lora_path": "/new/path"},
        {"lora_name": "legal", "lora_path": "/new/path", "load_inplace": True},
    ]


@pytest.mark.parametrize("status", [400, 404, 422, 500])
async def test_load_adapter_refused(
    server: EngineServer, client: AiohttpEngineClient, status: int
) -> None:
    server.json("POST", "/v1/load_lora_adapter", status, _error("rank 64 > max_lora_rank 16"))
    with pytest.raises(AdapterLoadFailed) as info:
        await client.load_adapter("big", "/adapters/big")
    assert "max_lora_rank" in info.value.message


async def test_load_adapter_refused_plain_text(server: EngineServer) -> None:
    async def text(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="Internal Server Error")

    server.handlers[("POST", "/v1/load_lora_adapter")] = text
    c = AiohttpEngineClient(_settings(server.url))
    try:
        with pytest.raises(AdapterLoadFailed) as info:
            await c.load_adapter("x", "/x")
        assert "Internal Server Error" in info.value.message
    finally:
        await c.aclose()


@pytest.mark.parametrize("status", [502, 503])
async def test_load_adapter_engine_trouble_is_upstream_error(
    server: EngineServer, client: AiohttpEngineClient, status: int
) -> None:
    server.json("POST", "/v1/load_lora_adapter", status, {})
    with pytest.raises(UpstreamError):
        await client.load_adapter("x", "/x")


@pytest.mark.parametrize(
    ("status", "obj"),
    [(200, {}), (404, _error("not here")), (400, _error("The lora adapter x was not found"))],
)
async def test_unload_adapter_done(
    server: EngineServer, client: AiohttpEngineClient, status: int, obj: object
) -> None:
    server.json("POST", "/v1/unload_lora_adapter", status, obj)
    await client.unload_adapter("x")
    assert orjson.loads(server.seen[0].body) == {"lora_name": "x"}


@pytest.mark.parametrize(("status", "obj"), [(400, _error("busy")), (500, {}), (503, {})])
async def test_unload_adapter_failure(
    server: EngineServer, client: AiohttpEngineClient, status: int, obj: object
) -> None:
    server.json("POST", "/v1/unload_lora_adapter", status, obj)
    with pytest.raises(UpstreamError):
        await client.unload_adapter("x")
