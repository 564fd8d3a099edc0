"""Streaming relay: engine SSE events → client, one by one, with metrics and a clean ending.

Each upstream event is forwarded as soon as it arrives. A stream that breaks mid-way ends with
an SSE error event in the OpenAI error shape followed by `[DONE]`, so clients never hang, and
the upstream response is closed whatever happens (client gone, error, normal end).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from adapters.placement import EngineLease
from server.errors import LoraplexError, UpstreamError
from server.telemetry.drift import DriftMonitor
from server.telemetry.metrics import GatewayMetrics
from server.upstream import UpstreamStream

DONE = b"data: [DONE]\n\n"
access_log = logging.getLogger("loraplex.access")


def sse_event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


@dataclass(slots=True)
class RequestRecord:
    """Per-request facts gathered on the way through, flushed once to metrics and the log."""

    metrics: GatewayMetrics
    request_id: str
    tenant: str
    endpoint: str
    stream: bool
    adapter: str = "none"
    started: float = field(default_factory=time.perf_counter)
    first_event: float | None = None
    last_event: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_code: str | None = None
    status: int = 200
    completed: bool = False
    # Auto-routing decision (None: not auto-routed) and experiment assignment, if any.
    domain: str | None = None
    confidence: float | None = None
    fallback: bool = False
    experiment: str | None = None
    variant: str | None = None
    # Released / charged once in `finish`, whatever way the request ends.
    lease: EngineLease | None = None
    charge_tokens: Callable[[int], None] | None = None
    release_slot: Callable[[], None] | None = None  # tenant's concurrency slot (server/quotas.py)
    drift: DriftMonitor | None = None  # observes the finished request (telemetry/drift.py)
    _admitted: bool = False
    _finished: bool = False

    def admit(self, tenant: str) -> None:
        """The tenant is authenticated: count the request as in flight until `finish`."""
        self.tenant = tenant
        self._admitted = True
        self.metrics.child(self.metrics.in_flight, tenant).inc()

    def on_event(self) -> None:
        now = time.perf_counter()
        if self.first_event is None:
            self.first_event = now
            m = self.metrics
            m.child(m.ttft, self.tenant, self.adapter).observe(now - self.started)
        elif self.last_event is not None:
            self.metrics.child(self.metrics.itl, self.adapter).observe(now - self.last_event)
        self.last_event = now

    def on_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    def fail(self, exc: LoraplexError) -> None:
        self.status = exc.status
        self.error_code = exc.error_code

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self.release_slot is not None:
            self.release_slot()
        if self.lease is not None:
            self.lease.release()
        if self.charge_tokens is not None and (self.prompt_tokens or self.completion_tokens):
            self.charge_tokens(self.prompt_tokens + self.completion_tokens)
        m = self.metrics
        if self._admitted:
            m.child(m.in_flight, self.tenant).dec()
        elapsed = time.perf_counter() - self.started
        m.child(m.requests, self.tenant, self.adapter, self.endpoint, str(self.status)).inc()
        if self.error_code:
            m.child(m.errors, self.tenant, self.error_code).inc()
        m.child(m.latency, self.tenant, self.adapter, self.endpoint, str(self.stream)).observe(
            elapsed
        )
        if self.prompt_tokens:
            m.child(m.prompt_tokens, self.tenant, self.adapter).inc(self.prompt_tokens)
        if self.completion_tokens:
            m.child(m.completion_tokens, self.tenant, self.adapter).inc(self.completion_tokens)
        if self.experiment is not None and self.variant is not None:
            ttft = None if self.first_event is None else self.first_event - self.started
            m.observe_variant(
                self.experiment, self.variant, self.status, elapsed, ttft, self.completion_tokens
            )
        if self.drift is not None and self._admitted:
            self.drift.observe(
                self.tenant,
                self.domain,
                self.confidence,
                self.fallback,
                self.prompt_tokens,
                self.completion_tokens,
                self.status >= 500,
            )
        access_log.info(
            "request",
            extra={
                "request_id": self.request_id,
                "tenant": self.tenant,
                "adapter": self.adapter,
                "endpoint": self.endpoint,
                "stream": self.stream,
                "status": self.status,
                "code": self.error_code,
                "duration_ms": round(elapsed * 1000, 2),
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            },
        )


async def relay_events(
    stream: UpstreamStream, record: RequestRecord, drop_usage_chunk: bool
) -> AsyncIterator[bytes]:
    """Forward engine events; strip the usage-only chunk the gateway asked for on its own."""
    done = False
    try:
        async for data in stream.events():
            if data == b"[DONE]":
                done = True
                record.completed = True
                yield DONE
                break
            record.on_event()
            if b'"usage"' in data or b'"error"' in data:
                chunk = _loads(data)
                if isinstance(chunk, dict):
                    if chunk.get("usage"):
                        record.on_usage(chunk["usage"])
                        if drop_usage_chunk and not chunk.get("choices"):
                            continue
                    if "error" in chunk:
                        record.status, record.error_code = 502, "upstream_error"
            yield sse_event(data)
        if not done:
            raise UpstreamError("The inference engine ended the stream early.")
    except Exception as exc:
        if not isinstance(exc, LoraplexError):  # a bug or an unmapped transport error
            access_log.error("stream relay failed", exc_info=exc)
            exc = UpstreamError("The inference engine stream failed.")
        record.fail(exc)
        record.completed = True
        yield sse_event(exc.json_bytes())
        yield DONE


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


class SSEResponse(StreamingResponse):
    """StreamingResponse that always runs `on_close`, even if the body was never iterated."""

    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncIterator[bytes],
        headers: dict[str, str],
        on_close: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(content, headers={**headers, "Cache-Control": "no-cache"})
        self._iterator = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            await self._on_close()


class FinishingResponse(Response):
    """A JSON answer whose request is accounted (metrics, access log, lease released) once it
    has been sent, or failed to be: that work is then off the response's path."""

    media_type = "application/json"

    def __init__(self, content: bytes, headers: dict[str, str], record: RequestRecord) -> None:
        super().__init__(content, headers=headers)
        self._record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._record.finish()
