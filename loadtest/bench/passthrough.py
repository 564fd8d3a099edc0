"""Minimal Starlette passthrough proxies, the baselines the gateway is compared with.

`--client httpx` (one shared AsyncClient) or `--client aiohttp` (one shared ClientSession):
same app otherwise, so the pair also re-measures the upstream transport choice.
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
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HEADERS = {"Content-Type": "application/json"}


def build_app(upstream: str, client: str) -> Starlette:
    holder: dict[str, object] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        if client == "httpx":
            limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
            async with httpx.AsyncClient(base_url=upstream, limits=limits) as c:
                holder["c"] = c
                yield
        else:
            connector = aiohttp.TCPConnector(limit=512)
            async with aiohttp.ClientSession(upstream, connector=connector) as s:
                holder["c"] = s
                yield

    async def forward(request: Request) -> Response:
        body = await request.body()
        c = holder["c"]
        if isinstance(c, httpx.AsyncClient):
            r = await c.post(request.url.path, content=body, headers=HEADERS)
            return Response(r.content, r.status_code, media_type="application/json")
        assert isinstance(c, aiohttp.ClientSession)
        async with c.post(request.url.path, data=body, headers=HEADERS) as resp:
            return Response(await resp.read(), resp.status, media_type="application/json")

    routes = [Route("/v1/{rest:path}", forward, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--client", choices=["httpx", "aiohttp"], required=True)
    args = ap.parse_args()
    uvicorn.run(
        build_app(args.upstream, args.client),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
