"""Admin API: admin key only, adapter list/load/unload, engine status, audit trail."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from server.errors import EngineUnavailable, UpstreamError
from tests.unit.conftest import Config
from tests.unit.helpers import (
    ACME_KEY,
    ADMIN_KEY,
    BETA_KEY,
    Gateway,
    assert_error,
    auth,
    metric,
)

ADMIN = auth(ADMIN_KEY)

ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/admin/v1/adapters", None),
    ("POST", "/admin/v1/adapters", {"name": "extra", "path": "/nowhere"}),
    ("DELETE", "/admin/v1/adapters/legal", None),
    ("GET", "/admin/v1/engine", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_tenant_key_is_403(
    gw: Gateway, method: str, path: str, body: dict[str, Any] | None
) -> None:
    resp = await gw.client.request(method, path, json=body, headers=auth(ACME_KEY))
    assert_error(resp, 403, "permission_denied", type_="permission_error")
    assert gw.state.catalog.is_routable("legal")


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": ADMIN_KEY}]
)
async def test_missing_or_wrong_key_is_401(
    gw: Gateway, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]
) -> None:
    resp = await gw.client.request(method, path, json=body, headers=headers)
    assert_error(resp, 401, "invalid_api_key")
    assert gw.state.catalog.is_routable("legal")


@pytest.mark.parametrize("raw", [b"{broken", b'{"name": 1}', b"[]"])
async def test_auth_is_checked_before_the_body(gw: Gateway, raw: bytes) -> None:
    resp = await gw.client.post(
        "/admin/v1/adapters", content=raw, headers={"Content-Type": "application/json"}
    )
    assert_error(resp, 401, "invalid_api_key")
    resp = await gw.client.post(
        "/admin/v1/adapters",
        content=raw,
        headers={**auth(BETA_KEY), "Content-Type": "application/json"},
    )
    assert_error(resp, 403, "permission_denied")


async def test_list_adapters(gw: Gateway, config: Config) -> None:
    resp = await gw.client.get("/admin/v1/adapters", headers=ADMIN)
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    by_name = {a["name"]: a for a in body["data"]}
    assert list(by_name) == ["broken", "finance", "legal", "medical"]
    assert by_name["legal"]["state"] == "loaded"
    assert by_name["legal"]["loaded"] is True
    assert by_name["legal"]["path"] == str(config.adapter_dirs["legal"])
    assert isinstance(by_name["legal"]["loaded_at"], float)
    assert by_name["legal"]["last_error"] is None
    assert by_name["broken"]["state"] == "failed"
    assert by_name["broken"]["loaded"] is False
    assert "bad rank" in by_name["broken"]["last_error"]


async def test_load_then_route_then_unload(
    gw: Gateway, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(config.adapter_dirs["extra"])
    # Entitled (acme lists `extra`) but not registered yet.
    assert_error(await gw.chat(model="extra"), 404, "model_not_found")
    with caplog.at_level(logging.INFO, logger="loraplex.audit"):
        resp = await gw.client.post(
            "/admin/v1/adapters", json={"name": "extra", "path": path}, headers=ADMIN
        )
    assert resp.status_code == 201
    view = resp.json()
    assert view["name"] == "extra"
    assert view["path"] == path
    assert view["state"] == "loaded"
    assert view["loaded"] is True
    assert ("extra", path) in gw.engine.load_calls
    audit = [r for r in caplog.records if r.name == "loraplex.audit"]
    assert [(r.getMessage(), r.__dict__["result"]) for r in audit] == [("adapter.load", "ok")]
    assert ADMIN_KEY not in caplog.text

    resp = await gw.chat(model="extra")
    assert resp.status_code == 200
    assert resp.headers["x-loraplex-adapter"] == "extra"
    models = await gw.client.get("/v1/models", headers=auth(ACME_KEY))
    assert "extra" in [m["id"] for m in models.json()["data"]]

    # Loading it again is idempotent: no second engine call.
    calls = len(gw.engine.load_calls)
    again = await gw.client.post(
        "/admin/v1/adapters", json={"name": "extra", "path": path}, headers=ADMIN
    )
    assert again.status_code == 201
    assert len(gw.engine.load_calls) == calls

    resp = await gw.client.delete("/admin/v1/adapters/extra", headers=ADMIN)
    assert resp.status_code == 200
    assert resp.json()["state"] == "unloaded"
    assert resp.json()["loaded"] is False
    assert gw.engine.unload_calls == ["extra"]
    assert_error(await gw.chat(model="extra"), 404, "model_not_found")
    assert_error(
        await gw.chat(model="legal", headers={"X-Loraplex-Adapter": "extra"}),
        404,
        "model_not_found",
    )
    models = await gw.client.get("/v1/models", headers=auth(ACME_KEY))
    assert "extra" not in [m["id"] for m in models.json()["data"]]
    metrics = await gw.metrics()
    assert metric(metrics, "loraplex_adapter_operations_total", adapter="extra") == 2
    assert (
        metric(metrics, "loraplex_adapter_operations_total", adapter="extra", result="unloaded")
        == 1
    )


async def test_reload_after_unload(gw: Gateway, config: Config) -> None:
    assert (await gw.client.delete("/admin/v1/adapters/legal", headers=ADMIN)).status_code == 200
    assert_error(await gw.chat(model="legal"), 404, "model_not_found")
    resp = await gw.client.post(
        "/admin/v1/adapters",
        json={"name": "legal", "path": str(config.adapter_dirs["legal"])},
        headers=ADMIN,
    )
    assert resp.status_code == 201
    assert (await gw.chat(model="legal")).status_code == 200


@pytest.mark.parametrize(
    ("path_key", "fragment"),
    [
        ("empty", "lacks"),
        ("bin-only", ".bin"),
        ("missing", "not a directory"),
        ("relative", "absolute"),
        ("file", "not a directory"),
    ],
)
async def test_load_bad_path_is_400_invalid_adapter(
    gw: Gateway, config: Config, path_key: str, fragment: str
) -> None:
    paths = {
        "empty": str(config.adapter_dirs["empty"]),
        "bin-only": str(config.adapter_dirs["bin-only"]),
        "missing": str(config.root / "does-not-exist"),
        "relative": "adapters/extra",
        "file": str(config.adapter_dirs["extra"] / "adapter_config.json"),
    }
    resp = await gw.client.post(
        "/admin/v1/adapters", json={"name": "extra", "path": paths[path_key]}, headers=ADMIN
    )
    err = assert_error(resp, 400, "invalid_adapter")
    assert fragment in err["message"]
    assert gw.engine.load_calls[-1][0] != "extra"
    assert gw.state.catalog.get("extra") is None


async def test_engine_refusal_is_422_and_forgotten(gw: Gateway, config: Config) -> None:
    gw.engine.refuse("extra", "engine refused the adapter: target modules mismatch")
    resp = await gw.client.post(
        "/admin/v1/adapters",
        json={"name": "extra", "path": str(config.adapter_dirs["extra"])},
        headers=ADMIN,
    )
    err = assert_error(resp, 422, "adapter_load_failed")
    assert "target modules" in err["message"]
    listed = await gw.client.get("/admin/v1/adapters", headers=ADMIN)
    assert "extra" not in [a["name"] for a in listed.json()["data"]]
    assert_error(await gw.chat(model="extra"), 404, "model_not_found")


async def test_engine_down_during_load_is_503(gw: Gateway, config: Config) -> None:
    gw.engine.load_failures["extra"] = EngineUnavailable("down", retry_after_s=3)
    resp = await gw.client.post(
        "/admin/v1/adapters",
        json={"name": "extra", "path": str(config.adapter_dirs["extra"])},
        headers=ADMIN,
    )
    assert_error(resp, 503, "engine_unavailable")
    assert resp.headers["retry-after"] == "3"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "bad name", "path": "/x"}, "name"),
        ({"name": "", "path": "/x"}, "name"),
        ({"name": "n" * 65, "path": "/x"}, "name"),
        ({"name": "ok"}, "path"),
        ({"path": "/x"}, "name"),
        ({"name": "ok", "path": "/x", "pin": True}, "pin"),
    ],
)
async def test_load_body_validation(gw: Gateway, body: dict[str, Any], param: str) -> None:
    resp = await gw.client.post("/admin/v1/adapters", json=body, headers=ADMIN)
    assert_error(resp, 400, "invalid_request", param=param)


@pytest.mark.parametrize("raw", [b"{broken", b"[]", b"\xff"])
async def test_load_malformed_body(gw: Gateway, raw: bytes) -> None:
    resp = await gw.client.post(
        "/admin/v1/adapters", content=raw, headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert_error(resp, 400, "invalid_json", param=None)


async def test_load_base_model_name_is_409(gw: Gateway, config: Config) -> None:
    resp = await gw.client.post(
        "/admin/v1/adapters",
        json={"name": "base", "path": str(config.adapter_dirs["extra"])},
        headers=ADMIN,
    )
    assert_error(resp, 409, "adapter_conflict")


async def test_load_existing_name_with_other_path_is_409(gw: Gateway, config: Config) -> None:
    resp = await gw.client.post(
        "/admin/v1/adapters",
        json={"name": "legal", "path": str(config.adapter_dirs["extra"])},
        headers=ADMIN,
    )
    assert_error(resp, 409, "adapter_conflict")
    assert gw.state.catalog.is_routable("legal")


async def test_unload_unknown_is_404(gw: Gateway) -> None:
    resp = await gw.client.delete("/admin/v1/adapters/nope", headers=ADMIN)
    err = assert_error(resp, 404, "adapter_not_found")
    assert "nope" in err["message"]
    assert gw.engine.unload_calls == []


async def test_unload_engine_failure_keeps_adapter_routable(gw: Gateway) -> None:
    gw.engine.unload_failure = UpstreamError("engine failed to unload the adapter (500)")
    resp = await gw.client.delete("/admin/v1/adapters/legal", headers=ADMIN)
    assert_error(resp, 502, "upstream_error")
    assert gw.state.catalog.is_routable("legal")
    assert (await gw.chat(model="legal")).status_code == 200


async def test_engine_status(gw: Gateway) -> None:
    resp = await gw.client.get("/admin/v1/engine", headers=ADMIN)
    assert resp.status_code == 200
    assert resp.json() == {
        "url": "http://127.0.0.1:8100",
        "mode": "remote",
        "up": True,
        "ready": True,
        "pid": None,
        "starts": None,
    }
    gw.engine.healthy = False
    await gw.wait_ready(503)
    resp = await gw.client.get("/admin/v1/engine", headers=ADMIN)
    assert resp.json()["up"] is False
    assert resp.json()["ready"] is False


async def test_admin_key_by_digest(config: Config) -> None:
    from server.auth import hash_key
    from tests.unit.fakes import FakeEngine
    from tests.unit.helpers import running_gateway

    settings = config.settings(admin_key=None, admin_key_sha256=hash_key("sk-ops").upper())
    async with running_gateway(settings, FakeEngine()) as gw:
        ok = await gw.client.get("/admin/v1/adapters", headers=auth("sk-ops"))
        assert ok.status_code == 200
        assert_error(
            await gw.client.get("/admin/v1/adapters", headers=ADMIN), 401, "invalid_api_key"
        )
