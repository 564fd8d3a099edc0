"""A fast fake OpenAI/vLLM upstream: fixed answers, optional SSE, the LoRA admin endpoints.

Used so that only proxy cost is measured. Streams send EVENTS text events (plus a usage chunk
when `stream_options.include_usage` asks for it, as vLLM does) and count what they sent, so a
benchmark can compare events sent with events received (`GET /stats`, `POST /stats/reset`).

`POST /faults` injects faults for tests into requests whose model starts with `prefix` (`{}`
clears them; each POST replaces the previous rule):

- `error_rate` (probability) of an HTTP `status` answer (default 500), `times` limits a rule to
  the first N matching requests (e.g. `{"times": 1, "error_rate": 1, "status": 503}`);
- `delay_ms` before the response headers (a slow engine);
- `drop`: `"before_headers"` or `"mid_stream"` (after `after_events` events) closes the
  connection abruptly, as an engine that crashed would;
- `stall_ms` after `after_events` events (a stream that stops moving), `event_delay_ms`
  between events (a slow but steady generation), `events` per stream.

`POST /adapters/forget` drops the loaded adapters, as an engine restarted too fast for the
gateway's health probes to see it down would have.

While it waits (delay, stall, slow events) the fake watches its connection, so a gateway that
gives up and closes the upstream request is seen doing so: `GET /stats` counts `aborted`
requests next to `completed`, `injected` and `in_progress` ones. `--journal FILE` appends one
JSON line per request event (`received`, then `completed`, `error`, `dropped` or `aborted`),
keyed by the request's OpenAI `user` field, so fault tests can tell lost and duplicated
requests apart, even across a kill -9 of this process.
`python -m loadtest.bench.fake_upstream --port 9100 [--journal FILE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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
WATCH_S = 0.01  # how often a waiting handler checks whether its client went away
# Journal outcome → /stats counter (injected: an error answer or a dropped connection).
OUTCOME_STAT = {
    "completed": "completed",
    "aborted": "aborted",
    "error": "injected",
    "dropped": "injected",
}


@dataclass(slots=True)
class Fault:
    """One injected regression (module docstring)."""

    prefix: str
    error_rate: float = 0.0
    status: int = 500
    delay_ms: float = 0.0
    times: int | None = None
    drop: str = ""  # "", "before_headers", "mid_stream"
    after_events: int = 0
    stall_ms: float = 0.0
    event_delay_ms: float = 0.0
    events: int = EVENTS

    @classmethod
    def parse(cls, spec: dict[str, Any]) -> Fault:
        drop = str(spec.get("drop") or "")
        if drop not in ("", "before_headers", "mid_stream"):
            raise web.HTTPBadRequest(text=f"unknown drop {drop!r}")
        times = spec.get("times")
        return cls(
            prefix=str(spec["prefix"]),
            error_rate=float(spec.get("error_rate", 0.0)),
            status=int(spec.get("status", 500)),
            delay_ms=float(spec.get("delay_ms", 0.0)),
            times=None if times is None else int(times),
            drop=drop,
            after_events=int(spec.get("after_events", 0)),
            stall_ms=float(spec.get("stall_ms", 0.0)),
            event_delay_ms=float(spec.get("event_delay_ms", 0.0)),
            events=int(spec.get("events", EVENTS)),
        )

    def take(self, model: str) -> bool:
        """Does this rule apply to a request for `model` (using up one of `times`)?"""
        if not model.startswith(self.prefix):
            return False
        if self.times is not None:
            if self.times <= 0:
                return False
            self.times -= 1
        return True


class Journal:
    """Request events as JSON lines, written at once (a kill -9 loses nothing written)."""

    def __init__(self, path: Path | None) -> None:
        self._file: IO[bytes] | None = None if path is None else path.open("ab", buffering=0)

    def write(self, rid: str | None, event: str, **extra: Any) -> None:
        if self._file is not None:
            line = {"id": rid, "event": event, "t": time.time(), **extra}
            self._file.write(orjson.dumps(line) + b"\n")


async def wait_watching(request: web.Request, seconds: float) -> bool:
    """Sleep `seconds`; False as soon as the client closed the connection."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return False
        left = deadline - loop.time()
        if left <= 0:
            return True
        await asyncio.sleep(min(left, WATCH_S))


def build_app(journal_path: Path | None = None) -> web.Application:
    adapters: set[str] = set()
    sent = {
        "requests": 0,
        "streams": 0,
        "events": 0,
        "completed": 0,
        "aborted": 0,
        "injected": 0,
        "in_progress": 0,
    }
    faults: list[Fault] = []
    journal = Journal(journal_path)

    async def generate(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        sent["requests"] += 1
        sent["in_progress"] += 1
        rid = body.get("user")
        model = str(body.get("model", ""))
        stream = bool(body.get("stream"))
        journal.write(rid, "received", model=model, stream=stream, path=request.path)
        try:
            fault = next((f for f in faults if f.take(model)), None) if faults else None
            outcome, resp = await answer(request, body, stream, fault)
        except (ConnectionError, asyncio.CancelledError):  # a write found the client gone
            finished(rid, "aborted")
            raise
        finished(rid, outcome)
        return resp

    def finished(rid: str | None, outcome: str) -> None:
        sent["in_progress"] -= 1
        sent[OUTCOME_STAT[outcome]] += 1
        journal.write(rid, outcome)

    async def answer(
        request: web.Request, body: dict[str, Any], stream: bool, fault: Fault | None
    ) -> tuple[str, web.StreamResponse]:
        if fault is not None:
            if fault.delay_ms and not await wait_watching(request, fault.delay_ms / 1000):
                return "aborted", web.Response()
            if fault.error_rate and random.random() < fault.error_rate:  # noqa: S311 (not crypto)
                error = {"error": {"message": "injected", "code": fault.status}}
                return "error", web.json_response(error, status=fault.status)
            if fault.drop == "before_headers":
                drop(request)
                return "dropped", web.Response()
        if not stream:
            chat = request.path.endswith("/chat/completions")
            return "completed", web.Response(
                body=ANSWER if chat else TEXT_ANSWER, content_type="application/json"
            )
        sent["streams"] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = EVENTS if fault is None else fault.events
        for i in range(events):
            if fault is not None:
                if i == fault.after_events and fault.drop == "mid_stream":
                    drop(request)
                    return "dropped", resp
                pause = fault.stall_ms if i == fault.after_events else 0.0
                pause += fault.event_delay_ms if i else 0.0
                if pause and not await wait_watching(request, pause / 1000):
                    return "aborted", resp
            await resp.write(CHUNK)
            sent["events"] += 1
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(USAGE)  # not counted: the gateway may strip what it asked for
        await resp.write(b"data: [DONE]\n\n")
        return "completed", resp

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(sent)

    async def reset(_: web.Request) -> web.Response:
        for k in sent:
            if k != "in_progress":
                sent[k] = 0
        return web.json_response(sent)

    async def set_faults(request: web.Request) -> web.Response:
        spec = await request.json()
        faults.clear()
        if "prefix" in spec:  # "" matches every model
            faults.append(Fault.parse(spec))
        return web.json_response([f.prefix for f in faults])

    async def models(_: web.Request) -> web.Response:
        data = [{"id": n, "object": "model"} for n in ["base", *sorted(adapters)]]
        return web.json_response({"object": "list", "data": data})

    async def load(request: web.Request) -> web.Response:
        adapters.add((await request.json())["lora_name"])
        return web.Response(text="Success")

    async def unload(request: web.Request) -> web.Response:
        adapters.discard((await request.json())["lora_name"])
        return web.Response(text="Success")

    async def forget(_: web.Request) -> web.Response:
        adapters.clear()  # as an engine restarted between two of the gateway's health probes
        return web.json_response([])

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
            web.post("/adapters/forget", forget),
        ]
    )
    return app


def drop(request: web.Request) -> None:
    """Close the connection without an answer (or mid-answer), like a crashed engine."""
    if request.transport is not None:
        request.transport.abort()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--journal", type=Path, help="append request events here (JSON lines)")
    args = ap.parse_args()
    web.run_app(
        build_app(args.journal), host="127.0.0.1", port=args.port, print=None, access_log=None
    )


if __name__ == "__main__":
    main()
