"""A scriptable in-memory engine that implements `server.upstream.EngineClient`.

By default it behaves like vLLM with `--enable-lora`: it serves `base` plus whatever was loaded,
answers chat/completions for served names, streams a few chunks (plus the usage chunk when
`stream_options.include_usage` is set) and ends with `[DONE]`, and answers an unknown model with
vLLM's 404 that lists every served name. Tests queue answers, stream scripts and failures.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from adapters.types import AdapterVersion, VersionState
from server.errors import AdapterLoadFailed, EngineUnavailable, LoraplexError
from server.upstream import EngineLoad, UpstreamResponse, UpstreamStream

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
SECRET_SERVED_NAME = "zz-other-tenant-private-adapter"


def vllm_404_body(model: str, served: set[str]) -> bytes:
    """The shape vLLM answers for an unknown model; it names every served model and adapter."""
    names = ", ".join(sorted(served))
    return orjson.dumps(
        {
            "error": {
                "message": f"The model `{model}` does not exist. Valid aliases: {names}",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }
    )


def completion_body(model: str, kind: str) -> dict[str, Any]:
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": "hello"},
            "finish_reason": "stop",
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": "hello", "finish_reason": "stop"}
        obj = "text_completion"
    return {
        "id": "cmpl-fake",
        "object": obj,
        "created": 1,
        "model": model,
        "choices": [choice],
        "usage": USAGE,
    }


def stream_chunks(model: str, texts: list[str], with_usage: bool) -> list[bytes]:
    """vLLM-like chat chunks, then the usage-only chunk if asked, then `[DONE]`."""
    out = [
        orjson.dumps(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}],
            }
        )
        for t in texts
    ]
    if with_usage:
        out.append(
            orjson.dumps(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [],
                    "usage": USAGE,
                }
            )
        )
    out.append(b"[DONE]")
    return out


@dataclass
class Answer:
    """A scripted non-streaming answer (or a failure raised instead of answering)."""

    status: int = 200
    body: bytes = b"{}"
    raise_exc: BaseException | None = None
    gate: asyncio.Event | None = None  # answer only once set


@dataclass
class StreamScript:
    """A scripted stream: `events` are SSE data payloads (b"[DONE]" included if wanted)."""

    events: list[bytes] = field(default_factory=list)
    status: int = 200
    error_body: bytes = b""
    delay_s: float = 0.0
    raise_on_open: BaseException | None = None
    open_gate: asyncio.Event | None = None  # the response head comes only once set
    # Raise `raise_mid` after this many events were yielded (None: never).
    fail_after: int | None = None
    raise_mid: Exception | None = None
    # Block after this many events until `release` is set (for disconnect tests).
    block_after: int | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class Forwarded:
    path: str
    body: dict[str, Any]
    stream: bool


class FakeStream:
    """Implements `UpstreamStream`; records reads and closing."""

    def __init__(self, script: StreamScript) -> None:
        self.status = script.status
        self._script = script
        self.closed = False
        self.body_read = False
        self.events_yielded = 0
        self.yield_times: list[float] = []

    async def read_body(self) -> bytes:
        self.body_read = True
        return self._script.error_body

    async def events(self) -> AsyncIterator[bytes]:
        s = self._script
        for i, data in enumerate(s.events):
            if s.fail_after is not None and i == s.fail_after and s.raise_mid is not None:
                raise s.raise_mid
            if s.block_after is not None and i == s.block_after:
                await s.release.wait()
            if s.delay_s and i:
                await asyncio.sleep(s.delay_s)
            self.events_yielded += 1
            self.yield_times.append(asyncio.get_running_loop().time())
            yield data
        if s.fail_after is not None and s.fail_after >= len(s.events) and s.raise_mid is not None:
            raise s.raise_mid

    async def aclose(self) -> None:
        self.closed = True


class FakeEngine:
    """Implements `EngineClient` in memory. All knobs are plain attributes."""

    def __init__(self, base: str = "base") -> None:
        self.base = base
        self.served: set[str] = {base, SECRET_SERVED_NAME}
        self.healthy = True
        self.closed = False
        # Scripts consumed in order; when empty the vLLM-like default applies.
        self.answers: deque[Answer] = deque()
        self.streams_script: deque[StreamScript] = deque()
        self.forwarded: list[Forwarded] = []
        self.streams: list[FakeStream] = []
        # Adapter API.
        self.load_calls: list[tuple[str, str]] = []
        self.unload_calls: list[str] = []
        self.load_failures: dict[str, LoraplexError] = {}
        self.unload_failure: LoraplexError | None = None
        self.load_gate: asyncio.Event | None = None
        self.unload_gate: asyncio.Event | None = None
        self.served_models_error: BaseException | None = None
        self.health_calls = 0
        self.queue: EngineLoad | None = None  # what load() reports (None: no /metrics)

    # -- generation -------------------------------------------------------------------------

    def _record(self, path: str, payload: bytes, stream: bool) -> dict[str, Any]:
        body = orjson.loads(payload)
        assert isinstance(body, dict)
        self.forwarded.append(Forwarded(path, body, stream))
        return body

    async def post(self, path: str, payload: bytes) -> UpstreamResponse:
        body = self._record(path, payload, stream=False)
        if self.answers:
            answer = self.answers.popleft()
            if answer.gate is not None:
                await answer.gate.wait()
            if answer.raise_exc is not None:
                raise answer.raise_exc
            return UpstreamResponse(answer.status, answer.body)
        if not self.healthy:
            raise EngineUnavailable("The inference engine is not reachable.")
        model = str(body.get("model"))
        if model not in self.served:
            return UpstreamResponse(404, vllm_404_body(model, self.served))
        kind = "chat" if path.endswith("/chat/completions") else "completions"
        return UpstreamResponse(200, orjson.dumps(completion_body(model, kind)))

    async def open_stream(self, path: str, payload: bytes) -> UpstreamStream:
        body = self._record(path, payload, stream=True)
        if self.streams_script:
            script = self.streams_script.popleft()
            if script.open_gate is not None:
                await script.open_gate.wait()
            if script.raise_on_open is not None:
                raise script.raise_on_open
        elif not self.healthy:
            raise EngineUnavailable("The inference engine is not reachable.")
        else:
            model = str(body.get("model"))
            if model not in self.served:
                script = StreamScript(status=404, error_body=vllm_404_body(model, self.served))
            else:
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                script = StreamScript(events=stream_chunks(model, ["Hel", "lo", "!"], usage))
        stream = FakeStream(script)
        self.streams.append(stream)
        return stream

    # -- health and adapters -------------------------------------------------------------------

    async def health(self) -> bool:
        self.health_calls += 1
        return self.healthy

    async def load(self) -> EngineLoad | None:
        return self.queue

    async def served_models(self) -> set[str]:
        if self.served_models_error is not None:
            raise self.served_models_error
        if not self.healthy:
            raise EngineUnavailable("The inference engine is not reachable.")
        return set(self.served)

    async def load_adapter(self, engine_name: str, path: str) -> None:
        self.load_calls.append((engine_name, path))
        if self.load_gate is not None:
            await self.load_gate.wait()
        for key in (engine_name, engine_name.partition("@")[0]):  # refuse() takes bare names
            if key in self.load_failures:
                raise self.load_failures[key]
        if not self.healthy:
            raise EngineUnavailable("The inference engine is not reachable.")
        self.served.add(engine_name)

    async def unload_adapter(self, engine_name: str) -> None:
        self.unload_calls.append(engine_name)
        if self.unload_gate is not None:
            await self.unload_gate.wait()
        if self.unload_failure is not None:
            raise self.unload_failure
        self.served.discard(engine_name)

    async def aclose(self) -> None:
        self.closed = True

    # -- helpers for tests ---------------------------------------------------------------------

    def restart(self) -> None:
        """Simulate an engine restart: every runtime-loaded adapter is forgotten."""
        self.served = {self.base, SECRET_SERVED_NAME}

    def refuse(self, name: str, message: str = "engine refused the adapter: bad rank") -> None:
        self.load_failures[name] = AdapterLoadFailed(message)


def ver(name: str, number: int = 1, *, pinned: bool = False) -> AdapterVersion:
    """A ready adapter version with a digest derived from its name and number."""
    digest = "sha256:" + f"{sum(name.encode()) * 7919 + number:x}".rjust(64, "0")
    return AdapterVersion(
        name=name,
        version=number,
        digest=digest,
        base_digest=None,
        rank=4,
        alpha=8.0,
        target_modules=("q_proj", "v_proj"),
        size_bytes=100,
        source_uri=f"/adapters/{name}",
        path=f"/cache/{name}-{number}",
        state=VersionState.READY,
        created_at=0.0,
        pinned=pinned,
    )
