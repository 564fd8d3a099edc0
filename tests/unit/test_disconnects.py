"""A client that leaves while the gateway waits for the engine: the wait is cancelled (so is
the upstream request), the request counted 499 and its lease released (server/disconnects.py)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from starlette.types import Message

from server.deadlines import RequestTimeout, within
from server.disconnects import LISTEN_AFTER_S, ClientDisconnected, unless_disconnected
from tests.unit.fakes import Answer, StreamScript, stream_chunks
from tests.unit.helpers import ASGIClient, Gateway, metric, served, wait_until


class Peer:
    """A receive channel: the disconnect (or `message`) comes once `leave` is set."""

    def __init__(self, message: Message | None = None) -> None:
        self.leave = asyncio.Event()
        self.message = message or {"type": "http.disconnect"}
        self.calls = 0

    async def receive(self) -> Message:
        self.calls += 1
        await self.leave.wait()
        return self.message


class Work:
    """Something to wait for that notes whether it was cancelled."""

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.cancelled = False

    async def __call__(self) -> str:
        try:
            await self.done.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return "answer"


def tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_the_answer_wins_and_the_listener_goes() -> None:
    peer, work = Peer(), Work()
    before = tasks()
    waiting = asyncio.create_task(unless_disconnected(peer.receive, work()))
    await wait_until(lambda: peer.calls == 1, what="the listener waits")
    work.done.set()
    assert await waiting == "answer"
    await asyncio.sleep(0)
    assert tasks() == before  # the listener was cancelled, not left waiting
    peer.leave.set()  # a late disconnect cancels nothing
    await asyncio.sleep(0)
    assert not work.cancelled


async def test_a_short_wait_gets_no_listener() -> None:
    peer, work = Peer(), Work()
    waiting = asyncio.create_task(unless_disconnected(peer.receive, work()))
    await asyncio.sleep(LISTEN_AFTER_S / 2)
    work.done.set()
    assert await waiting == "answer"
    await asyncio.sleep(LISTEN_AFTER_S * 2.5)
    assert peer.calls == 0


async def test_a_disconnect_cancels_the_wait() -> None:
    peer, work = Peer(), Work()
    waiting = asyncio.create_task(unless_disconnected(peer.receive, work()))
    await wait_until(lambda: peer.calls == 1, what="the listener waits")
    peer.leave.set()
    with pytest.raises(ClientDisconnected) as caught:
        await waiting
    assert work.cancelled
    assert (caught.value.status, caught.value.error_code) == (499, "client_disconnected")
    assert not waiting.cancelled()  # the listener's cancellation was taken back


async def test_another_message_cancels_nothing() -> None:
    peer = Peer({"type": "http.request", "body": b"", "more_body": False})
    work = Work()
    waiting = asyncio.create_task(unless_disconnected(peer.receive, work()))
    peer.leave.set()
    await wait_until(lambda: peer.calls == 1, what="the listener got its message")
    await asyncio.sleep(0.01)
    assert not waiting.done()
    work.done.set()
    assert await waiting == "answer"
    assert peer.calls == 1  # it listened once: no busy loop on a server that repeats itself


async def test_a_failing_receive_cancels_nothing() -> None:
    calls: list[int] = []

    async def broken() -> Message:
        calls.append(1)
        raise RuntimeError("no receive here")

    work = Work()
    waiting = asyncio.create_task(unless_disconnected(broken, work()))
    await wait_until(lambda: calls == [1], what="the listener tried")
    await asyncio.sleep(0.01)
    assert not waiting.done()
    work.done.set()
    assert await waiting == "answer"


async def test_a_cancellation_from_elsewhere_passes_through() -> None:
    peer, work = Peer(), Work()
    waiting = asyncio.create_task(unless_disconnected(peer.receive, work()))
    await wait_until(lambda: peer.calls == 1, what="the listener waits")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert work.cancelled


async def test_the_request_timeout_still_wins_over_a_slow_engine() -> None:
    peer, work = Peer(), Work()

    async def guarded() -> str:
        return await unless_disconnected(peer.receive, work())

    with pytest.raises(RequestTimeout):
        await within(0.05, guarded)
    assert work.cancelled


# -- through the gateway ----------------------------------------------------------------------

BODY = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "legal"})
STREAM_BODY = orjson.dumps(
    {"messages": [{"role": "user", "content": "hi"}], "model": "legal", "stream": True}
)


async def _leave_while_the_engine_works(gw: Gateway, client: ASGIClient) -> None:
    before = metric(await gw.metrics(), "loraplex_requests_total", tenant="acme", status="499")
    task = client.run()
    await wait_until(lambda: gw.state.engines.in_flight(served(gw, "legal")) == 1)
    await wait_until(lambda: len(gw.engine.forwarded) == 1, what="the engine was asked")
    client.disconnect.set()
    async with asyncio.timeout(3):  # the engine never answers: only the disconnect ends it
        await task
    after = await gw.metrics()
    assert metric(after, "loraplex_requests_total", tenant="acme", status="499") == before + 1
    assert metric(after, "loraplex_in_flight_requests", tenant="acme") == 0
    assert gw.state.engines.in_flight(served(gw, "legal")) == 0


async def test_a_client_leaving_a_json_request_cancels_the_engine_call(gw: Gateway) -> None:
    gate = asyncio.Event()  # never set: the engine is still generating
    gw.engine.answers.append(Answer(gate=gate))
    client = ASGIClient(gw, BODY)
    await _leave_while_the_engine_works(gw, client)
    assert not gate.is_set()


async def test_a_client_leaving_before_the_stream_starts_cancels_the_open(gw: Gateway) -> None:
    gate = asyncio.Event()
    gw.engine.streams_script.append(
        StreamScript(events=stream_chunks(served(gw, "legal"), ["a"], True), open_gate=gate)
    )
    client = ASGIClient(gw, STREAM_BODY)
    await _leave_while_the_engine_works(gw, client)
    assert gw.engine.streams == []  # the stream was never opened


async def test_an_answer_before_any_disconnect_is_sent_whole(gw: Gateway) -> None:
    client = ASGIClient(gw, BODY)
    async with asyncio.timeout(3):
        await client.run()
    assert client.status == 200
    assert orjson.loads(b"".join(client.bodies()))["choices"]
