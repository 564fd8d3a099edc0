"""Authentication over HTTP: 401 for every missing/wrong/malformed key, before anything else."""

from __future__ import annotations

import pytest

from tests.unit.helpers import (
    ACME_KEY,
    ACME_OLD_KEY,
    ADMIN_KEY,
    Gateway,
    assert_error,
    dumps,
    metric,
)

BAD_AUTH: list[dict[str, str]] = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer sk-wrong"},
    {"Authorization": f"Basic {ACME_KEY}"},
    {"Authorization": ACME_KEY},
    {"Authorization": f"Token {ACME_KEY}"},
    {"Authorization": f"Bearer {ACME_KEY}x"},
    {"Authorization": f"Bearer {ADMIN_KEY}"},  # the admin key is not a tenant key
]
CHAT = dumps({"messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize("headers", BAD_AUTH)
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models")],
)
async def test_401(gw: Gateway, headers: dict[str, str], method: str, path: str) -> None:
    content = CHAT if method == "POST" else None
    resp = await gw.client.request(method, path, headers=headers, content=content)
    assert_error(resp, 401, "invalid_api_key", type_="authentication_error")
    assert gw.engine.forwarded == []


async def test_auth_checked_before_body(gw: Gateway) -> None:
    resp = await gw.client.post("/v1/chat/completions", content=b"{not json")
    assert_error(resp, 401, "invalid_api_key")


async def test_scheme_is_case_insensitive_and_token_trimmed(gw: Gateway) -> None:
    for value in (f"bearer {ACME_KEY}", f"BEARER {ACME_KEY}", f"Bearer   {ACME_KEY}  "):
        resp = await gw.client.post(
            "/v1/chat/completions", content=CHAT, headers={"Authorization": value}
        )
        assert resp.status_code == 200, value


async def test_rotated_keys_both_work(gw: Gateway) -> None:
    for key in (ACME_KEY, ACME_OLD_KEY):
        resp = await gw.chat(key)
        assert resp.status_code == 200
        assert resp.headers["x-loraplex-adapter"] == "legal@1"


async def test_401_counted_as_anonymous(gw: Gateway) -> None:
    before = await gw.metrics()
    await gw.client.post("/v1/chat/completions", content=CHAT)
    after = await gw.metrics()
    labels = {"tenant": "anonymous", "code": "invalid_api_key"}
    name = "loraplex_errors_total"
    assert metric(after, name, **labels) - metric(before, name, **labels) == 1
    req = {"tenant": "anonymous", "status": "401", "adapter": "none"}
    name = "loraplex_requests_total"
    assert metric(after, name, **req) - metric(before, name, **req) == 1
    # The in-flight gauge was never touched for an unauthenticated request.
    assert metric(after, "loraplex_in_flight_requests", tenant="anonymous") == 0
