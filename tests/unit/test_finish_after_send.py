"""A non-streaming answer is accounted once it has been sent: metrics, the access line and the
adapter lease come after the response's last message, and still come if sending fails."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from starlette.types import Message

from tests.unit.helpers import ASGIClient, Gateway, metric, served

BODY = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "legal"})


async def test_the_request_is_accounted_after_its_answer_went_out(gw: Gateway) -> None:
    before = metric(await gw.metrics(), "loraplex_requests_total", tenant="acme", status="200")
    seen_at_send: list[float] = []
    client = ASGIClient(gw, BODY)

    async def send(message: Message) -> None:
        client.sent.append(message)
        if message["type"] == "http.response.body":  # the answer is out; still in flight
            seen_at_send.append(gw.state.engines.in_flight(served(gw, "legal")))

    client._send = send  # type: ignore[method-assign]
    async with asyncio.timeout(3):
        await client.run()
    assert client.status == 200
    assert seen_at_send == [1]
    after = await gw.metrics()
    assert gw.state.engines.in_flight(served(gw, "legal")) == 0
    assert metric(after, "loraplex_requests_total", tenant="acme", status="200") == before + 1
    assert metric(after, "loraplex_in_flight_requests", tenant="acme") == 0


async def test_a_failed_send_still_accounts_the_request(gw: Gateway) -> None:
    client = ASGIClient(gw, BODY)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise OSError("client gone")  # what an ASGI 2.4 server may do
        client.sent.append(message)

    client._send = send  # type: ignore[method-assign]
    with pytest.raises(OSError, match="client gone"):
        async with asyncio.timeout(3):
            await client.run()
    assert gw.state.engines.in_flight(served(gw, "legal")) == 0
    assert metric(await gw.metrics(), "loraplex_in_flight_requests", tenant="acme") == 0
