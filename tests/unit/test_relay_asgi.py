"""The relay at the ASGI level (httpx's ASGITransport buffers whole responses, so these tests
drive the app directly): events leave as they arrive, and a client disconnect closes upstream."""

from __future__ import annotations

import asyncio

import orjson

from tests.unit.fakes import Answer, StreamScript, stream_chunks
from tests.unit.helpers import (
    ASGIClient,
    Gateway,
    assert_error_payload,
    metric,
    served,
    sse_data,
    wait_until,
)

CHAT_STREAM = orjson.dumps(
    {"messages": [{"role": "user", "content": "hi"}], "stream": True, "model": "legal"}
)


async def test_events_are_forwarded_before_the_stream_ends(gw: Gateway) -> None:
    events = stream_chunks("legal", ["a", "b", "c"], with_usage=False)
    script = StreamScript(events=events, block_after=2)
    gw.engine.streams_script.append(script)
    client = ASGIClient(gw, CHAT_STREAM)
    task = client.run()
    # The engine is stalled after two events: both must already be at the client.
    await wait_until(lambda: len(client.bodies()) == 2, what="two events relayed")
    assert client.sent[0]["type"] == "http.response.start"
    assert client.sent[0]["status"] == 200
    assert [b.decode() for b in client.bodies()] == [f"data: {e.decode()}\n\n" for e in events[:2]]
    assert not task.done()
    script.release.set()
    async with asyncio.timeout(3):
        await task
    text = b"".join(client.bodies()).decode()
    assert sse_data(text) == [e.decode() for e in events]
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_client_disconnect_closes_upstream_and_counts_499(gw: Gateway) -> None:
    events = stream_chunks("legal", ["a", "b"], with_usage=False)
    script = StreamScript(events=events, block_after=1)  # engine stalls after one event
    gw.engine.streams_script.append(script)
    before = await gw.metrics()
    client = ASGIClient(gw, CHAT_STREAM)
    task = client.run()
    await wait_until(lambda: len(client.bodies()) == 1, what="first event relayed")
    client.disconnect.set()
    async with asyncio.timeout(3):
        await task
    [stream] = gw.engine.streams
    assert stream.closed
    assert stream.events_yielded == 1
    assert gw.state.engines.in_flight(served(gw, "legal")) == 0  # lease released
    after = await gw.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("loraplex_requests_total", tenant="acme", adapter="legal", status="499") == 1
    assert delta("loraplex_errors_total", tenant="acme", code="client_disconnected") == 1
    assert metric(after, "loraplex_in_flight_requests", tenant="acme") == 0


async def test_cancelled_non_stream_request_is_accounted(gw: Gateway) -> None:
    gate = asyncio.Event()
    gw.engine.answers.append(Answer(200, b"{}", gate=gate))
    body = orjson.dumps({"messages": [{"role": "user", "content": "hi"}]})
    before = await gw.metrics()
    client = ASGIClient(gw, body)
    task = client.run()
    await wait_until(lambda: len(gw.engine.forwarded) == 1, what="request forwarded")
    assert metric(await gw.metrics(), "loraplex_in_flight_requests", tenant="acme") == 1
    assert gw.state.engines.in_flight(served(gw, "legal")) == 1  # the default: legal
    task.cancel()
    async with asyncio.timeout(3):
        await asyncio.gather(task, return_exceptions=True)
    after = await gw.metrics()
    assert metric(after, "loraplex_in_flight_requests", tenant="acme") == 0
    assert gw.state.engines.in_flight(served(gw, "legal")) == 0
    name = "loraplex_errors_total"
    code = {"tenant": "acme", "code": "client_disconnected"}
    assert metric(after, name, **code) - metric(before, name, **code) == 1


async def test_unexpected_error_mid_stream_still_ends_cleanly(gw: Gateway) -> None:
    events = stream_chunks("legal", ["a", "b"], with_usage=False)
    gw.engine.streams_script.append(
        StreamScript(events=events, fail_after=1, raise_mid=ValueError("Line is too long"))
    )
    client = ASGIClient(gw, CHAT_STREAM)
    async with asyncio.timeout(3):
        await client.run()
    data = sse_data(b"".join(client.bodies()).decode())
    assert data[0] == events[0].decode()
    err = assert_error_payload(orjson.loads(data[1]), "upstream_error")
    assert "too long" not in err["message"]
    assert data[2:] == ["[DONE]"]
    assert gw.engine.streams[0].closed
