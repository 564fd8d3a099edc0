"""Gateway CPU per request, in process: the ASGI app called directly with an in-memory engine
(no sockets, no HTTP client, no uvicorn), so only the gateway's own Python work is timed:
framework, auth, body parsing and validation, adapter selection and residency lease, metrics,
access log, SSE relay. The event loop turns once between requests, as in a server, so work the
gateway leaves for the next loop iteration (the access log's write) is timed too, and the
garbage collector is tuned as `loraplex serve` tunes it. The best of several repeats of process
CPU time is steady enough on a busy machine to A/B a hot-path change, which wall-clock latency
here is not.

    python -m loadtest.bench.inproc [-n 2000] [--repeat 5] [--stream] [--events 16]
        [--model auto]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from loadtest.bench.fake_upstream import ANSWER, TEXT_ANSWER
from loadtest.bench.procs import BENCH_KEY, fake_adapter_dir, gateway_config
from server.app import create_app
from server.gc_tuning import tune_gc
from server.logs import configure_logging
from server.settings import Settings
from server.upstream import UpstreamResponse, UpstreamStream

CHUNK = (
    b'{"id":"cmpl-fake","object":"chat.completion.chunk","created":0,"model":"base",'
    b'"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}'
)
USAGE = b'{"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":16,"total_tokens":24}}'


class _Stream:
    status = 200

    def __init__(self, events: int) -> None:
        self._events = events

    async def read_body(self) -> bytes:
        return b""

    async def events(self) -> AsyncIterator[bytes]:
        for _ in range(self._events):
            yield CHUNK
        yield USAGE
        yield b"[DONE]"

    async def aclose(self) -> None:
        return None


class MemoryEngine:
    """Implements `server.upstream.EngineClient` with fixed answers and no I/O."""

    def __init__(self, events: int) -> None:
        self.events = events
        self.loaded: set[str] = set()

    async def post(self, path: str, payload: bytes) -> UpstreamResponse:
        if path.endswith("load_lora_adapter"):
            name = orjson.loads(payload)["lora_name"]
            (self.loaded.discard if "unload" in path else self.loaded.add)(name)
            return UpstreamResponse(200, b"Success")
        return UpstreamResponse(200, ANSWER if path.endswith("chat/completions") else TEXT_ANSWER)

    async def open_stream(self, path: str, payload: bytes) -> UpstreamStream:
        return _Stream(self.events)

    async def health(self) -> bool:
        return True

    async def load(self) -> None:  # no scheduler queue to report
        return None

    async def served_models(self) -> set[str]:
        return {"base", *self.loaded}

    async def load_adapter(self, engine_name: str, path: str) -> None:
        self.loaded.add(engine_name)

    async def unload_adapter(self, engine_name: str) -> None:
        self.loaded.discard(engine_name)

    async def aclose(self) -> None:
        return None


async def run(n: int, repeat: int, stream: bool, events: int, model: str = "bench") -> list[float]:
    """CPU seconds per request for each repeat of `n` sequential requests."""
    with tempfile.TemporaryDirectory() as tmp:
        args, env = gateway_config(Path(tmp) / "gw", {"bench": fake_adapter_dir(Path(tmp))})
        os.environ.update(env)
        os.environ["LORAPLEX_TENANTS_FILE"] = args[1]
        os.environ["LORAPLEX_ADAPTERS_FILE"] = args[3]
        settings = Settings()
        app = create_app(settings, engine_factory=lambda _: MemoryEngine(events))
        body = orjson.dumps(
            {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            | ({"stream": True} if stream else {})
        )
        headers = [
            (b"authorization", f"Bearer {BENCH_KEY}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        async with app.router.lifespan_context(app):
            state = app.state.loraplex
            for _ in range(200):
                if state.ready:
                    break
                await asyncio.sleep(0.05)
            await one(app, body, headers)  # warm caches, check the answer
            tune_gc()  # as `loraplex serve` does (server/gc_tuning.py)
            per_request = []
            for _ in range(repeat):
                t0 = time.process_time()
                for _ in range(n):
                    await one(app, body, headers)
                    await asyncio.sleep(0)  # one loop turn per request, as a server has
                per_request.append((time.process_time() - t0) / n)
    return per_request


async def one(app: Any, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8080),
    }
    sent = False
    never = asyncio.Event()
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        raise RuntimeError(f"gateway answered {status}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--events", type=int, default=16)
    ap.add_argument("--model", default="bench", help='"auto": through domain routing')
    args = ap.parse_args(argv)
    import uvloop

    configure_logging("info")  # the access log is on, as in production, but goes nowhere
    handler = logging.getLogger("loraplex").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open(os.devnull, "w"))  # noqa: SIM115
    per = uvloop.run(run(args.n, args.repeat, args.stream, args.events, args.model))
    kind = f"stream of {args.events} events" if args.stream else "non-streaming"
    print(
        f"gateway CPU per {kind} request, model={args.model} (in process, "
        f"{args.n} x {args.repeat}): "
        f"best {min(per) * 1e6:.0f} us, median {sorted(per)[len(per) // 2] * 1e6:.0f} us"
    )


if __name__ == "__main__":
    main()
