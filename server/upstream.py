"""The engine seam: `EngineClient` Protocol and its aiohttp implementation for vLLM.

aiohttp is on the hot path because it was measured faster here than httpx under concurrency
(docs/decisions.md). Every transport failure is translated into the gateway's error tree at this
boundary, so nothing above it sees aiohttp exceptions.

Retries (docs/reliability.md, "Faults"). A POST to the engine is tried again — at most
`engine.retries` more times, after a full-jitter exponential backoff (`retry_backoff_s`, capped
by `retry_backoff_max_s`) — only when the engine has certainly not started on it and nothing
has gone to the client:

- the connection could not be made (refused, unreachable, reset while connecting);
- the connection was closed or reset before any response header arrived (typically a pooled
  keep-alive connection the engine closed, or an engine that died and restarted); vLLM aborts
  a request whose connection is gone, and a generation has no side effects, so a second try
  cannot produce a second answer for the client;
- the engine answered 503 (overloaded / not ready: refused before doing anything).

Never retried: timeouts (the engine may be generating), any other status, and anything after
the response headers — a stream that breaks once started ends with an SSE error event
instead. Retries happen before `post` / `open_stream` return, so a request that was retried
has sent no byte to the client; the relay above never retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError

from server.errors import (
    AdapterLoadFailed,
    EngineUnavailable,
    LoraplexError,
    UpstreamError,
    UpstreamTimeout,
)
from server.settings import EngineSettings

JSON_HEADERS = {"Content-Type": "application/json"}
MAX_SSE_LINE = 1 << 20  # bytes; an engine line longer than this ends the stream with an error
log = logging.getLogger("loraplex.upstream")


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    body: bytes


class UpstreamStream(Protocol):
    """An open streaming response: status first, then SSE `data` payloads as they arrive."""

    status: int

    async def read_body(self) -> bytes: ...

    def events(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """An engine's scheduler queues, from its Prometheus /metrics (all gateways' requests)."""

    waiting: float
    running: float


class EngineClient(Protocol):
    """What the gateway needs from an engine. Fakes in tests implement the same methods."""

    async def post(self, path: str, payload: bytes) -> UpstreamResponse: ...

    async def open_stream(self, path: str, payload: bytes) -> UpstreamStream: ...

    async def health(self) -> bool: ...

    async def load(self) -> EngineLoad | None: ...

    async def served_models(self) -> set[str]: ...

    async def load_adapter(self, engine_name: str, path: str) -> None: ...

    async def unload_adapter(self, engine_name: str) -> None: ...

    async def aclose(self) -> None: ...


class _AiohttpStream:
    def __init__(self, resp: aiohttp.ClientResponse, on_error: _ErrorMapper) -> None:
        self._resp = resp
        self.status = resp.status
        self._map = on_error

    async def read_body(self) -> bytes:
        try:
            return await self._resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._map(exc) from exc
        finally:
            self._resp.release()

    async def events(self) -> AsyncIterator[bytes]:
        """Yield each SSE event's data as soon as its terminating blank line arrives.

        Parsed from whole network chunks (one split per chunk rather than one `readline` per
        line: about half the client CPU of a stream); a line is at most MAX_SSE_LINE bytes."""
        data: list[bytes] = []
        rest = b""
        try:
            async for chunk in self._resp.content.iter_any():
                if rest:
                    chunk = rest + chunk
                lines = chunk.split(b"\n")
                rest = lines.pop()
                if len(rest) > MAX_SSE_LINE:
                    raise UpstreamError("The inference engine sent an over-long event line.")
                for line in lines:
                    if line[-1:] == b"\r":
                        line = line[:-1]
                    if not line:
                        if data:
                            yield data[0] if len(data) == 1 else b"\n".join(data)
                            data = []
                    elif line[:5] == b"data:":
                        data.append(line[6:] if line[5:6] == b" " else line[5:])
                    # comments (":") and other fields (event:, id:) are not used by vLLM
        except (TimeoutError, aiohttp.ClientError, HttpProcessingError) as exc:
            raise self._map(exc) from exc
        rest = rest.removesuffix(b"\r")
        if rest[:5] == b"data:":  # the body ended without the event's blank line
            data.append(rest[6:] if rest[5:6] == b" " else rest[5:])
        if data:
            yield b"\n".join(data)

    async def aclose(self) -> None:
        # close(), not release(): an unfinished body must drop the connection so vLLM aborts.
        if not self._resp.closed:
            self._resp.close()


class PrefetchedStream:
    """A stream whose first event was already read. Until that event arrives nothing has
    reached the client, so a request can still move to another engine (server/pipeline.py);
    after it, the stream is committed and a failure ends it with an SSE error event."""

    def __init__(
        self, inner: UpstreamStream, first: bytes | None, rest: AsyncIterator[bytes]
    ) -> None:
        self.status = inner.status
        self._inner = inner
        self._first = first
        self._rest = rest

    async def read_body(self) -> bytes:
        return await self._inner.read_body()

    async def events(self) -> AsyncIterator[bytes]:
        if self._first is None:
            return
        yield self._first
        async for data in self._rest:
            yield data

    async def aclose(self) -> None:
        await self._inner.aclose()


async def prefetch_first_event(stream: UpstreamStream) -> PrefetchedStream:
    """Wait for the stream's first event (an engine failure before it raises here)."""
    events = stream.events()
    try:
        first: bytes | None = await anext(events)
    except StopAsyncIteration:
        first = None  # ended at once: the relay reports the early end
    return PrefetchedStream(stream, first, events)


class _ErrorMapper(Protocol):
    def __call__(self, exc: BaseException) -> LoraplexError: ...


def engine_session(settings: EngineSettings) -> aiohttp.ClientSession:
    """The one pooled session every engine client of a gateway shares (per-host limits keep
    one engine from taking every connection)."""
    connector = aiohttp.TCPConnector(
        limit=0,  # bounded per engine by limit_per_host
        limit_per_host=settings.pool_size,
        keepalive_timeout=settings.keepalive_timeout_s,
    )
    return aiohttp.ClientSession(
        connector=connector,
        json_serialize=lambda o: orjson.dumps(o).decode(),
        auto_decompress=False,
        # One session serves every tenant: never carry engine cookies between requests
        # (and skip the cookie-jar filtering aiohttp does on each request).
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class AiohttpEngineClient:
    """EngineClient for one engine over a pooled aiohttp session (created inside the app's
    lifespan; shared by the clients of several engines when `session` is given)."""

    def __init__(
        self,
        settings: EngineSettings,
        *,
        base_url: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._settings = settings
        self._base = base_url or settings.url
        self._owns_session = session is None
        self._session = engine_session(settings) if session is None else session
        self._connector = self._session.connector
        # Retries made, by reason (connect, disconnect, status_503): the runtime admin view.
        self.retried: Counter[str] = Counter()
        self._timeout = aiohttp.ClientTimeout(
            total=settings.request_timeout_s,
            connect=settings.connect_timeout_s,
            sock_read=settings.read_timeout_s,
        )
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
        )
        self._probe_timeout = aiohttp.ClientTimeout(total=max(settings.connect_timeout_s, 2.0))

    def _map_error(self, exc: BaseException) -> LoraplexError:
        retry = self._settings.retry_after_s
        if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
            return EngineUnavailable("The inference engine is not reachable.", retry_after_s=retry)
        if isinstance(exc, asyncio.TimeoutError):
            return UpstreamTimeout("The inference engine did not answer in time.")
        if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | OSError):
            # reset / disconnected (e.g. a pooled connection to an engine that just died)
            return EngineUnavailable(
                "The inference engine closed the connection.", retry_after_s=retry
            )
        return UpstreamError("The inference engine connection failed.")

    async def post(self, path: str, payload: bytes) -> UpstreamResponse:
        resp = await self._send(path, payload, self._timeout)
        try:
            return UpstreamResponse(resp.status, await resp.read())
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self._map_error(exc) from exc
        finally:
            resp.release()

    async def open_stream(self, path: str, payload: bytes) -> UpstreamStream:
        return _AiohttpStream(
            await self._send(path, payload, self._stream_timeout), self._map_error
        )

    async def _send(
        self, path: str, payload: bytes, limits: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        """POST until the response headers arrive, retrying by the module docstring's rule."""
        retries = self._settings.retries
        for attempt in range(retries + 1):
            last = attempt == retries
            try:
                resp = await self._session.post(
                    self._base + path, data=payload, headers=JSON_HEADERS, timeout=limits
                )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                reason = retry_reason(exc)
                if last or reason is None:
                    raise self._map_error(exc) from exc
            else:
                if resp.status != 503 or last:
                    return resp
                reason = "status_503"
                # Read the (small) refusal so the connection can be reused; drop it otherwise.
                with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
                    await resp.read()
                resp.release()
            self.retried[reason] += 1
            log.info("engine request retried", extra={"reason": reason, "attempt": attempt + 1})
            await asyncio.sleep(self._backoff(attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)] (spreads a retry storm)."""
        s = self._settings
        ceiling = min(s.retry_backoff_max_s, s.retry_backoff_s * 2**attempt)
        return random.uniform(0.0, ceiling)  # noqa: S311 (jitter, not crypto)

    def pool_stats(self) -> dict[str, int]:
        """Engine connections open now: idle in the pool and in use (the runtime admin view)."""
        idle = sum(len(conns) for conns in getattr(self._connector, "_conns", {}).values())
        in_use = len(getattr(self._connector, "_acquired", ()))
        return {"idle": idle, "in_use": in_use}

    async def health(self) -> bool:
        try:
            async with self._session.get(
                self._base + "/health", timeout=self._probe_timeout
            ) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def load(self) -> EngineLoad | None:
        """Queue depth from vLLM's /metrics (None: not exported or not reachable)."""
        try:
            async with self._session.get(
                self._base + "/metrics", timeout=self._probe_timeout
            ) as resp:
                if resp.status != 200:
                    return None
                text = await resp.text(errors="replace")
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            return None
        return parse_engine_load(text)

    async def served_models(self) -> set[str]:
        try:
            async with self._session.get(
                self._base + "/v1/models", timeout=self._probe_timeout
            ) as resp:
                if resp.status != 200:
                    raise UpstreamError(f"engine /v1/models answered {resp.status}")
                raw = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self._map_error(exc) from exc
        try:
            return {str(m["id"]) for m in orjson.loads(raw).get("data", [])}
        except (ValueError, TypeError, KeyError, AttributeError):
            raise UpstreamError("engine /v1/models answered an unexpected body") from None

    async def load_adapter(self, engine_name: str, path: str) -> None:
        payload: dict[str, object] = {"lora_name": engine_name, "lora_path": path}
        resp = await self.post("/v1/load_lora_adapter", orjson.dumps(payload))
        if resp.status == 400 and "already" in engine_message(resp.body).lower():
            # The engine kept it from an earlier gateway life: reload from the path asked now.
            payload["load_inplace"] = True
            resp = await self.post("/v1/load_lora_adapter", orjson.dumps(payload))
        if resp.status == 200:
            return
        if resp.status in (400, 404, 422, 500):  # vLLM reports unloadable adapters as 500
            raise AdapterLoadFailed(f"engine refused the adapter: {engine_message(resp.body)}")
        raise UpstreamError(f"engine failed to load the adapter ({resp.status})")

    async def unload_adapter(self, engine_name: str) -> None:
        payload = orjson.dumps({"lora_name": engine_name})
        resp = await self.post("/v1/unload_lora_adapter", payload)
        if resp.status in (200, 404):  # 404: engine no longer has it; the goal is reached
            return
        if resp.status == 400 and "not found" in engine_message(resp.body).lower():
            return
        raise UpstreamError(f"engine failed to unload the adapter ({resp.status})")

    async def aclose(self) -> None:
        if self._owns_session:
            await self._session.close()


_LOAD_SERIES = {b"vllm:num_requests_waiting": "waiting", b"vllm:num_requests_running": "running"}


def parse_engine_load(text: str) -> EngineLoad | None:
    """Sum vLLM's waiting / running gauges over their label sets (one per served model)."""
    sums = {"waiting": 0.0, "running": 0.0}
    seen = False
    for line in text.encode().splitlines():
        if not line.startswith(b"vllm:num_requests_"):
            continue
        # `name{labels} value [timestamp]` or `name value [timestamp]`
        if b"{" in line:
            name, _, rest = line.partition(b"{")
            fields = rest.rpartition(b"}")[2].split()
        else:
            name, *fields = line.split()
        key = _LOAD_SERIES.get(name.strip())
        if key is None or not fields:
            continue
        try:
            sums[key] += float(fields[0])
        except ValueError:
            continue
        seen = True
    return EngineLoad(sums["waiting"], sums["running"]) if seen else None


def retry_reason(exc: BaseException) -> str | None:
    """Why a failure before the response headers may be retried (None: it may not)."""
    if isinstance(exc, TimeoutError | aiohttp.ClientSSLError):
        return None  # a timeout: the engine may be working on it; TLS: it will fail again
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "disconnect"
    return None


def engine_message(body: bytes) -> str:
    """Best-effort message from a vLLM error body (JSON error object or plain text)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")[:300]
    if isinstance(parsed, dict):
        err = parsed.get("error", parsed)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:300]
    return str(parsed)[:300]
