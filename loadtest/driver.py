"""Drivers that send RequestSpecs to an OpenAI-compatible URL and time every response.

Open loop: Poisson arrivals at a fixed rate, independent of how fast answers come back (what
real traffic does; queueing shows up as latency). Closed loop: a fixed number of workers, each
sending its next request when the previous one ends (what saturation measurements need). Both
stop at a request count or a duration, whichever comes first, and then wait for what is in
flight. Streams are read chunk by chunk so TTFT, inter-token gaps and the number of HTTP chunks
per event are seen as the client sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson

from loadtest.workload import RequestSpec

Progress = Callable[[bool], None]


@dataclass(slots=True)
class RequestResult:
    """What one request did, as seen by the client; times in seconds."""

    tenant: str
    adapter: str
    domain: str
    stream: bool
    start: float  # since the level started
    status: int = 0  # 0: no HTTP answer (connection error, timeout)
    error: str | None = None
    e2e: float = 0.0
    ttft: float | None = None  # streams only: first event carrying generated text
    gaps: list[float] = field(default_factory=list)  # between text-carrying events
    output_tokens: int = 0
    events: int = 0  # SSE data events received, [DONE] excluded
    chunks: int = 0  # HTTP chunks (chunked transfer encoding) received, streams only

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass
class LevelRun:
    mode: str
    level: float  # arrival rate (open) or concurrency (closed)
    elapsed_s: float
    results: list[RequestResult]


async def send(
    session: aiohttp.ClientSession, url: str, spec: RequestSpec, t0: float
) -> RequestResult:
    """Send one request; never raises for HTTP or transport failures (they are results)."""
    started = time.perf_counter()
    r = RequestResult(spec.tenant, spec.adapter, spec.domain, spec.stream, started - t0)
    try:
        async with session.post(url + spec.path, data=spec.body, headers=spec.headers) as resp:
            r.status = resp.status
            if resp.status != 200:
                r.error = _error_code(await resp.read(), resp.status)
            elif spec.stream:
                await _read_stream(resp, r, started)
            else:
                _read_body(await resp.read(), r)
    except TimeoutError:
        r.error = "timeout"
    except aiohttp.ClientConnectorError:
        r.error = "connect_error"
    except (aiohttp.ClientError, OSError):
        r.error = "connection_error"
    r.e2e = time.perf_counter() - started
    return r


async def _read_stream(resp: aiohttp.ClientResponse, r: RequestResult, started: float) -> None:
    buf = b""
    last: float | None = None
    usage_tokens: int | None = None
    text_events = 0
    done = False
    async for data, end_of_chunk in resp.content.iter_chunks():
        r.chunks += end_of_chunk
        buf += data
        while b"\n\n" in buf:
            raw, buf = buf.split(b"\n\n", 1)
            payload = _data(raw)
            if payload is None:
                continue
            if payload == b"[DONE]":
                done = True
                continue
            r.events += 1
            chunk = _loads(payload)
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                r.error = _code_of(chunk, "stream_error")
            if chunk.get("usage"):
                usage_tokens = int(chunk["usage"].get("completion_tokens") or 0)
            if _has_text(chunk):
                now = time.perf_counter()
                text_events += 1
                if last is None:
                    r.ttft = now - started
                else:
                    r.gaps.append(now - last)
                last = now
    r.output_tokens = usage_tokens if usage_tokens is not None else text_events
    if not done and r.error is None:
        r.error = "incomplete_stream"


def _read_body(raw: bytes, r: RequestResult) -> None:
    body = _loads(raw)
    if not isinstance(body, dict):
        r.error = "invalid_body"
        return
    usage = body.get("usage") or {}
    r.output_tokens = int(usage.get("completion_tokens") or 0)


def _data(raw: bytes) -> bytes | None:
    lines = [ln[5:].lstrip(b" ") for ln in raw.split(b"\n") if ln.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _has_text(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")):
            return True
        if choice.get("text"):
            return True
    return False


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _code_of(body: dict[str, Any], default: str) -> str:
    err = body.get("error")
    if isinstance(err, dict) and err.get("code"):
        return str(err["code"])[:64]
    return default


def _error_code(raw: bytes, status: int) -> str:
    body = _loads(raw)
    code = _code_of(body, "") if isinstance(body, dict) else ""
    return code or f"http_{status}"


def new_session(limit: int, timeout_s: float) -> aiohttp.ClientSession:
    """One pooled client for a level; `limit=0` means no connection cap (open loop)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    )


async def run_closed(
    url: str,
    specs: Iterator[RequestSpec],
    concurrency: int,
    max_requests: int,
    duration_s: float,
    timeout_s: float = 300.0,
    progress: Progress | None = None,
) -> LevelRun:
    """`concurrency` workers send back to back until `max_requests` or `duration_s`."""
    results: list[RequestResult] = []
    issued = 0
    async with new_session(concurrency, timeout_s) as session:
        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def worker() -> None:
            nonlocal issued
            while issued < max_requests and time.perf_counter() < deadline:
                spec = next(specs, None)
                if spec is None:
                    return
                issued += 1
                r = await send(session, url, spec, t0)
                results.append(r)
                if progress is not None:
                    progress(r.ok)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return LevelRun("closed", concurrency, elapsed, results)


async def run_open(
    url: str,
    specs: Iterator[RequestSpec],
    rate: float,
    max_requests: int,
    duration_s: float,
    rng: np.random.Generator,
    timeout_s: float = 300.0,
    progress: Progress | None = None,
) -> LevelRun:
    """Poisson arrivals at `rate` req/s until `max_requests` or `duration_s`, then drain."""
    results: list[RequestResult] = []
    tasks: set[asyncio.Task[None]] = set()
    async with new_session(0, timeout_s) as session:
        t0 = time.perf_counter()
        due = t0

        async def one(spec: RequestSpec) -> None:
            r = await send(session, url, spec, t0)
            results.append(r)
            if progress is not None:
                progress(r.ok)

        for _ in range(max_requests):
            due += float(rng.exponential(1.0 / rate))
            if due - t0 > duration_s:
                break
            spec = next(specs, None)
            if spec is None:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(spec))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks), timeout_s)
        elapsed = time.perf_counter() - t0
    return LevelRun("open", rate, elapsed, results)


async def warm_up(url: str, specs: Iterator[RequestSpec], n: int, timeout_s: float) -> None:
    """Send `n` requests one by one, unmeasured (connection set-up, engine caches)."""
    if n <= 0:
        return
    async with new_session(1, timeout_s) as session:
        t0 = time.perf_counter()
        for _ in range(n):
            spec = next(specs, None)
            if spec is None:
                return
            await send(session, url, spec, t0)
