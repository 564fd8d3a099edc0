"""A client that hangs up while the gateway waits for the engine: stop waiting, abort upstream.

uvicorn does not cancel an ASGI handler whose client went away; it only turns later sends into
no-ops. Without a listener the engine would generate a non-streamed answer nobody reads, and
the request would hold its adapter lease and concurrency slot until then. So while the gateway
waits for the engine (the JSON answer of a non-streamed request; the response head, and with
several engines the first event, of a stream) a task waits for `http.disconnect` and cancels
the wait. The upstream request is closed, which makes vLLM abort it, and the request is counted
499 `client_disconnected`. Once a stream's response has started, `server/fastpath.py`'s
listener takes over.

A listening task per request costs about 8 us of CPU (created, then cancelled): near a tenth
of the gateway's own work per request. Most waits are short, and a disconnect during a short
wait wastes little, so a request only gets its listener once it has waited between one and two
ticks of `_Watch` (`LISTEN_AFTER_S`); one periodic timer per event loop, running while any
request waits, starts them. A request pays a set insert and removal; an engine working on an
abandoned answer is told within two ticks.

The body has been read whole before the engine is asked, so the next message the server has
for the request is the disconnect (uvicorn, and Starlette's test transports, send nothing else
until the response is complete). Any other message ends the listening, and nothing is cancelled.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.types import Receive

from server.errors import LoraplexError

T = TypeVar("T")
LISTEN_AFTER_S = 0.1


class ClientDisconnected(LoraplexError):
    """Never seen by the client (it has gone); names the outcome in metrics and logs."""

    status = 499
    code = "client_disconnected"
    type = "invalid_request_error"


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising `ClientDisconnected` if the client leaves first.
    A cancellation from elsewhere (request timeout, shutdown) passes through unchanged."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    watch = _WATCHES.get(loop)
    if watch is None:
        watch = _WATCHES[loop] = _Watch()
    waiter = _Waiter(task, receive)
    watch.add(waiter)
    try:
        return await work
    except asyncio.CancelledError:
        if not waiter.client_left or task.uncancel() > 0:
            raise
        raise ClientDisconnected(
            "The client closed the connection before the answer was ready."
        ) from None
    finally:
        watch.discard(waiter)


class _Waiter:
    """One request waiting for the engine, and its listener once it has one."""

    __slots__ = ("client_left", "listener", "receive", "seen", "task", "waiting")

    def __init__(self, task: asyncio.Task[Any], receive: Receive) -> None:
        self.task, self.receive = task, receive
        self.listener: asyncio.Task[None] | None = None
        self.seen = False  # present at a tick: listens from the next one
        self.waiting = True
        self.client_left = False

    async def listen(self) -> None:
        try:
            message = await self.receive()
        except Exception:  # a server that cannot tell: wait for the engine
            return
        if message["type"] == "http.disconnect" and self.waiting:
            self.client_left = True
            self.task.cancel()


class _Watch:
    """The waiting requests of one event loop; a tick every `LISTEN_AFTER_S` while there are
    any gives a listener to those that were already waiting at the previous tick."""

    def __init__(self) -> None:
        self._waiters: set[_Waiter] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, waiter: _Waiter) -> None:
        self._waiters.add(waiter)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LISTEN_AFTER_S, self._tick)

    def discard(self, waiter: _Waiter) -> None:
        waiter.waiting = False
        self._waiters.discard(waiter)
        if waiter.listener is not None:
            waiter.listener.cancel()

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        for waiter in self._waiters:
            if waiter.listener is None:
                if waiter.seen:
                    waiter.listener = loop.create_task(waiter.listen())
                else:
                    waiter.seen = True
        self._timer = loop.call_later(LISTEN_AFTER_S, self._tick) if self._waiters else None


_WATCHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watch] = weakref.WeakKeyDictionary()
