"""Request bodies: JSON errors, field checks with `param`, size limits — all before the engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tests.unit.conftest import Config
from tests.unit.fakes import FakeEngine
from tests.unit.helpers import (
    ACME_KEY,
    ASGIClient,
    Gateway,
    assert_error,
    assert_error_payload,
    auth,
    dumps,
    metric,
    running_gateway,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b'{"messages": [}',
        b'{"model": "legal", "prompt": "\xff\xfe"}',  # invalid UTF-8 inside a string
        b"\xff\xfe{}",
        b'{"a": 1} trailing',
    ],
)
async def test_invalid_json(gw: Gateway, path: str, raw: bytes) -> None:
    resp = await gw.post_raw(path, raw)
    assert_error(resp, 400, "invalid_json", type_="invalid_request_error")
    assert gw.engine.forwarded == []


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"42", b"null", b"true"])
async def test_json_that_is_not_an_object(gw: Gateway, raw: bytes) -> None:
    resp = await gw.post_raw(CHAT, raw)
    err = assert_error(resp, 400, "invalid_json", param=None)
    assert "object" in err["message"]
    assert gw.engine.forwarded == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": MSGS, "max_tokens": -1}, "max_tokens"),
        ({"messages": MSGS, "max_tokens": 0}, "max_tokens"),
        ({"messages": MSGS, "max_tokens": 1.5}, "max_tokens"),
        ({"messages": MSGS, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": MSGS, "n": 0}, "n"),
        ({"messages": MSGS, "n": 129}, "n"),
        ({"messages": MSGS, "temperature": -0.1}, "temperature"),
        ({"messages": MSGS, "top_p": 0}, "top_p"),
        ({"messages": MSGS, "model": 12}, "model"),
        ({"messages": MSGS, "model": "m" * 257}, "model"),
        ({"messages": MSGS, "stream": "maybe"}, "stream"),
        ({"messages": MSGS, "stream": True, "stream_options": "yes"}, "stream_options"),
        (
            {"messages": MSGS, "stream": True, "stream_options": {"include_usage": "x"}},
            "stream_options.include_usage",
        ),
        ({"messages": MSGS, "user": ["a"]}, "user"),
    ],
)
async def test_chat_field_errors_name_the_param(
    gw: Gateway, body: dict[str, Any], param: str
) -> None:
    resp = await gw.post_raw(CHAT, dumps(body))
    err = assert_error(resp, 400, "invalid_request", param=param)
    assert param in err["message"]
    assert gw.engine.forwarded == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "n": 0}, "n"),
    ],
)
async def test_completion_field_errors(gw: Gateway, body: dict[str, Any], param: str) -> None:
    resp = await gw.post_raw(COMPLETIONS, dumps(body))
    assert_error(resp, 400, "invalid_request", param=param)
    assert gw.engine.forwarded == []


async def test_validation_error_counted(gw: Gateway) -> None:
    before = await gw.metrics()
    await gw.post_raw(CHAT, dumps({"messages": "hi"}))
    after = await gw.metrics()
    labels = {"tenant": "acme", "code": "invalid_request"}
    name = "loraplex_errors_total"
    assert metric(after, name, **labels) - metric(before, name, **labels) == 1


@pytest.fixture
async def small(config: Config, engine: FakeEngine) -> AsyncIterator[Gateway]:
    async with running_gateway(config.settings(max_body_bytes=1000), engine) as gw:
        yield gw


def _body_of(size: int) -> bytes:
    head = b'{"messages": [{"role": "user", "content": "'
    tail = b'"}]}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_body_at_limit_is_accepted(small: Gateway) -> None:
    raw = _body_of(1000)
    assert len(raw) == 1000
    resp = await small.post_raw(CHAT, raw)
    assert resp.status_code == 200


async def test_413_on_content_length(small: Gateway) -> None:
    resp = await small.post_raw(CHAT, _body_of(1001))
    assert_error(resp, 413, "request_too_large")
    assert small.engine.forwarded == []


async def test_413_on_chunked_body_without_content_length(small: Gateway) -> None:
    sent: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        raw = _body_of(5000)
        for i in range(0, len(raw), 400):
            sent.append(i)
            yield raw[i : i + 400]

    request = small.client.build_request(
        "POST",
        CHAT,
        content=chunks(),
        headers={**auth(ACME_KEY), "Content-Type": "application/json"},
    )
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    resp = await small.client.send(request)
    assert_error(resp, 413, "request_too_large")
    assert small.engine.forwarded == []


async def test_chunked_body_under_limit_is_accepted(small: Gateway) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        raw = _body_of(900)
        for i in range(0, len(raw), 100):
            yield raw[i : i + 100]

    resp = await small.client.post(
        CHAT, content=chunks(), headers={**auth(ACME_KEY), "Content-Type": "application/json"}
    )
    assert resp.status_code == 200
    assert small.engine.forwarded[0].body["messages"][0]["content"] == "x" * (
        900 - len(_body_of(0))
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["a", 5]}, "prompt"),
        ({"prompt": {"a": 1}}, "prompt"),
        ({"prompt": [[1, "x"]]}, "prompt"),
    ],
)
async def test_union_errors_name_a_real_field(
    gw: Gateway, body: dict[str, Any], param: str
) -> None:
    """pydantic reports union members (`prompt.str`); the client only knows `prompt...`."""
    resp = await gw.post_raw(COMPLETIONS, dumps(body))
    err = assert_error(resp, 400, "invalid_request")
    assert isinstance(err["param"], str)
    assert err["param"].startswith(param)
    assert "[" not in err["param"]
    assert ".str" not in err["param"]


@pytest.mark.parametrize("value", [b"abc", b"-", b"1e3", b""])
async def test_invalid_content_length_is_400(gw: Gateway, value: bytes) -> None:
    body = dumps({"messages": MSGS})
    client = ASGIClient(
        gw,
        body,
        headers=[
            (b"authorization", f"Bearer {ACME_KEY}".encode()),
            (b"content-length", value),
        ],
    )
    async with asyncio.timeout(3):
        await client.run()
    assert client.status == 400
    payload = orjson.loads(b"".join(client.bodies()))
    err = assert_error_payload(payload, "invalid_request")
    assert "Content-Length" in err["message"]
    assert gw.engine.forwarded == []
