"""Non-streaming chat and completions through the gateway: forwarding, headers, request ids."""

from __future__ import annotations

import re

import orjson

from tests.unit.fakes import USAGE, Answer
from tests.unit.helpers import ACME_KEY, Gateway, assert_error, auth, served


async def test_chat_forwards_body_with_model_rewritten(gw: Gateway) -> None:
    resp = await gw.chat(model="medical", temperature=0.2, vendor_extension={"x": 1})
    assert resp.status_code == 200
    assert resp.headers["x-loraplex-adapter"] == "medical@1"
    body = resp.json()
    assert body["object"] == "chat.completion"
    # The engine's body comes back unchanged: it names the version's engine-side name.
    assert body["model"] == served(gw, "medical")
    assert body["usage"] == USAGE
    [fwd] = gw.engine.forwarded
    assert fwd.path == "/v1/chat/completions"
    assert not fwd.stream
    # Unknown fields pass through untouched; only `model` is rewritten.
    assert fwd.body == {
        "messages": [{"role": "user", "content": "hi"}],
        "model": served(gw, "medical"),
        "temperature": 0.2,
        "vendor_extension": {"x": 1},
    }


async def test_completions_forwarded_to_completions_path(gw: Gateway) -> None:
    resp = await gw.client.post(
        "/v1/completions",
        json={"model": "legal", "prompt": "Once upon", "max_tokens": 4},
        headers=auth(ACME_KEY),
    )
    assert resp.status_code == 200
    assert resp.json()["object"] == "text_completion"
    assert resp.headers["x-loraplex-adapter"] == "legal@1"
    [fwd] = gw.engine.forwarded
    assert fwd.path == "/v1/completions"
    assert fwd.body == {"model": served(gw, "legal"), "prompt": "Once upon", "max_tokens": 4}


async def test_completions_accepts_token_prompts(gw: Gateway) -> None:
    for prompt in ([1, 2, 3], [[1, 2], [3]], ["a", "b"]):
        resp = await gw.client.post(
            "/v1/completions", json={"prompt": prompt}, headers=auth(ACME_KEY)
        )
        assert resp.status_code == 200, resp.text
    assert [f.body["prompt"] for f in gw.engine.forwarded] == [[1, 2, 3], [[1, 2], [3]], ["a", "b"]]


async def test_engine_body_is_passed_through_byte_for_byte(gw: Gateway) -> None:
    raw = b'{"id":"x","choices":[],"model":"legal","weird":  [1, 2]}'
    gw.engine.answers.append(Answer(200, raw))
    resp = await gw.chat()
    assert resp.status_code == 200
    assert resp.content == raw
    assert resp.headers["content-type"] == "application/json"


async def test_request_id_generated_when_absent(gw: Gateway) -> None:
    a = await gw.chat()
    b = await gw.chat()
    for r in (a, b):
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    assert a.headers["x-request-id"] != b.headers["x-request-id"]


async def test_sane_client_request_id_is_echoed(gw: Gateway) -> None:
    rid = "trace-01.ABC_def:42"
    resp = await gw.chat(headers={"X-Request-Id": rid})
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == rid
    # Error responses carry it too.
    err = await gw.client.get("/v1/models", headers={"X-Request-Id": rid})
    assert_error(err, 401, "invalid_api_key")
    assert err.headers["x-request-id"] == rid


async def test_insane_client_request_id_is_replaced(gw: Gateway) -> None:
    bad_ids = [b"has space", b"x" * 129, b"semi;colon", b"<script>", b"caf\xe9", b"\xb2\xb3"]
    for bad in bad_ids:
        resp = await gw.client.post(
            "/v1/chat/completions",
            content=orjson.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            headers=[
                (b"Authorization", f"Bearer {ACME_KEY}".encode()),
                (b"Content-Type", b"application/json"),
                (b"X-Request-Id", bad),
            ],
        )
        assert resp.status_code == 200
        rid = resp.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid), (bad, rid)


async def test_max_length_request_id_is_kept(gw: Gateway) -> None:
    rid = "r" * 128
    resp = await gw.chat(headers={"X-Request-Id": rid})
    assert resp.headers["x-request-id"] == rid


async def test_request_id_on_health_routes(gw: Gateway) -> None:
    resp = await gw.client.get("/healthz", headers={"X-Request-Id": "probe-1"})
    assert resp.headers["x-request-id"] == "probe-1"
