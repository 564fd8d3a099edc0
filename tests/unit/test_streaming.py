"""Streaming relay through the app: order, framing, usage chunk, mid-stream failures."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from server.errors import EngineUnavailable, UpstreamTimeout
from tests.unit.fakes import USAGE, StreamScript, stream_chunks
from tests.unit.helpers import (
    ACME_KEY,
    Gateway,
    assert_error_payload,
    auth,
    metric,
    served,
    sse_data,
)


async def _stream(
    gw: Gateway, path: str = "/v1/chat/completions", **body: Any
) -> tuple[int, dict[str, str], list[str]]:
    payload: dict[str, Any] = {"stream": True, **body}
    if path.endswith("chat/completions"):
        payload.setdefault("messages", [{"role": "user", "content": "hi"}])
    async with asyncio.timeout(5):  # a hanging stream fails the test instead of the suite
        resp = await gw.client.post(path, json=payload, headers=auth(ACME_KEY))
    data = sse_data(resp.text) if resp.status_code == 200 else []
    return resp.status_code, dict(resp.headers), data


async def test_events_forwarded_in_order_unchanged_usage_hidden(gw: Gateway) -> None:
    events = [
        b'{"id":"a","choices":[{"index":0,"delta":{"role":"assistant"}}],"model":"legal"}',
        b'{"id":"a","choices":[{"index":0,"delta":{"content":"x\\ny"}}],  "odd" : 1}',
        b'{"id":"a","choices":[{"index":0,"delta":{"content":"\\"error\\""}}]}',
        b'{"id":"a","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}',
        b"[DONE]",
    ]
    gw.engine.streams_script.append(StreamScript(events=list(events)))
    status, headers, data = await _stream(gw)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert headers["x-loraplex-adapter"] == "legal@1"
    assert "x-request-id" in headers
    # Byte-identical, same order, usage-only chunk dropped, [DONE] last.
    assert data == [e.decode() for e in events[:3]] + ["[DONE]"]
    [fwd] = gw.engine.forwarded
    assert fwd.stream
    assert fwd.path == "/v1/chat/completions"
    assert fwd.body["stream_options"] == {"include_usage": True}
    assert fwd.body["model"] == served(gw, "legal")
    assert gw.engine.streams[0].closed
    assert gw.state.engines.in_flight(served(gw, "legal")) == 0  # the lease was released


async def test_usage_chunk_kept_when_client_asked(gw: Gateway) -> None:
    status, _, data = await _stream(gw, stream_options={"include_usage": True, "extra": 1})
    assert status == 200
    assert data[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == USAGE
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:-1]] == ["Hel", "lo", "!"]
    assert all(c["model"] == served(gw, "legal") for c in chunks)
    # The client's stream_options go through as given.
    assert gw.engine.forwarded[0].body["stream_options"] == {"include_usage": True, "extra": 1}


async def test_usage_hidden_when_client_set_include_usage_false(gw: Gateway) -> None:
    status, _, data = await _stream(gw, stream_options={"include_usage": False})
    assert status == 200
    assert all("usage" not in orjson.loads(d) for d in data[:-1])
    assert gw.engine.forwarded[0].body["stream_options"] == {"include_usage": True}


async def test_completions_stream_and_model_rewrite(gw: Gateway) -> None:
    status, headers, data = await _stream(gw, "/v1/completions", prompt="p", model="medical")
    assert status == 200
    assert headers["x-loraplex-adapter"] == "medical@1"
    assert data[-1] == "[DONE]"
    fwd = gw.engine.forwarded[0]
    assert fwd.path == "/v1/completions"
    assert fwd.body["model"] == served(gw, "medical")


async def test_stream_token_metrics_counted_even_when_usage_hidden(gw: Gateway) -> None:
    before = await gw.metrics()
    await _stream(gw)
    await _stream(gw, stream_options={"include_usage": True})
    after = await gw.metrics()
    labels = {"tenant": "acme", "adapter": "legal"}
    for name, per_request in (
        ("loraplex_prompt_tokens_total", USAGE["prompt_tokens"]),
        ("loraplex_completion_tokens_total", USAGE["completion_tokens"]),
    ):
        assert metric(after, name, **labels) - metric(before, name, **labels) == 2 * per_request
    ttft = "loraplex_time_to_first_token_seconds_count"
    assert metric(after, ttft, **labels) - metric(before, ttft, **labels) == 2
    # 3 token chunks + usage chunk per stream: 3 gaps each.
    itl = "loraplex_inter_token_latency_seconds_count"
    assert metric(after, itl, adapter="legal") - metric(before, itl, adapter="legal") == 6
    lat = "loraplex_request_duration_seconds_count"
    lat_labels = {**labels, "endpoint": "chat", "stream": "True"}
    assert metric(after, lat, **lat_labels) - metric(before, lat, **lat_labels) == 2
    req = "loraplex_requests_total"
    req_labels = {**labels, "endpoint": "chat", "status": "200"}
    assert metric(after, req, **req_labels) - metric(before, req, **req_labels) == 2
    assert metric(after, "loraplex_in_flight_requests", tenant="acme") == 0


async def test_mid_stream_engine_failure_ends_with_error_then_done(gw: Gateway) -> None:
    events = stream_chunks("legal", ["a", "b", "c"], with_usage=False)
    gw.engine.streams_script.append(
        StreamScript(events=events, fail_after=2, raise_mid=EngineUnavailable("engine died"))
    )
    before = await gw.metrics()
    status, _, data = await _stream(gw)
    assert status == 200
    assert data[:2] == [e.decode() for e in events[:2]]
    assert len(data) == 4
    assert_error_payload(orjson.loads(data[2]), "engine_unavailable")
    assert data[3] == "[DONE]"
    assert gw.engine.streams[0].closed
    assert gw.state.engines.in_flight(served(gw, "legal")) == 0
    after = await gw.metrics()
    code = "engine_unavailable"
    assert (
        metric(after, "loraplex_errors_total", code=code)
        - metric(before, "loraplex_errors_total", code=code)
        == 1
    )
    assert (
        metric(after, "loraplex_requests_total", status="503")
        - metric(before, "loraplex_requests_total", status="503")
        == 1
    )


async def test_mid_stream_timeout_before_first_event(gw: Gateway) -> None:
    gw.engine.streams_script.append(
        StreamScript(events=[b"{}"], fail_after=0, raise_mid=UpstreamTimeout("slow"))
    )
    status, _, data = await _stream(gw)
    assert status == 200
    assert len(data) == 2
    assert_error_payload(orjson.loads(data[0]), "upstream_timeout")
    assert data[1] == "[DONE]"
    assert gw.engine.streams[0].closed


async def test_stream_without_done_gets_error_event(gw: Gateway) -> None:
    events = stream_chunks("legal", ["a", "b"], with_usage=False)[:-1]  # no [DONE]
    gw.engine.streams_script.append(StreamScript(events=events))
    status, _, data = await _stream(gw)
    assert status == 200
    assert data[:2] == [e.decode() for e in events]
    err = assert_error_payload(orjson.loads(data[2]), "upstream_error")
    assert "early" in err["message"]
    assert data[3] == "[DONE]"
    assert len(data) == 4


async def test_engine_error_event_is_forwarded_and_counted(gw: Gateway) -> None:
    error_event = b'{"error":{"message":"boom","type":"BadRequestError","code":400}}'
    gw.engine.streams_script.append(
        StreamScript(events=[b'{"choices":[]}', error_event, b"[DONE]"])
    )
    before = await gw.metrics()
    status, _, data = await _stream(gw)
    assert status == 200
    assert data == ['{"choices":[]}', error_event.decode(), "[DONE]"]
    after = await gw.metrics()
    assert (
        metric(after, "loraplex_errors_total", code="upstream_error")
        - metric(before, "loraplex_errors_total", code="upstream_error")
        == 1
    )


async def test_events_after_done_are_not_forwarded(gw: Gateway) -> None:
    gw.engine.streams_script.append(StreamScript(events=[b'{"a":1}', b"[DONE]", b'{"late":1}']))
    status, _, data = await _stream(gw)
    assert status == 200
    assert data == ['{"a":1}', "[DONE]"]
    assert gw.engine.streams[0].closed
