"""Adapter selection order and entitlement: header > model > default; unknown == forbidden."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.fakes import SECRET_SERVED_NAME
from tests.unit.helpers import (
    ACME_KEY,
    BETA_KEY,
    NODEFAULT_KEY,
    Gateway,
    assert_error,
    auth,
    served,
)

OTHER_TENANTS_NAMES = ("finance", "beta", "nodefault", SECRET_SERVED_NAME)


async def _chosen(gw: Gateway) -> str:
    model = gw.engine.forwarded[-1].body["model"]
    assert isinstance(model, str)
    return model


async def test_header_beats_model_field(gw: Gateway) -> None:
    resp = await gw.chat(model="legal", headers={"X-Loraplex-Adapter": "medical"})
    assert resp.status_code == 200
    assert resp.headers["x-loraplex-adapter"] == "medical@1"
    assert await _chosen(gw) == served(gw, "medical")


async def test_header_is_trimmed_and_blank_header_is_ignored(gw: Gateway) -> None:
    resp = await gw.chat(model="legal", headers={"X-Loraplex-Adapter": "  medical "})
    assert resp.headers["x-loraplex-adapter"] == "medical@1"
    resp = await gw.chat(model="medical", headers={"X-Loraplex-Adapter": "   "})
    assert resp.headers["x-loraplex-adapter"] == "medical@1"


async def test_model_field_selects(gw: Gateway) -> None:
    resp = await gw.chat(model="medical")
    assert resp.status_code == 200
    assert resp.headers["x-loraplex-adapter"] == "medical@1"
    assert await _chosen(gw) == served(gw, "medical")


@pytest.mark.parametrize("model", ["medical@1", "medical@stable"])
async def test_version_and_alias_select_in_model_and_header(gw: Gateway, model: str) -> None:
    resp = await gw.chat(model=model)
    assert resp.status_code == 200
    assert resp.headers["x-loraplex-adapter"] == "medical@1"
    assert await _chosen(gw) == served(gw, "medical")
    resp = await gw.chat(model="legal", headers={"X-Loraplex-Adapter": model})
    assert resp.headers["x-loraplex-adapter"] == "medical@1"


@pytest.mark.parametrize(
    "model", ["medical@2", "medical@canary", "medical@", "medical@0x1", "medical@1@1", "@1"]
)
async def test_unknown_version_or_alias_is_404(gw: Gateway, model: str) -> None:
    assert_error(await gw.chat(model=model), 404, "model_not_found", param="model")
    assert_error(
        await gw.chat(headers={"X-Loraplex-Adapter": model}), 404, "model_not_found", param="model"
    )
    assert gw.engine.forwarded == []


async def test_versions_of_other_tenants_adapters_are_404(gw: Gateway) -> None:
    for model in ("finance@1", "finance@stable"):
        assert_error(await gw.chat(model=model), 404, "model_not_found")
    assert gw.engine.forwarded == []


async def test_served_name_is_not_a_model_name(gw: Gateway) -> None:
    """The engine-side name (`medical@1-<digest>`) is not something clients may ask for."""
    assert_error(await gw.chat(model=served(gw, "medical")), 404, "model_not_found")
    assert gw.engine.forwarded == []


async def test_base_model_by_name(gw: Gateway) -> None:
    resp = await gw.chat(model="base")
    assert resp.status_code == 200
    assert resp.headers["x-loraplex-adapter"] == "base"
    assert await _chosen(gw) == "base"


@pytest.mark.parametrize("model", [None, "", "default"])
async def test_missing_or_default_model_uses_tenant_default(gw: Gateway, model: str | None) -> None:
    body: dict[str, Any] = {} if model is None else {"model": model}
    resp = await gw.chat(**body)
    assert resp.status_code == 200
    assert resp.headers["x-loraplex-adapter"] == "legal@1"
    assert await _chosen(gw) == served(gw, "legal")
    resp = await gw.chat(BETA_KEY, **body)
    assert resp.headers["x-loraplex-adapter"] == "finance@1"


async def test_default_header_uses_tenant_default(gw: Gateway) -> None:
    resp = await gw.chat(model="medical", headers={"X-Loraplex-Adapter": "default"})
    assert resp.headers["x-loraplex-adapter"] == "legal@1"


@pytest.mark.parametrize("model", [None, "default"])
async def test_no_default_is_404(gw: Gateway, model: str | None) -> None:
    body: dict[str, Any] = {} if model is None else {"model": model}
    resp = await gw.chat(NODEFAULT_KEY, **body)
    err = assert_error(resp, 404, "model_not_found")
    assert "default" in err["message"]
    assert gw.engine.forwarded == []
    # Naming a model still works for this tenant.
    assert (await gw.chat(NODEFAULT_KEY, model="medical")).status_code == 200


async def test_unknown_and_not_entitled_look_the_same(gw: Gateway) -> None:
    # `finance` exists and is loaded, but belongs to beta only.
    forbidden = await gw.chat(model="finance")
    unknown = await gw.chat(model="finanse")
    a = assert_error(forbidden, 404, "model_not_found", param="model")
    b = assert_error(unknown, 404, "model_not_found", param="model")
    assert a["type"] == b["type"]
    assert a["message"].replace("finance", "X") == b["message"].replace("finanse", "X")
    for resp in (forbidden, unknown):
        assert forbidden.headers.keys() - {"x-request-id", "content-length"} == (
            unknown.headers.keys() - {"x-request-id", "content-length"}
        )
        assert "x-loraplex-adapter" not in resp.headers
    assert "beta" not in forbidden.text
    assert SECRET_SERVED_NAME not in unknown.text
    assert gw.engine.forwarded == []


async def test_not_entitled_via_header_is_404(gw: Gateway) -> None:
    resp = await gw.chat(model="legal", headers={"X-Loraplex-Adapter": "finance"})
    assert_error(resp, 404, "model_not_found")
    assert gw.engine.forwarded == []


async def test_engine_only_name_is_not_reachable(gw: Gateway) -> None:
    """A name the engine serves but the gateway never registered is not routable."""
    resp = await gw.chat(model=SECRET_SERVED_NAME)
    assert_error(resp, 404, "model_not_found")
    assert gw.engine.forwarded == []


@pytest.mark.parametrize("name", ["ghost", "broken"])
async def test_entitled_but_not_loaded_is_404(gw: Gateway, name: str) -> None:
    """`ghost`: entitled, never registered; `broken`: registered, the engine refused it
    (its version is stored as rejected: not routable by name, number or alias)."""
    resp = await gw.chat(model=name)
    err = assert_error(resp, 404, "model_not_found")
    assert name in err["message"]
    for ref in (f"{name}@1", f"{name}@stable"):
        assert_error(await gw.chat(model=ref), 404, "model_not_found")
    assert gw.engine.forwarded == []


async def test_requested_name_is_sanitised_in_message(gw: Gateway) -> None:
    resp = await gw.chat(model="é" * 200)
    err = assert_error(resp, 404, "model_not_found")
    assert err["message"].isascii()
    assert len(err["message"]) < 200


async def test_models_lists_only_tenants_routable_models(gw: Gateway) -> None:
    resp = await gw.client.get("/v1/models", headers=auth(ACME_KEY))
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    # acme: legal, medical, base, extra (not registered), broken (refused), ghost (unknown).
    assert ids == ["base", "legal", "medical"]
    for card in body["data"]:
        assert card["object"] == "model"
        assert card["owned_by"] == "loraplex"
        assert isinstance(card["created"], int)
    beta = await gw.client.get("/v1/models", headers=auth(BETA_KEY))
    assert [m["id"] for m in beta.json()["data"]] == ["finance"]
    nodefault = await gw.client.get("/v1/models", headers=auth(NODEFAULT_KEY))
    assert [m["id"] for m in nodefault.json()["data"]] == ["base", "medical"]
