"""Time limits of one generation request: the request timeout and the maximum stream duration.

- `request_timeout_s` bounds everything the gateway does before the response starts: reading
  the body, routing, waiting for the adapter to be registered on the engine, and the engine's
  answer (a non-streaming request) or its first response bytes (a stream). Over it → 504
  `request_timeout` and whatever was in progress is cancelled (the upstream connection closed,
  so vLLM aborts the request).
- `max_stream_duration_s` bounds a streamed response, counted from the request's arrival. A
  stream that is still running then ends with the SSE error event `stream_timeout` followed by
  `[DONE]`, like any stream that fails once started (the status line has gone out already).

Checking a stream's deadline costs one clock read per event; a timer is armed only while the
time left is shorter than the engine's read timeout, since until then a silent engine is cut
by that read timeout first (each event is waited for at most that long).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from server.errors import LoraplexError
from server.relay import DONE, RequestRecord, sse_event

T = TypeVar("T")


class RequestTimeout(LoraplexError):
    status = 504
    code = "request_timeout"
    type = "server_error"


class StreamTimeout(LoraplexError):
    status = 504
    code = "stream_timeout"
    type = "server_error"


async def within(deadline_s: float | None, work: Callable[[], Awaitable[T]]) -> T:
    """Await `work()`, cancelling it and raising 504 `request_timeout` after `deadline_s`."""
    if deadline_s is None:
        return await work()
    scope = asyncio.timeout(deadline_s)
    try:
        async with scope:
            return await work()
    except TimeoutError:
        if not scope.expired():
            raise  # a TimeoutError of the work's own, not ours
        raise RequestTimeout(f"The request did not complete within {deadline_s:g} s.") from None


async def bounded_stream(
    events: AsyncIterator[bytes], record: RequestRecord, deadline: float, silence_s: float
) -> AsyncIterator[bytes]:
    """Relay `events` until `deadline` (event-loop time), then end the stream with the SSE
    error `stream_timeout` and `[DONE]` (module docstring)."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                break
            if left < silence_s:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(events)
                except TimeoutError:
                    break
            else:
                chunk = await anext(events)
            yield chunk
            if chunk == DONE:
                return
    except StopAsyncIteration:
        return
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
    exc = StreamTimeout("The stream exceeded its maximum duration.")
    record.fail(exc)
    record.completed = True
    yield sse_event(exc.json_bytes())
    yield DONE
