"""Admin API surface: admin key only on every route, views of adapters, versions and residency,
body validation, error codes; the lifecycle itself is in test_registry_api.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.conftest import Config
from tests.unit.helpers import (
    ACME_KEY,
    ADMIN_KEY,
    BETA_KEY,
    Gateway,
    assert_error,
    auth,
    served,
)

ADMIN = auth(ADMIN_KEY)

ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/admin/v1/adapters", None),
    ("POST", "/admin/v1/adapters", {"name": "extra", "source": "/nowhere"}),
    ("POST", "/admin/v1/adapters/validate", {"source": "/nowhere"}),
    ("GET", "/admin/v1/adapters/legal", None),
    ("GET", "/admin/v1/adapters/legal/versions/1", None),
    ("POST", "/admin/v1/adapters/broken/versions/1/validate", None),
    ("PUT", "/admin/v1/adapters/legal/aliases/canary", {"version": 1}),
    ("DELETE", "/admin/v1/adapters/legal/aliases/stable", None),
    ("POST", "/admin/v1/adapters/legal/versions/1/pin", None),
    ("DELETE", "/admin/v1/adapters/legal/versions/1/pin", None),
    ("POST", "/admin/v1/adapters/legal/versions/1/retire", None),
    ("DELETE", "/admin/v1/adapters/legal/versions/1", None),
    ("GET", "/admin/v1/residency", None),
    ("GET", "/admin/v1/engine", None),
    ("GET", "/admin/v1/tenants", None),
    ("POST", "/admin/v1/tenants", {"name": "new", "adapters": []}),
    ("GET", "/admin/v1/tenants/acme", None),
    ("PATCH", "/admin/v1/tenants/acme", {"adapters": []}),
    ("POST", "/admin/v1/tenants/acme/rotate-key", {}),
    ("DELETE", "/admin/v1/tenants/acme", None),
    ("GET", "/admin/v1/audit", None),
    ("GET", "/admin/v1/drift", None),
    ("POST", "/admin/v1/drift/acme/reference", {"reset": True}),
]


async def _unchanged(gw: Gateway, generation: int) -> None:
    """A refused admin call changed nothing: same registry, no engine call, still serving."""
    assert await gw.state.registry.generation() == generation
    assert gw.engine.load_calls == []
    assert gw.engine.unload_calls == []
    assert (await gw.chat(model="legal")).status_code == 200


def test_every_admin_route_is_covered(gw: Gateway) -> None:
    routes = {
        (method, route.path)  # type: ignore[attr-defined]
        for route in gw.app.routes
        if getattr(route, "path", "").startswith("/admin/")
        for method in getattr(route, "methods", ())
    }
    listed = set()
    for method, path, _ in ROUTES:
        for route in gw.app.routes:
            matches = getattr(route, "path_regex", None)
            if matches is not None and matches.match(path) and method in route.methods:  # type: ignore[attr-defined]
                listed.add((method, route.path))  # type: ignore[attr-defined]
    assert routes == listed


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_tenant_key_is_403(
    gw: Gateway, method: str, path: str, body: dict[str, Any] | None
) -> None:
    generation = await gw.state.registry.generation()
    resp = await gw.client.request(method, path, json=body, headers=auth(ACME_KEY))
    assert_error(resp, 403, "permission_denied", type_="permission_error")
    await _unchanged(gw, generation)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_missing_or_wrong_key_is_401(
    gw: Gateway, method: str, path: str, body: dict[str, Any] | None
) -> None:
    generation = await gw.state.registry.generation()
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": ADMIN_KEY}):
        resp = await gw.client.request(method, path, json=body, headers=headers)
        assert_error(resp, 401, "invalid_api_key")
    await _unchanged(gw, generation)


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


async def test_list_adapters(gw: Gateway) -> None:
    resp = await gw.client.get("/admin/v1/adapters", headers=ADMIN)
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    by_name = {a["name"]: a for a in body["data"]}
    assert list(by_name) == ["broken", "finance", "legal", "medical"]
    legal = by_name["legal"]
    assert legal["aliases"] == {"stable": 1}
    [v] = legal["versions"]
    assert v["label"] == "legal@1"
    assert v["served_name"] == served(gw, "legal")
    assert v["state"] == "ready"
    assert v["state_reason"] is None
    assert v["digest"].startswith("sha256:")
    assert v["digest"][7:17] in v["served_name"]
    assert v["base_digest"].startswith("sha256:")
    assert (v["rank"], v["alpha"], v["target_modules"]) == (4, 8.0, ["q_proj", "v_proj"])
    assert v["size_bytes"] > 0
    assert v["source"].endswith("/adapters/legal")  # registered from the adapters file
    assert v["aliases"] == ["stable"]
    assert v["registered_on_engine"] is True
    assert v["in_flight"] == 0
    assert v["pinned"] is False
    assert isinstance(v["created_at"], float)
    broken = by_name["broken"]
    assert broken["aliases"] == {}
    [b] = broken["versions"]
    assert b["state"] == "rejected"
    assert "bad rank" in b["state_reason"]
    assert b["registered_on_engine"] is False


async def test_get_adapter_and_version(gw: Gateway) -> None:
    resp = await gw.client.get("/admin/v1/adapters/medical", headers=ADMIN)
    assert resp.status_code == 200
    assert resp.json()["name"] == "medical"
    assert [v["version"] for v in resp.json()["versions"]] == [1]
    resp = await gw.client.get("/admin/v1/adapters/medical/versions/1", headers=ADMIN)
    assert resp.status_code == 200
    assert resp.json()["label"] == "medical@1"
    for path in (
        "/admin/v1/adapters/nope",
        "/admin/v1/adapters/medical/versions/2",
        "/admin/v1/adapters/nope/versions/1",
    ):
        assert_error(await gw.client.get(path, headers=ADMIN), 404, "adapter_not_found")
    resp = await gw.client.get("/admin/v1/adapters/medical/versions/x", headers=ADMIN)
    assert_error(resp, 400, "invalid_request", param="path.version")


async def test_residency_view(gw: Gateway) -> None:
    assert (await gw.chat(model="medical")).status_code == 200  # now the most recently used
    resp = await gw.client.get("/admin/v1/residency", headers=ADMIN)
    assert resp.status_code == 200
    body = resp.json()
    assert body["budget"] == 8
    assert body["registered"] == 3
    slots = body["slots"]
    assert sorted(s["adapter"] for s in slots) == ["finance@1", "legal@1", "medical@1"]
    assert slots[-1] == {
        "engine": "http://127.0.0.1:8100",
        "adapter": "medical@1",
        "served_name": served(gw, "medical"),
        "registered": True,
        "in_flight": 0,
        "pinned": False,
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "bad name", "source": "/x"}, "name"),
        ({"name": "", "source": "/x"}, "name"),
        ({"name": "n" * 65, "source": "/x"}, "name"),
        ({"name": "ok@1", "source": "/x"}, "name"),
        ({"name": "ok"}, "source"),
        ({"name": "ok", "source": ""}, "source"),
        ({"source": "/x"}, "name"),
        ({"name": "ok", "source": "/x", "alias": "1bad"}, "alias"),
        ({"name": "ok", "source": "/x", "metadata": []}, "metadata"),
        ({"name": "ok", "source": "/x", "pin": True}, "pin"),
        ({"name": "ok", "path": "/x"}, "source"),  # the old body: told what is missing
    ],
)
async def test_register_body_validation(gw: Gateway, body: dict[str, Any], param: str) -> None:
    resp = await gw.client.post("/admin/v1/adapters", json=body, headers=ADMIN)
    assert_error(resp, 400, "invalid_request", param=param)
    assert gw.state.registry.snapshot.versions_of("ok") == []


@pytest.mark.parametrize("raw", [b"{broken", b"[]", b"\xff"])
async def test_register_malformed_body(gw: Gateway, raw: bytes) -> None:
    resp = await gw.client.post(
        "/admin/v1/adapters", content=raw, headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert_error(resp, 400, "invalid_json", param=None)


@pytest.mark.parametrize(
    ("source", "status", "code"),
    [
        ("adapters/extra", 400, "source_invalid"),
        ("ftp://host/adapter.tar", 400, "source_invalid"),
        ("/does/not/exist", 422, "source_not_found"),
    ],
)
async def test_register_bad_source(gw: Gateway, source: str, status: int, code: str) -> None:
    resp = await gw.client.post(
        "/admin/v1/adapters", json={"name": "extra", "source": source}, headers=ADMIN
    )
    assert_error(resp, status, code)
    assert gw.state.registry.snapshot.versions_of("extra") == []
    assert gw.engine.load_calls == []


@pytest.mark.parametrize(("key", "code"), [("bin-only", "adapter_pickle_refused")])
async def test_register_refused_files(gw: Gateway, config: Config, key: str, code: str) -> None:
    source = str(config.adapter_dirs[key])
    resp = await gw.client.post(
        "/admin/v1/adapters", json={"name": "extra", "source": source}, headers=ADMIN
    )
    assert_error(resp, 422, code)
    resp = await gw.client.post(
        "/admin/v1/adapters/validate", json={"source": source}, headers=ADMIN
    )
    assert_error(resp, 422, code)
    assert gw.state.registry.snapshot.versions_of("extra") == []


async def test_validate_reports_facts_and_stores_nothing(gw: Gateway, config: Config) -> None:
    generation = await gw.state.registry.generation()
    source = str(config.adapter_dirs["extra"])
    resp = await gw.client.post(
        "/admin/v1/adapters/validate", json={"source": source}, headers=ADMIN
    )
    assert resp.status_code == 200
    body = resp.json()
    assert body["valid"] is True
    assert body["digest"].startswith("sha256:")
    assert (body["rank"], body["alpha"], body["target_modules"]) == (4, 8.0, ["q_proj", "v_proj"])
    assert body["tensor_count"] == 8
    assert body["declared_base_digest"].startswith("sha256:")
    assert await gw.state.registry.generation() == generation
    assert gw.engine.load_calls == []
    assert gw.engine.forwarded == []


async def test_alias_errors(gw: Gateway) -> None:
    url = "/admin/v1/adapters/medical/aliases"
    resp = await gw.client.put(f"{url}/canary", json={"version": 9}, headers=ADMIN)
    assert_error(resp, 404, "adapter_not_found")
    resp = await gw.client.put(
        "/admin/v1/adapters/broken/aliases/stable", json={"version": 1}, headers=ADMIN
    )
    assert_error(resp, 409, "invalid_state_transition")
    resp = await gw.client.put(f"{url}/canary", json={"version": 0}, headers=ADMIN)
    assert_error(resp, 400, "invalid_request", param="version")
    resp = await gw.client.delete(f"{url}/canary", headers=ADMIN)
    assert_error(resp, 404, "adapter_not_found")
    assert gw.state.registry.snapshot.aliases_of("medical") == {"stable": 1}


async def test_unknown_version_actions_are_404(gw: Gateway) -> None:
    base = "/admin/v1/adapters/medical/versions/7"
    for method, path in (
        ("POST", f"{base}/pin"),
        ("DELETE", f"{base}/pin"),
        ("POST", f"{base}/retire"),
        ("DELETE", base),
        ("POST", f"{base}/validate"),
    ):
        resp = await gw.client.request(method, path, headers=ADMIN)
        assert_error(resp, 404, "adapter_not_found")
    assert gw.engine.unload_calls == []


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
        "engines": [
            {
                "url": "http://127.0.0.1:8100",
                "up": True,
                "ready": True,
                "suspect": False,
                "in_flight": 0,
                "queue_waiting": 0.0,
                "queue_running": 0.0,
                "registered": resp.json()["engines"][0]["registered"],
                "restarts_seen": 0,
                "picks": {},
            }
        ],
    }
    gw.engine.healthy = False
    await gw.wait_ready(503)
    await gw.wait_gauge("loraplex_engine_up", 0)
    resp = await gw.client.get("/admin/v1/engine", headers=ADMIN)
    assert resp.json()["up"] is False
    assert resp.json()["ready"] is False


async def test_admin_key_by_digest(config: Config) -> None:
    from server.auth import hash_key
    from tests.unit.fakes import FakeEngine
    from tests.unit.helpers import running_gateway

    settings = config.settings(
        admin_key=None, admin_key_sha256=hash_key("sk-ops").upper(), adapters_file=None
    )
    async with running_gateway(settings, FakeEngine()) as gw:
        ok = await gw.client.get("/admin/v1/adapters", headers=auth("sk-ops"))
        assert ok.status_code == 200
        assert_error(
            await gw.client.get("/admin/v1/adapters", headers=ADMIN), 401, "invalid_api_key"
        )
