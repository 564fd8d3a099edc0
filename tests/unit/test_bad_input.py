"""Bad input on every kind of route (issue 8, "Bad input"; docs/reliability.md): malformed
JSON, wrong types, huge and lying bodies, deep nesting, invalid UTF-8, unknown fields, header
injection through adapter and model names, absurd counts. Generation requests go through the
ASGI fast path (server/fastpath.py), admin and feedback through FastAPI's routes; all must
answer a 4xx in the error shape, never a 500, and never reach the engine.

Rule for unknown fields (docs/api.md): generation bodies pass them through to the engine
unchanged (OpenAI and vLLM add sampling parameters faster than the gateway could list them);
admin and feedback bodies refuse them (400 `invalid_request`, `param` names the field).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from starlette.types import Message, Scope

from server.pipeline import MAX_JSON_DEPTH
from tests.unit.conftest import Config
from tests.unit.fakes import FakeEngine
from tests.unit.helpers import (
    ACME_KEY,
    ADMIN_KEY,
    Gateway,
    assert_error,
    assert_error_payload,
    dumps,
    running_gateway,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# (path, key, a valid body): one generation route per endpoint, normal routes of each kind.
ROUTES = [
    (CHAT, ACME_KEY, {"messages": MSGS}),
    (COMPLETIONS, ACME_KEY, {"prompt": "hi"}),
    ("/v1/feedback", ACME_KEY, {"request_id": "r1", "rating": "up"}),
    ("/admin/v1/tenants", ADMIN_KEY, {"name": "gamma", "adapters": ["legal"]}),
    ("/admin/v1/adapters/legal/aliases/canary", ADMIN_KEY, {"version": 1}),
    ("/admin/v1/experiments/ab/weights", ADMIN_KEY, {"weights": {"candidate": 0.1}}),
    ("/admin/v1/adapters", ADMIN_KEY, {"name": "new", "source": "/nowhere", "metadata": {}}),
]
ROUTE_IDS = [r[0] for r in ROUTES]


def _method(path: str) -> str:
    return "PUT" if "/aliases/" in path else "POST"


async def send(gw: Gateway, path: str, raw: bytes, key: str = ACME_KEY, **headers: str) -> Any:
    return await gw.client.request(
        _method(path),
        path,
        content=raw,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers},
    )


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# -- malformed JSON, invalid UTF-8, wrong types -------------------------------------------


@pytest.mark.parametrize(("path", "key", "body"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b'{"a": 1,}',
        b'{"a": NaN}',
        b'{"a": 1e400}',  # infinity
        b'{"a": "\\ud800"}',  # lone surrogate
        b'{"a": "\xff\xfe"}',  # invalid UTF-8 in a string
        b"\xef\xbb\xbf{}",  # byte order mark
        b"[1, 2]",
        b"null",
    ],
    ids=[
        "syntax",
        "empty",
        "trailing-comma",
        "nan",
        "inf",
        "surrogate",
        "utf8",
        "bom",
        "array",
        "null",
    ],
)
async def test_malformed_json_is_400_everywhere(
    gw: Gateway, path: str, key: str, body: dict[str, Any], raw: bytes
) -> None:
    del body
    resp = await send(gw, path, raw, key)
    assert_error(resp, 400, "invalid_json", param=None, type_="invalid_request_error")
    assert gw.engine.forwarded == []


@pytest.mark.parametrize(
    ("path", "key", "body", "param"),
    [
        ("/v1/feedback", ACME_KEY, {"request_id": 5, "rating": "up"}, "request_id"),
        ("/v1/feedback", ACME_KEY, {"request_id": "r", "score": "high"}, "score"),
        ("/admin/v1/tenants", ADMIN_KEY, {"name": ["gamma"]}, "name"),
        ("/admin/v1/tenants", ADMIN_KEY, {"name": "g", "adapters": "legal"}, "adapters"),
        ("/admin/v1/tenants", ADMIN_KEY, {"name": "g", "quotas": {"max_n": "x"}}, "quotas.max_n"),
        ("/admin/v1/adapters/legal/aliases/canary", ADMIN_KEY, {"version": "one"}, "version"),
        ("/admin/v1/adapters/legal/aliases/canary", ADMIN_KEY, {"version": 2**40}, "version"),
        ("/admin/v1/experiments/ab/weights", ADMIN_KEY, {"weights": [0.1]}, "weights"),
    ],
)
async def test_wrong_types_on_normal_routes_name_the_param(
    gw: Gateway, path: str, key: str, body: dict[str, Any], param: str
) -> None:
    resp = await send(gw, path, dumps(body), key)
    err = assert_error(resp, 400, "invalid_request", param=param)
    assert param in err["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/admin/v1/adapters/legal/versions/99999999999999999999",
        "/admin/v1/adapters/legal/versions/-1",
        "/admin/v1/adapters/legal/versions/1.5",
        "/admin/v1/audit?before=99999999999999999999",
    ],
)
async def test_out_of_range_integers_in_paths_and_queries_are_400(gw: Gateway, path: str) -> None:
    """Found by the fuzz run: a version or id past 64 bits overflowed SQLite (500)."""
    resp = await gw.client.get(path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert_error(resp, 400, "invalid_request")


# -- absurd counts --------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("field", ["max_tokens", "n", "best_of"])
@pytest.mark.parametrize(
    "value",
    [-1, 0, 1.5, "abc", "1.5", [1], {"a": 1}, 2**31, 2**63, 10**30],
    ids=[
        "negative",
        "zero",
        "fraction",
        "text",
        "text-fraction",
        "list",
        "object",
        "2^31",
        "2^63",
        "1e30",
    ],
)
async def test_absurd_counts_are_400_naming_the_field(
    gw: Gateway, path: str, field: str, value: object
) -> None:
    body: dict[str, Any] = {"messages": MSGS} if path == CHAT else {"prompt": "hi"}
    body[field] = value
    resp = await send(gw, path, json.dumps(body).encode())  # orjson writes no int past 64 bits
    err = assert_error(resp, 400, "invalid_request", param=field)
    assert field in err["message"]
    assert gw.engine.forwarded == []


async def test_max_completion_tokens_past_32_bits_is_400(gw: Gateway) -> None:
    resp = await send(gw, CHAT, dumps({"messages": MSGS, "max_completion_tokens": 2**31}))
    assert_error(resp, 400, "invalid_request", param="max_completion_tokens")


async def test_largest_counts_still_reach_the_engine(gw: Gateway) -> None:
    """The bounds are the 32-bit range and the OpenAI limits, not a cap (tenant caps are
    quotas: server/quotas.py)."""
    body = {"messages": MSGS, "max_tokens": 2**31 - 1, "n": 128, "best_of": 128}
    resp = await send(gw, CHAT, dumps(body))
    assert resp.status_code == 200, resp.text
    forwarded = gw.engine.forwarded[0].body
    assert (forwarded["max_tokens"], forwarded["n"], forwarded["best_of"]) == (2**31 - 1, 128, 128)


# -- deep nesting ----------------------------------------------------------------------------


@pytest.fixture
async def roomy(config: Config, engine: FakeEngine) -> AsyncIterator[Gateway]:
    """A gateway whose body limit lets 100 000 nested arrays (200 kB) through to the parser."""
    async with running_gateway(config.settings(max_body_bytes=1 << 20), engine) as gateway:
        yield gateway


@pytest.mark.parametrize(("path", "key", "body"), ROUTES, ids=ROUTE_IDS)
async def test_100k_nested_arrays_are_400(
    roomy: Gateway, path: str, key: str, body: dict[str, Any]
) -> None:
    del body
    resp = await send(roomy, path, nested(100_000), key)
    err = assert_error(resp, 400, "invalid_json")
    assert "nested" in err["message"]


@pytest.mark.parametrize(("path", "key", "body"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("depth", [100_000, 1024, 300])
async def test_deep_nesting_inside_a_field_is_400(
    roomy: Gateway, path: str, key: str, body: dict[str, Any], depth: int
) -> None:
    """orjson parses up to 1024 levels but writes only 254 (and json / FastAPI's encoder
    recurse in Python): a body the parser accepted could not be forwarded, stored or echoed.
    Any value deeper than the documented limit is refused before it is used."""
    if path == "/admin/v1/adapters":  # metadata is free-form JSON, stored and echoed back
        raw = dumps({**body, "metadata": {}})[:-2] + b'"a": ' + nested(depth) + b"}}"
    else:
        raw = dumps(body)[:-1] + b', "deep": ' + nested(depth) + b"}"
    resp = await send(roomy, path, raw, key)
    err = assert_error(resp, 400, "invalid_json", param=None)
    assert "nested" in err["message"]
    assert roomy.engine.forwarded == []


async def test_nesting_up_to_the_limit_is_forwarded(gw: Gateway) -> None:
    def body(depth: int) -> bytes:  # the body object is level 1
        return dumps({"messages": MSGS})[:-1] + b', "deep": ' + nested(depth - 1) + b"}"

    resp = await send(gw, CHAT, body(MAX_JSON_DEPTH))
    assert resp.status_code == 200, resp.text
    assert "deep" in gw.engine.forwarded[0].body
    resp = await send(gw, CHAT, body(MAX_JSON_DEPTH + 1))
    assert_error(resp, 400, "invalid_json")


# -- huge and lying bodies: 413 before reading them whole -----------------------------------


def _scope(path: str, headers: list[tuple[bytes, bytes]], method: str = "POST") -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }


class EndlessBody:
    """An ASGI `receive` that streams 1 KiB chunks forever and fails the test if the app reads
    more than `allowed` bytes (None: if it reads at all)."""

    CHUNK = 1024

    def __init__(self, allowed: int | None) -> None:
        self.allowed = allowed
        self.delivered = 0
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        if self.allowed is None:
            raise AssertionError("the app read a body it should have refused unread")
        if self.delivered > self.allowed:
            raise AssertionError(f"the app read past the limit ({self.delivered} bytes)")
        self.delivered += self.CHUNK
        return {"type": "http.request", "body": b"[" * self.CHUNK, "more_body": True}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def answer(self) -> tuple[int, dict[str, Any]]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        return start["status"], orjson.loads(body)


LIMIT = 64 * 1024  # the test settings' max_body_bytes
HUGE_ROUTES = [(p, k) for p, k, _ in ROUTES]


@pytest.mark.parametrize(("path", "key"), HUGE_ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    "declared", [str(10 * 1024**3).encode(), b"9" * 5000], ids=["10G", "5000-digits"]
)
async def test_content_length_over_the_limit_is_413_unread(
    gw: Gateway, path: str, key: str, declared: bytes
) -> None:
    body = EndlessBody(allowed=None)
    headers = [
        (b"authorization", f"Bearer {key}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", declared),
    ]
    async with asyncio.timeout(5):
        await gw.app(_scope(path, headers, _method(path)), body.receive, body.send)
    status, payload = body.answer()
    assert status == 413
    assert_error_payload(payload, "request_too_large")
    assert gw.engine.forwarded == []


@pytest.mark.parametrize(("path", "key"), HUGE_ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("declared", [None, b"100"], ids=["chunked", "lying-length"])
async def test_endless_body_is_413_after_at_most_the_limit(
    gw: Gateway, path: str, key: str, declared: bytes | None
) -> None:
    """No Content-Length (chunked), or one that lies low: reading stops one chunk past the
    limit, whatever the client keeps sending."""
    body = EndlessBody(allowed=LIMIT)
    headers = [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")]
    if declared is not None:
        headers.append((b"content-length", declared))
    async with asyncio.timeout(5):
        await gw.app(_scope(path, headers, _method(path)), body.receive, body.send)
    status, payload = body.answer()
    assert status == 413
    assert_error_payload(payload, "request_too_large")
    assert body.delivered <= LIMIT + EndlessBody.CHUNK
    assert gw.engine.forwarded == []


@pytest.mark.parametrize("value", [b"-1", b"+5", b"1_000", b" 5", b"0x10", b"\xd9\xa5"])
async def test_content_length_that_is_not_digits_is_400(gw: Gateway, value: bytes) -> None:
    body = EndlessBody(allowed=None)
    headers = [(b"authorization", f"Bearer {ACME_KEY}".encode()), (b"content-length", value)]
    async with asyncio.timeout(5):
        await gw.app(_scope(CHAT, headers), body.receive, body.send)
    status, payload = body.answer()
    assert status == 400
    err = assert_error_payload(payload, "invalid_request")
    assert "Content-Length" in err["message"]


# -- unknown fields ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
async def test_generation_passes_unknown_fields_through(gw: Gateway, path: str) -> None:
    body: dict[str, Any] = {"messages": MSGS} if path == CHAT else {"prompt": "hi"}
    extra = {
        "repetition_penalty": 1.1,  # a vLLM sampling parameter the gateway does not type
        "guided_json": {"type": "object"},
        "x_vendor": [1, {"a": None}],
    }
    resp = await send(gw, path, dumps({**body, **extra}))
    assert resp.status_code == 200, resp.text
    forwarded = gw.engine.forwarded[0].body
    assert {k: forwarded[k] for k in extra} == extra


@pytest.mark.parametrize(
    ("path", "key", "body", "param"),
    [
        ("/v1/feedback", ACME_KEY, {"request_id": "r", "rating": "up", "note": "x"}, "note"),
        ("/admin/v1/tenants", ADMIN_KEY, {"name": "gamma", "admin": True}, "admin"),
        ("/admin/v1/tenants", ADMIN_KEY, {"name": "g", "quotas": {"rpm": 5}}, "quotas.rpm"),
        ("/admin/v1/adapters/legal/aliases/canary", ADMIN_KEY, {"version": 1, "x": 1}, "x"),
        ("/admin/v1/experiments/ab/weights", ADMIN_KEY, {"weights": {}, "force": 1}, "force"),
        ("/admin/v1/adapters", ADMIN_KEY, {"name": "n", "source": "/x", "pin": True}, "pin"),
    ],
)
async def test_normal_routes_refuse_unknown_fields(
    gw: Gateway, path: str, key: str, body: dict[str, Any], param: str
) -> None:
    resp = await send(gw, path, dumps(body), key)
    err = assert_error(resp, 400, "invalid_request", param=param)
    assert "Extra inputs are not permitted" in err["message"]


async def test_an_unknown_field_name_is_never_echoed_raw(gw: Gateway) -> None:
    resp = await send(gw, "/v1/feedback", dumps({"request_id": "r", "a\r\nb\x1b[2J": 1}))
    err = assert_error(resp, 400, "invalid_request")
    assert err["param"] == "a\\x0d\\x0ab\\x1b[2J"
    assert not CONTROL.search(err["message"])


# -- header injection through adapter and model names ---------------------------------------


async def _raw_chat(gw: Gateway, headers: list[tuple[bytes, bytes]], body: bytes) -> Any:
    sent: list[Message] = []
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send_(message: Message) -> None:
        sent.append(message)

    headers = [(b"authorization", f"Bearer {ACME_KEY}".encode()), *headers]
    async with asyncio.timeout(5):
        await gw.app(_scope(CHAT, headers), receive, send_)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], start["headers"], orjson.loads(payload)


INJECTIONS = [
    b"legal\r\nX-Evil: 1",
    b"legal\nSet-Cookie: a=b",
    b"l\xe9gal\xff",  # non-ASCII (latin-1 bytes on the wire)
    b"legal\x00\x1b[31m",
    b"\r\n\r\nHTTP/1.1 200 OK",
]


def _assert_clean(status: int, headers: list[tuple[bytes, bytes]], payload: Any) -> None:
    assert status == 404, payload
    err = assert_error_payload(payload, "model_not_found", param="model")
    assert not CONTROL.search(err["message"]), err
    assert err["message"].isascii(), err
    for name, value in headers:
        assert not CONTROL.search(value.decode("latin-1")), (name, value)
        assert name not in (b"x-evil", b"set-cookie"), (name, value)
    assert not any(name == b"x-loraplex-adapter" for name, _ in headers)


@pytest.mark.parametrize("name", INJECTIONS)
async def test_adapter_header_injection_is_404_and_never_echoed(gw: Gateway, name: bytes) -> None:
    status, headers, payload = await _raw_chat(
        gw, [(b"x-loraplex-adapter", name)], dumps({"messages": MSGS})
    )
    _assert_clean(status, headers, payload)
    assert gw.engine.forwarded == []


@pytest.mark.parametrize("name", INJECTIONS)
async def test_model_with_control_characters_is_404_and_never_echoed(
    gw: Gateway, name: bytes
) -> None:
    body = dumps({"messages": MSGS, "model": name.decode("latin-1")})
    status, headers, payload = await _raw_chat(gw, [], body)
    _assert_clean(status, headers, payload)
    assert gw.engine.forwarded == []


@pytest.mark.parametrize(
    "path",
    [
        "/admin/v1/adapters/legal%0D%0AX-Evil:%201",
        "/admin/v1/adapters/legal%0D%0AX-Evil:%201/versions/1",
        "/admin/v1/tenants/acme%00%1B%5B2J",
        "/admin/v1/experiments/ab%0A%0A",
    ],
)
async def test_admin_path_names_are_never_echoed_raw(gw: Gateway, path: str) -> None:
    resp = await gw.client.get(path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    err = assert_error(resp, 404, resp.json()["error"]["code"])
    assert not CONTROL.search(err["message"]), err
    assert "x-evil" not in resp.headers


async def test_request_id_with_crlf_is_replaced_not_echoed(gw: Gateway) -> None:
    status, headers, _ = await _raw_chat(
        gw, [(b"x-request-id", b"abc\r\nX-Evil: 1")], dumps({"messages": MSGS})
    )
    assert status == 200
    rid = dict(headers)[b"x-request-id"]
    assert re.fullmatch(rb"[0-9a-f]{32}", rid), rid


# -- the OpenAPI document the fuzz run (tests/fuzz) generates requests from ------------------


def test_openapi_document_declares_errors_in_the_one_shape() -> None:
    from server.app import create_app
    from server.settings import Settings

    document = create_app(Settings()).openapi()
    text = json.dumps(document)
    assert "HTTPValidationError" not in text  # invalid parameters are 400 in the error shape
    assert "#/$defs/" not in text  # request bodies stand alone (nested models inlined)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, where
            if path.startswith("/admin/"):
                assert {"401", "403"} <= set(operation["responses"]), where
            if "requestBody" in operation:
                assert {"400", "413"} <= set(operation["responses"]), where
