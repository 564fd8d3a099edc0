"""The ASGI fast path serves POSTs to the generation endpoints; everything else (other methods,
other paths, the OpenAPI schema) is still FastAPI's, and errors keep their shape and ids."""

from __future__ import annotations

import pytest

from server.fastpath import GENERATION_PATHS, GenerationFastPath
from tests.unit.helpers import ACME_KEY, Gateway, assert_error, auth


def test_fast_path_sits_inside_the_request_id_middleware(gw: Gateway) -> None:
    names = [getattr(m.cls, "__name__", "") for m in gw.app.user_middleware]
    assert names.index("RequestIdMiddleware") < names.index(GenerationFastPath.__name__)


async def test_generation_posts_are_answered_with_ids_and_headers(gw: Gateway) -> None:
    for path in GENERATION_PATHS:
        body = (
            {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "x"}
        )
        resp = await gw.client.post(
            path, json=body, headers={**auth(ACME_KEY), "X-Request-Id": "r-1"}
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-request-id"] == "r-1"
        assert resp.headers["x-loraplex-adapter"]


async def test_errors_keep_the_openai_shape(gw: Gateway) -> None:
    resp = await gw.client.post("/v1/chat/completions", content=b"{", headers=auth(ACME_KEY))
    assert_error(resp, 400, "invalid_json")
    assert resp.headers["x-request-id"]
    resp = await gw.client.post("/v1/chat/completions", json={"messages": []})
    assert_error(resp, 401, "invalid_api_key", type_="authentication_error")


@pytest.mark.parametrize("method", ["GET", "PUT"])
async def test_other_methods_fall_through_to_fastapi(gw: Gateway, method: str) -> None:
    resp = await gw.client.request(method, "/v1/chat/completions", headers=auth(ACME_KEY))
    assert resp.status_code == 405


async def test_openapi_still_documents_the_generation_routes(gw: Gateway) -> None:
    paths = (await gw.client.get("/openapi.json")).json()["paths"]
    assert set(GENERATION_PATHS) <= set(paths)
