"""AiohttpEngineClient's retry rule (server/upstream.py) against a tiny real HTTP server:
retried only before the response headers, for refused/reset connections and 503, bounded,
with jitter; never for timeouts, other statuses or a stream that broke once started."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from server.errors import EngineUnavailable, UpstreamError, UpstreamTimeout
from server.settings import EngineSettings
from server.upstream import AiohttpEngineClient

Script = list[str]  # per attempt: "503", "500", "drop", "ok", "stream", "stream-drop", "slow"


class Engine:
    """Answers attempt i with script[i] (the last entry repeats); counts the attempts."""

    def __init__(self) -> None:
        self.script: Script = ["ok"]
        self.attempts = 0
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        step = self.script[min(self.attempts, len(self.script) - 1)]
        self.attempts += 1
        if step in ("503", "500"):
            return web.json_response({"error": {"message": step}}, status=int(step))
        if step == "drop":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if step == "slow":
            await asyncio.sleep(2)
        if step.startswith("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"data: 1\n\n")
            if step == "stream-drop":
                assert request.transport is not None
                request.transport.abort()
                return resp
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response({"ok": True})


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    e = Engine()
    app = web.Application()
    app.router.add_post("/v1/completions", e.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    e.port = runner.addresses[0][1]
    try:
        yield e
    finally:
        await runner.cleanup()


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., AiohttpEngineClient]]:
    made: list[AiohttpEngineClient] = []

    def make(url: str, **kw: object) -> AiohttpEngineClient:
        settings = EngineSettings.model_validate({"url": url, "read_timeout_s": 0.5, **kw})
        c = AiohttpEngineClient(settings)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.aclose()


def url(engine: Engine) -> str:
    return f"http://127.0.0.1:{engine.port}"


@pytest.mark.parametrize(("first", "reason"), [("503", "status_503"), ("drop", "disconnect")])
async def test_refused_once_then_answered(
    engine: Engine, make_client: Callable[..., AiohttpEngineClient], first: str, reason: str
) -> None:
    engine.script = [first, "ok"]
    client = make_client(url(engine))
    resp = await client.post("/v1/completions", b"{}")
    assert resp.status == 200
    assert engine.attempts == 2
    assert client.retried == {reason: 1}


async def test_stream_refused_once_then_streams(
    engine: Engine, make_client: Callable[..., AiohttpEngineClient]
) -> None:
    engine.script = ["503", "stream"]
    client = make_client(url(engine))
    stream = await client.open_stream("/v1/completions", b"{}")
    try:
        assert stream.status == 200
        assert [e async for e in stream.events()] == [b"1", b"[DONE]"]
    finally:
        await stream.aclose()
    assert engine.attempts == 2


async def test_503_every_time_is_returned_after_the_last_attempt(
    engine: Engine, make_client: Callable[..., AiohttpEngineClient]
) -> None:
    engine.script = ["503"]
    client = make_client(url(engine), retries=2)
    resp = await client.post("/v1/completions", b"{}")
    assert resp.status == 503  # the pipeline maps it to engine_unavailable + Retry-After
    assert engine.attempts == 3


async def test_reset_every_time_is_engine_unavailable(
    engine: Engine, make_client: Callable[..., AiohttpEngineClient]
) -> None:
    engine.script = ["drop"]
    client = make_client(url(engine))
    with pytest.raises(EngineUnavailable):
        await client.post("/v1/completions", b"{}")
    assert engine.attempts == 2


async def test_refused_connection_retried_quickly(
    make_client: Callable[..., AiohttpEngineClient],
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    client = make_client(f"http://127.0.0.1:{port}", retries=2)
    t0 = time.monotonic()
    with pytest.raises(EngineUnavailable) as err:
        await client.post("/v1/completions", b"{}")
    assert time.monotonic() - t0 < 1.0
    assert err.value.headers["Retry-After"] == "1"
    assert client.retried == {"connect": 2}


@pytest.mark.parametrize(
    ("script", "error"),
    [(["slow", "ok"], UpstreamTimeout), (["500", "ok"], None)],
    ids=["timeout", "500"],
)
async def test_not_retried_when_the_engine_may_have_started(
    engine: Engine,
    make_client: Callable[..., AiohttpEngineClient],
    script: Script,
    error: type[Exception] | None,
) -> None:
    engine.script = script
    client = make_client(url(engine))
    if error is None:
        assert (await client.post("/v1/completions", b"{}")).status == 500
    else:
        with pytest.raises(error):
            await client.post("/v1/completions", b"{}")
    assert engine.attempts == 1
    assert not client.retried


async def test_stream_broken_after_headers_is_not_retried(
    engine: Engine, make_client: Callable[..., AiohttpEngineClient]
) -> None:
    engine.script = ["stream-drop", "stream"]
    client = make_client(url(engine))
    stream = await client.open_stream("/v1/completions", b"{}")
    try:
        with pytest.raises((EngineUnavailable, UpstreamError)):
            _ = [e async for e in stream.events()]
    finally:
        await stream.aclose()
    assert engine.attempts == 1


async def test_no_retries_when_disabled(
    engine: Engine, make_client: Callable[..., AiohttpEngineClient]
) -> None:
    engine.script = ["503", "ok"]
    client = make_client(url(engine), retries=0)
    assert (await client.post("/v1/completions", b"{}")).status == 503
    assert engine.attempts == 1


def test_backoff_is_full_jitter_within_the_cap() -> None:
    client = AiohttpEngineClient.__new__(AiohttpEngineClient)
    client._settings = EngineSettings(retry_backoff_s=0.1, retry_backoff_max_s=0.3)
    for attempt, cap in [(0, 0.1), (1, 0.2), (2, 0.3), (5, 0.3)]:
        delays = [client._backoff(attempt) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.7  # spread over the range, not a fixed delay
        assert min(delays) < cap * 0.3
