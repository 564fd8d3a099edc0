"""A fast fake OpenAI/vLLM upstream: fixed answers, optional SSE, the LoRA admin endpoints.

Used so that only proxy cost is measured. Streams send EVENTS text events (plus a usage chunk
when `stream_options.include_usage` asks for it, as vLLM does) and count what they sent, so a
benchmark can compare events sent with events received (`GET /stats`, `POST /stats/reset`).
`POST /faults` injects a regression for tests: requests whose model starts with `prefix` fail
(HTTP 500) with probability `error_rate` and are delayed by `delay_ms` (`{}` clears it).
`python -m loadtest.bench.fake_upstream --port 9100`.
"""

from __future__ import annotations

import argparse
import asyncio
import random

import orjson
from aiohttp import web

ANSWER = orjson.dumps(
    {
        "id": "cmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": "base",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }
)
TEXT_ANSWER = orjson.dumps(
    {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 0,
        "model": "base",
        "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }
)
CHUNK = (
    b'data: {"id":"cmpl-fake","object":"chat.completion.chunk","created":0,"model":"base",'
    b'"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n'
)
USAGE = (
    b'data: {"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":16,"total_tokens":24}}\n\n'
)
EVENTS = 16


def build_app() -> web.Application:
    adapters: set[str] = set()
    sent = {"requests": 0, "streams": 0, "events": 0}
    faults: dict[str, dict[str, float]] = {}

    async def generate(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        sent["requests"] += 1
        for prefix, fault in faults.items():
            if str(body.get("model", "")).startswith(prefix):
                if fault.get("delay_ms"):
                    await asyncio.sleep(fault["delay_ms"] / 1000)
                if random.random() < fault.get("error_rate", 0.0):  # noqa: S311 (not crypto)
                    return web.json_response({"error": {"message": "injected"}}, status=500)
        if not body.get("stream"):
            chat = request.path.endswith("/chat/completions")
            return web.Response(
                body=ANSWER if chat else TEXT_ANSWER, content_type="application/json"
            )
        sent["streams"] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(EVENTS):
            await resp.write(CHUNK)
        sent["events"] += EVENTS
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(USAGE)  # not counted: the gateway may strip what it asked for
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(sent)

    async def reset(_: web.Request) -> web.Response:
        for k in sent:
            sent[k] = 0
        return web.json_response(sent)

    async def set_faults(request: web.Request) -> web.Response:
        spec = await request.json()
        faults.clear()
        if spec.get("prefix"):
            faults[spec["prefix"]] = {
                "error_rate": float(spec.get("error_rate", 0.0)),
                "delay_ms": float(spec.get("delay_ms", 0.0)),
            }
        return web.json_response(faults)

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
            web.get("/stats", stats),
            web.post("/stats/reset", reset),
            web.post("/faults", set_faults),
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
