"""A fast fake OpenAI/vLLM upstream: fixed answers, optional SSE, the LoRA admin endpoints.

Used so that only proxy cost is measured. `python -m loadtest.bench.fake_upstream --port 9100`.
"""

from __future__ import annotations

import argparse

import orjson
from aiohttp import web

ANSWER = orjson.dumps(
    {
        "id": "cmpl-fake",
        "object": "chat.completion",
        "model": "base",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }
)
CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
EVENTS = 16


def build_app() -> web.Application:
    adapters: set[str] = set()

    async def generate(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if not body.get("stream"):
            return web.Response(body=ANSWER, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(EVENTS):
            await resp.write(CHUNK)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def models(_: web.Request) -> web.Response:
        data = [{"id": n, "object": "model"} for n in ["base", *sorted(adapters)]]
        return web.json_response({"object": "list", "data": data})

    async def load(request: web.Request) -> web.Response:
        adapters.add((await request.json())["lora_name"])
        return web.Response(text="Success")

    async def unload(request: web.Request) -> web.Response:
        adapters.discard((await request.json())["lora_name"])
        return web.Response(text="Success")

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.add_routes(
        [
            web.post("/v1/chat/completions", generate),
            web.post("/v1/completions", generate),
            web.get("/v1/models", models),
            web.post("/v1/load_lora_adapter", load),
            web.post("/v1/unload_lora_adapter", unload),
            web.get("/health", health),
        ]
    )
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    web.run_app(build_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
