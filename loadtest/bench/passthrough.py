"""Minimal Starlette passthrough proxies, the baselines the gateway is compared with.

`--client httpx` (one shared AsyncClient) or `--client aiohttp` (one shared ClientSession), with
`--pool N` connections (0: the library's default limits); same app otherwise, so the pair also
measures the upstream transport and its pool settings. Streams are relayed chunk by chunk as
they arrive (no parsing), so a streaming comparison with the gateway is a fair one.
`python -m loadtest.bench.passthrough --port 9101 --upstream http://127.0.0.1:9100 --client httpx`
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

HEADERS = {"Content-Type": "application/json"}


def build_app(upstream: str, client: str, pool: int = 512) -> Starlette:
    holder: dict[str, object] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        if client == "httpx":
            limits = (
                httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
                if pool
                else httpx.Limits(max_connections=100, max_keepalive_connections=20)
            )
            async with httpx.AsyncClient(base_url=upstream, limits=limits) as c:
                holder["c"] = c
                yield
        else:
            connector = aiohttp.TCPConnector(limit=pool) if pool else aiohttp.TCPConnector()
            async with aiohttp.ClientSession(upstream, connector=connector) as s:
                holder["c"] = s
                yield

    async def forward(request: Request) -> Response:
        body = await request.body()
        stream = b'"stream":true' in body.replace(b" ", b"")
        c = holder["c"]
        if isinstance(c, httpx.AsyncClient):
            req = c.build_request("POST", request.url.path, content=body, headers=HEADERS)
            r = await c.send(req, stream=stream)
            if not stream:
                return Response(r.content, r.status_code, media_type="application/json")
            return StreamingResponse(
                r.aiter_raw(),
                r.status_code,
                media_type="text/event-stream",
                background=BackgroundTask(r.aclose),
            )
        assert isinstance(c, aiohttp.ClientSession)
        resp = await c.post(request.url.path, data=body, headers=HEADERS)
        if not stream:
            async with resp:
                return Response(await resp.read(), resp.status, media_type="application/json")

        async def relay() -> AsyncIterator[bytes]:
            async with resp:
                async for chunk in resp.content.iter_any():
                    yield chunk

        return StreamingResponse(relay(), resp.status, media_type="text/event-stream")

    routes = [Route("/v1/{rest:path}", forward, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--client", choices=["httpx", "aiohttp"], required=True)
    ap.add_argument("--pool", type=int, default=512, help="max connections; 0: library default")
    args = ap.parse_args()
    uvicorn.run(
        build_app(args.upstream, args.client, args.pool),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
