"""Time limits of one generation request: the request timeout and the maximum stream duration.

- `request_timeout_s` bounds everything the gateway does before the response starts: reading
  the body, routing, waiting for the adapter to be registered on the engine, and the engine's
  answer (a non-streaming request) or its first response bytes (a stream). Over it → 504
  `request_timeout` and whatever was in progress is cancelled (the upstream connection closed,
  so vLLM aborts the request).
- `max_stream_duration_s` bounds a streamed response, counted from the request's arrival. A
  stream that is still running then ends with the SSE error event `stream_timeout` followed by
  `[DONE]`, like any stream that fails once started (the status line has gone out already).

Request deadlines share one periodic timer per event loop (`_Sweeper`). Checking a stream's
deadline costs one clock read per event; a timer is armed only while the
time left is shorter than the engine's read timeout, since until then a silent engine is cut
by that read timeout first (each event is waited for at most that long).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

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
    loop = asyncio.get_running_loop()
    sweeper = _SWEEPERS.get(loop)
    if sweeper is None:
        sweeper = _SWEEPERS[loop] = _Sweeper()
    return await sweeper.run(deadline_s, work)


class _Sweeper:
    """Request deadlines of one event loop, enforced by one periodic timer for all requests.

    `asyncio.timeout` arms and cancels a timer per request (a few µs each, measured 5-8 µs on
    the busy development machine: several per cent of the gateway's ~80 µs of CPU per
    request); here a request costs a dict insert and delete, and a sweep every `tick` seconds
    (an eighth of the shortest timeout seen, within [10 ms, 1 s]) cancels the tasks past their
    deadline. A timeout fires up to one tick late. The cancellation reaches the task where it
    waits, inside `work()` (a task only waits at an await), and is turned into the 504 there;
    a cancellation from elsewhere (client gone, shutdown) passes through unchanged.
    """

    def __init__(self) -> None:
        self._due: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._tick = 1.0

    async def run(self, timeout_s: float, work: Callable[[], Awaitable[T]]) -> T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._due[task] = loop.time() + timeout_s
        if timeout_s < self._tick * 8:
            self._tick = min(1.0, max(0.01, timeout_s / 8))
        if self._timer is None:
            self._timer = loop.call_later(self._tick, self._sweep)
        try:
            return await work()
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            self._expired.discard(task)
            if task.uncancel() > 0:
                raise  # cancelled from elsewhere too: keep cancelling
            raise RequestTimeout(f"The request did not complete within {timeout_s:g} s.") from None
        finally:
            del self._due[task]
            if task in self._expired:  # the work swallowed the cancellation: withdraw it
                self._expired.discard(task)
                task.uncancel()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, due in self._due.items():
            if due <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._timer = loop.call_later(self._tick, self._sweep) if self._due else None


_SWEEPERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweeper] = (
    weakref.WeakKeyDictionary()
)


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
