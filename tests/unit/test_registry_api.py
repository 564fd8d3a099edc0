"""Adapter lifecycle, tenants, quotas and audit through the admin API of a running gateway:
register → smoke → ready, aliases moving under traffic, pins, retire/delete, refusals."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from adapters.registry import Actor, Registry
from adapters.types import VersionState
from adapters.validate import BaseModelInfo
from server.engine_watch import follow_registry
from tests.adapter_factory import BAD_ADAPTERS, Caps
from tests.synthetic import make_adapter
from tests.unit.conftest import Bootstrapped, Config
from tests.unit.fakes import Answer, FakeEngine, completion_body
from tests.unit.helpers import (
    ACME_KEY,
    ADMIN_KEY,
    Gateway,
    assert_error,
    auth,
    metric,
    running_gateway,
    served,
    wait_until,
)

ADMIN = auth(ADMIN_KEY)


def new_adapter(config: Config, name: str, fill: int) -> str:
    """A valid adapter for the test base with its own content (`fill` changes the digest)."""
    base = BaseModelInfo.from_dir(config.base_dir).digest
    return str(make_adapter(config.root / f"new-{fill}", name, base, fill=fill))


async def register(gw: Gateway, name: str, source: str, **extra: Any) -> httpx.Response:
    return await gw.client.post(
        "/admin/v1/adapters", json={"name": name, "source": source, **extra}, headers=ADMIN
    )


async def test_register_new_version_smoke_tests_then_ready(gw: Gateway, config: Config) -> None:
    resp = await register(gw, "medical", new_adapter(config, "medical", 99), metadata={"t": "x"})
    assert resp.status_code == 201, resp.text
    v2 = resp.json()
    assert (v2["label"], v2["state"], v2["metadata"]) == ("medical@2", "ready", {"t": "x"})
    assert v2["aliases"] == []  # stable stays on the version it pointed at
    assert v2["registered_on_engine"] is True
    # One smoke generation through the engine under the new served name, before it was ready.
    [smoke] = gw.engine.forwarded
    assert smoke.path == "/v1/completions"
    assert smoke.body["model"] == v2["served_name"] == served(gw, "medical@2")
    assert gw.engine.load_calls[-1][0] == v2["served_name"]
    assert v2["served_name"] != served(gw, "medical@1")
    assert (await gw.chat(model="medical")).headers["x-loraplex-adapter"] == "medical@1"
    assert (await gw.chat(model="medical@2")).headers["x-loraplex-adapter"] == "medical@2"
    # The same content again: the ready version is returned, nothing is stored or loaded.
    loads = len(gw.engine.load_calls)
    generation = await gw.state.registry.generation()
    again = await register(gw, "medical", new_adapter(config, "medical", 99))
    assert again.status_code == 200
    assert again.json()["version"] == 2
    assert len(gw.engine.load_calls) == loads
    assert await gw.state.registry.generation() == generation


async def test_first_ready_version_of_a_new_name_gets_stable(gw: Gateway, config: Config) -> None:
    resp = await register(gw, "extra", str(config.adapter_dirs["extra"]))
    assert resp.status_code == 201
    assert resp.json()["label"] == "extra@1"
    assert resp.json()["aliases"] == ["stable"]
    resp = await gw.chat(model="extra")  # acme is entitled to `extra`
    assert resp.status_code == 200
    assert resp.headers["x-loraplex-adapter"] == "extra@1"
    models = await gw.client.get("/v1/models", headers=auth(ACME_KEY))
    assert "extra" in [m["id"] for m in models.json()["data"]]


async def test_alias_move_new_requests_switch_resolved_ones_finish_on_old(
    gw: Gateway, config: Config
) -> None:
    assert (await register(gw, "medical", new_adapter(config, "medical", 99))).status_code == 201
    v1, v2 = served(gw, "medical@1"), served(gw, "medical@2")
    gate = asyncio.Event()
    gw.engine.answers.append(Answer(200, orjson.dumps(completion_body(v1, "chat")), gate=gate))
    gw.engine.forwarded.clear()
    slow = asyncio.create_task(gw.chat(model="medical"))
    await wait_until(lambda: len(gw.engine.forwarded) == 1, what="first request at the engine")
    assert gw.state.engines.in_flight(v1) == 1
    resp = await gw.client.put(
        "/admin/v1/adapters/medical/aliases/stable", json={"version": 2}, headers=ADMIN
    )
    assert resp.status_code == 200
    assert resp.json() == {"name": "medical", "alias": "stable", "before": 1, "version": 2}
    fast = await gw.chat(model="medical")
    assert fast.status_code == 200
    assert fast.headers["x-loraplex-adapter"] == "medical@2"
    assert gw.engine.forwarded[1].body["model"] == v2
    assert not slow.done()
    gate.set()
    first = await slow
    assert first.status_code == 200
    assert first.headers["x-loraplex-adapter"] == "medical@1"
    assert gw.engine.forwarded[0].body["model"] == v1
    assert gw.state.engines.in_flight(v1) == 0


async def test_versions_and_aliases_as_model_names_and_header(gw: Gateway, config: Config) -> None:
    resp = await register(gw, "medical", new_adapter(config, "medical", 99), alias="canary")
    assert resp.json()["aliases"] == ["canary"]
    for model, label in (
        ("medical", "medical@1"),
        ("medical@stable", "medical@1"),
        ("medical@1", "medical@1"),
        ("medical@canary", "medical@2"),
        ("medical@2", "medical@2"),
    ):
        by_model = await gw.chat(model=model)
        assert by_model.headers["x-loraplex-adapter"] == label, model
        by_header = await gw.chat(model="legal", headers={"X-Loraplex-Adapter": model})
        assert by_header.headers["x-loraplex-adapter"] == label, model
        assert gw.engine.forwarded[-1].body["model"] == served(gw, label)
    resp = await gw.client.delete("/admin/v1/adapters/medical/aliases/canary", headers=ADMIN)
    assert resp.status_code == 200
    assert_error(await gw.chat(model="medical@canary"), 404, "model_not_found")


async def test_failed_smoke_generation_rejects_the_version(gw: Gateway, config: Config) -> None:
    gw.engine.answers.append(Answer(500, b'{"error": "boom"}'))
    resp = await register(gw, "medical", new_adapter(config, "medical", 99), alias="canary")
    err = assert_error(resp, 422, "adapter_smoke_failed")
    assert "500" in err["message"]
    v2 = gw.state.registry.snapshot.versions[("medical", 2)]
    assert v2.state == "rejected"
    assert "smoke generation failed" in (v2.state_reason or "")
    assert gw.state.registry.snapshot.aliases_of("medical") == {"stable": 1}
    assert not gw.state.engines.is_registered(v2.served_name)
    assert gw.engine.unload_calls == [v2.served_name]
    assert_error(await gw.chat(model="medical@2"), 404, "model_not_found")
    assert (await gw.chat(model="medical")).headers["x-loraplex-adapter"] == "medical@1"


@pytest.mark.parametrize(
    "body",
    [
        b'{"choices": [{"text": ""}], "usage": {"completion_tokens": 0}}',
        b"not json",
        b'{"choices": []}',
    ],
)
async def test_smoke_generation_must_produce_tokens(
    gw: Gateway, config: Config, body: bytes
) -> None:
    gw.engine.answers.append(Answer(200, body))
    resp = await register(gw, "medical", new_adapter(config, "medical", 99))
    assert_error(resp, 422, "adapter_smoke_failed")
    assert not gw.state.registry.snapshot.versions[("medical", 2)].routable


async def test_engine_refusing_the_adapter_rejects_it(gw: Gateway, config: Config) -> None:
    gw.engine.refuse("extra", "engine refused the adapter: target modules mismatch")
    resp = await register(gw, "extra", str(config.adapter_dirs["extra"]))
    err = assert_error(resp, 422, "adapter_smoke_failed")
    assert "target modules" in err["message"]
    assert gw.state.registry.snapshot.versions[("extra", 1)].state == "rejected"
    assert gw.state.registry.snapshot.aliases_of("extra") == {}
    assert_error(await gw.chat(model="extra"), 404, "model_not_found")


async def test_retire_and_delete_refused_while_an_alias_points_at_the_version(
    gw: Gateway, config: Config
) -> None:
    url = "/admin/v1/adapters/medical/versions/1"
    for method, path in (("POST", f"{url}/retire"), ("DELETE", url)):
        resp = await gw.client.request(method, path, headers=ADMIN)
        err = assert_error(resp, 409, "version_in_use")
        assert "stable" in err["message"]
    assert gw.engine.unload_calls == []
    assert (await gw.chat(model="medical")).status_code == 200
    # Move the alias, then retire (drained and unregistered) and delete; numbers never return.
    assert (await register(gw, "medical", new_adapter(config, "medical", 99))).status_code == 201
    put = await gw.client.put(
        "/admin/v1/adapters/medical/aliases/stable", json={"version": 2}, headers=ADMIN
    )
    assert put.status_code == 200
    v1 = served(gw, "medical@1")
    resp = await gw.client.post(f"{url}/retire", headers=ADMIN)
    assert resp.status_code == 200
    assert resp.json()["state"] == "retired"
    assert gw.engine.unload_calls == [v1]
    assert_error(await gw.chat(model="medical@1"), 404, "model_not_found")
    assert (await gw.chat(model="medical")).headers["x-loraplex-adapter"] == "medical@2"
    resp = await gw.client.put(
        "/admin/v1/adapters/medical/aliases/stable", json={"version": 1}, headers=ADMIN
    )
    assert_error(resp, 409, "invalid_state_transition")  # a retired version takes no alias
    assert (await gw.client.delete(url, headers=ADMIN)).status_code == 200
    assert_error(await gw.client.get(url, headers=ADMIN), 404, "adapter_not_found")
    resp = await register(gw, "medical", new_adapter(config, "medical", 98))
    assert resp.json()["version"] == 3


async def test_pin_registers_and_survives_eviction(gw: Gateway, config: Config) -> None:
    res = gw.state.engines
    res.budget = 2
    legal = served(gw, "legal")
    resp = await gw.client.post("/admin/v1/adapters/legal/versions/1/pin", headers=ADMIN)
    assert resp.status_code == 200
    assert resp.json()["pinned"] is True
    assert resp.json()["registered_on_engine"] is True
    for model in ("medical", "legal", "medical", "base", "medical"):
        assert (await gw.chat(model=model)).status_code == 200
    assert (await register(gw, "extra", str(config.adapter_dirs["extra"]))).status_code == 201
    assert (await gw.chat(model="medical")).status_code == 200
    assert legal not in gw.engine.unload_calls
    assert res.is_registered(legal)
    assert len(res.registered_names()) == 2
    assert served(gw, "extra") in gw.engine.unload_calls  # evicted for medical
    text = await gw.metrics()
    assert metric(text, "loraplex_adapter_residency_events_total", event="evict") >= 2
    assert metric(text, "loraplex_adapter_residency_events_total", event="miss") >= 1
    assert metric(text, "loraplex_adapter_residency_events_total", event="hit") >= 4
    # Unpinned, it is evictable again.
    resp = await gw.client.delete("/admin/v1/adapters/legal/versions/1/pin", headers=ADMIN)
    assert resp.json()["pinned"] is False
    assert (await register(gw, "legal", new_adapter(config, "legal", 97))).status_code == 201
    assert (await gw.chat(model="medical")).status_code == 200
    assert legal in gw.engine.unload_calls


async def test_version_gauges_follow_the_registry(gw: Gateway, config: Config) -> None:
    await gw.wait_gauge("loraplex_adapter_versions", 3, state="ready")
    assert gw.gauge("loraplex_adapter_versions", state="rejected") == 1
    gw.engine.answers.append(Answer(500))
    await register(gw, "medical", new_adapter(config, "medical", 99))
    await register(gw, "extra", str(config.adapter_dirs["extra"]))
    await gw.wait_gauge("loraplex_adapter_versions", 4, state="ready")
    await gw.wait_gauge("loraplex_adapter_versions", 2, state="rejected")
    assert sorted(gw.state.engines.registered_names()) == sorted(
        served(gw, f"{n}@1") for n in ("extra", "finance", "legal", "medical")
    )
    await gw.wait_gauge("loraplex_adapters_resident", 4)
    text = await gw.metrics()
    assert metric(text, "loraplex_adapter_load_seconds_count") == 2  # extra@1 and medical@2
    assert metric(text, "loraplex_adapter_versions", state="ready") == 4


# ---- tenants, keys, quotas ---------------------------------------------------------------------


async def create_tenant(gw: Gateway, name: str, **body: Any) -> dict[str, Any]:
    resp = await gw.client.post("/admin/v1/tenants", json={"name": name, **body}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    created: dict[str, Any] = resp.json()
    return created


async def status_with(gw: Gateway, key: str) -> int:
    return (await gw.client.get("/v1/models", headers=auth(key))).status_code


async def test_tenant_create_patch_rotate_delete(gw: Gateway) -> None:
    t = await create_tenant(gw, "gamma", adapters=["medical", "base"], default="medical")
    key1 = t.pop("api_key")
    assert key1.startswith("sk-lp-")
    assert t["adapters"] == ["base", "medical"]
    assert len(t["keys"]) == 1
    assert key1 not in str(t["keys"])
    models = await gw.client.get("/v1/models", headers=auth(key1))
    assert [m["id"] for m in models.json()["data"]] == ["base", "medical"]
    assert (await gw.chat(key1)).headers["x-loraplex-adapter"] == "medical@1"
    assert_error(await gw.chat(key1, model="legal"), 404, "model_not_found")
    resp = await gw.client.post("/admin/v1/tenants", json={"name": "gamma"}, headers=ADMIN)
    assert_error(resp, 409, "tenant_exists")
    # Patch: entitlements and default change, keys stay.
    resp = await gw.client.patch(
        "/admin/v1/tenants/gamma", json={"adapters": ["legal"], "default": "legal"}, headers=ADMIN
    )
    assert resp.status_code == 200
    assert resp.json()["adapters"] == ["legal"]
    assert (await gw.chat(key1)).headers["x-loraplex-adapter"] == "legal@1"
    assert_error(await gw.chat(key1, model="medical"), 404, "model_not_found")
    # Rotation keeping the previous key: both work; the next rotation drops the oldest.
    rot = "/admin/v1/tenants/gamma/rotate-key"
    key2 = (await gw.client.post(rot, json={}, headers=ADMIN)).json()["api_key"]
    assert [await status_with(gw, k) for k in (key1, key2)] == [200, 200]
    key3 = (await gw.client.post(rot, json={"keep_previous": True}, headers=ADMIN)).json()[
        "api_key"
    ]
    assert [await status_with(gw, k) for k in (key1, key2, key3)] == [401, 200, 200]
    resp = await gw.client.post(rot, json={"keep_previous": False}, headers=ADMIN)
    key4 = resp.json()["api_key"]
    assert len(resp.json()["keys"]) == 1
    assert [await status_with(gw, k) for k in (key2, key3, key4)] == [401, 401, 200]
    # Delete: the key stops working at once.
    resp = await gw.client.delete("/admin/v1/tenants/gamma", headers=ADMIN)
    assert resp.json()["deleted"] is True
    assert await status_with(gw, key4) == 401
    for method in ("GET", "PATCH", "DELETE"):
        resp = await gw.client.request(method, "/admin/v1/tenants/gamma", json={}, headers=ADMIN)
        assert_error(resp, 404, "tenant_not_found")
    listed = await gw.client.get("/admin/v1/tenants", headers=ADMIN)
    assert [t["name"] for t in listed.json()["data"]] == ["acme", "beta", "nodefault"]


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"adapters": ["a", "b"], "quotas": {"max_adapters": 1}}, "quota_max_adapters", "adapters"),
        ({"adapters": ["a"], "default": "b"}, "invalid_request", "default"),
        ({"adapters": ["bad name"]}, "invalid_request", "adapters"),
        ({"quotas": {"requests_per_minute": 0}}, "invalid_request", "quotas.requests_per_minute"),
        ({"api_key": "mine"}, "invalid_request", "api_key"),
    ],
)
async def test_tenant_refusals(gw: Gateway, body: dict[str, Any], code: str, param: str) -> None:
    resp = await gw.client.post("/admin/v1/tenants", json={"name": "g", **body}, headers=ADMIN)
    assert_error(resp, 400, code, param=param)
    assert "g" not in gw.state.registry.snapshot.tenants


async def test_max_adapters_quota_on_patch(gw: Gateway) -> None:
    await create_tenant(gw, "gamma", adapters=["medical"], quotas={"max_adapters": 1})
    resp = await gw.client.patch(
        "/admin/v1/tenants/gamma", json={"adapters": ["medical", "legal"]}, headers=ADMIN
    )
    assert_error(resp, 400, "quota_max_adapters")
    assert gw.state.registry.snapshot.tenants["gamma"].adapters == {"medical"}


async def test_requests_per_minute_is_429_with_retry_after(gw: Gateway) -> None:
    key = (
        await create_tenant(gw, "gamma", adapters=["medical"], quotas={"requests_per_minute": 2})
    )["api_key"]
    for _ in range(2):
        assert (await gw.chat(key, model="medical")).status_code == 200
    resp = await gw.chat(key, model="medical")
    assert_error(resp, 429, "rate_limit_exceeded", type_="rate_limit_error")
    assert 1 <= int(resp.headers["retry-after"]) <= 30  # one request per 30 s refills
    assert len(gw.engine.forwarded) == 2
    # Other tenants are not affected.
    assert (await gw.chat(model="medical")).status_code == 200


async def test_tokens_per_minute_charged_from_usage(gw: Gateway) -> None:
    key = (await create_tenant(gw, "gamma", adapters=["medical"], quotas={"tokens_per_minute": 6}))[
        "api_key"
    ]
    first = await gw.chat(key, model="medical")  # admitted; the engine reports 7 + 3 tokens
    assert first.status_code == 200
    resp = await gw.chat(key, model="medical")  # the bucket is 4 tokens in debt
    assert_error(resp, 429, "rate_limit_exceeded")
    assert 49 <= int(resp.headers["retry-after"]) <= 50  # (4 + 1) tokens at 6/min
    assert len(gw.engine.forwarded) == 1


# ---- audit ------------------------------------------------------------------------------------


async def audit(gw: Gateway, **params: Any) -> list[dict[str, Any]]:
    resp = await gw.client.get("/admin/v1/audit", params=params, headers=ADMIN)
    assert resp.status_code == 200
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


async def test_every_mutation_is_audited_with_actor_and_before_after(
    gw: Gateway, config: Config
) -> None:
    who = {**ADMIN, "X-Loraplex-Actor": "alice"}
    newest = (await audit(gw, limit=1))[0]["id"]
    resp = await gw.client.post(
        "/admin/v1/adapters",
        json={"name": "medical", "source": new_adapter(config, "medical", 99)},
        headers={**who, "X-Request-Id": "req-reg"},
    )
    assert resp.status_code == 201
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("PUT", "/admin/v1/adapters/medical/aliases/canary", {"version": 2}),
        ("POST", "/admin/v1/adapters/medical/versions/2/pin", None),
        ("DELETE", "/admin/v1/adapters/medical/versions/2/pin", None),
        ("DELETE", "/admin/v1/adapters/medical/aliases/canary", None),
        ("POST", "/admin/v1/adapters/medical/versions/2/retire", None),
        ("DELETE", "/admin/v1/adapters/medical/versions/2", None),
        ("POST", "/admin/v1/tenants", {"name": "gamma", "adapters": ["medical"]}),
        ("PATCH", "/admin/v1/tenants/gamma", {"quotas": {"requests_per_minute": 5}}),
        ("POST", "/admin/v1/tenants/gamma/rotate-key", {}),
        ("DELETE", "/admin/v1/tenants/gamma", None),
    ]
    keys: list[str] = []
    for method, path, body in calls:
        resp = await gw.client.request(method, path, json=body, headers=who)
        assert resp.status_code in (200, 201), (path, resp.text)
        keys.extend(v for k, v in resp.json().items() if k == "api_key")
    refused = await gw.client.post(
        "/admin/v1/adapters", json={"name": "extra", "source": "/does/not/exist"}, headers=who
    )
    assert refused.status_code == 422
    entries = [e for e in await audit(gw, limit=50) if e["id"] > newest][::-1]
    assert [(e["action"], e["target"]) for e in entries] == [
        ("adapter.register", "medical@2"),
        ("adapter.ready", "medical@2"),
        ("alias.set", "medical@canary"),
        ("adapter.pin", "medical@2"),
        ("adapter.unpin", "medical@2"),
        ("alias.delete", "medical@canary"),
        ("adapter.retired", "medical@2"),
        ("adapter.delete", "medical@2"),
        ("tenant.create", "tenant:gamma"),
        ("tenant.update", "tenant:gamma"),
        ("tenant.update", "tenant:gamma"),
        ("tenant.delete", "tenant:gamma"),
        ("adapter.refused", "extra"),
    ]
    assert all(e["actor"].startswith("alice (admin:") for e in entries)
    assert entries[0]["request_id"] == entries[1]["request_id"] == "req-reg"
    assert entries[0]["before"] is None
    assert entries[0]["after"]["digest"].startswith("sha256:")
    assert entries[1]["before"] == {"state": "validated"}
    assert entries[1]["after"] == {"state": "ready", "reason": None}
    assert (entries[2]["before"], entries[2]["after"]) == ({"version": None}, {"version": 2})
    assert (entries[5]["before"], entries[5]["after"]) == ({"version": 2}, {"version": None})
    assert entries[7]["after"] is None
    assert entries[9]["before"]["quotas"]["requests_per_minute"] is None
    assert entries[9]["after"]["quotas"]["requests_per_minute"] == 5
    assert len(entries[10]["after"]["keys"]) == 2  # rotated, previous key kept
    assert entries[12]["after"] == {"source": "/does/not/exist", "code": "source_not_found"}
    # Keys never reach the audit log (only digest prefixes do).
    text = orjson.dumps(entries).decode()
    assert keys
    assert not any(k in text for k in keys)
    assert ADMIN_KEY not in text
    # Paging: newest first, `before` continues.
    page = await audit(gw, limit=2)
    more = await audit(gw, limit=2, before=page[-1]["id"])
    assert [e["id"] for e in page + more] == sorted((e["id"] for e in page + more), reverse=True)
    assert len(more) == 2


async def test_unnamed_actor_is_the_admin_key_id(gw: Gateway) -> None:
    resp = await gw.client.put(
        "/admin/v1/adapters/legal/aliases/canary",
        json={"version": 1},
        headers={**ADMIN, "X-Loraplex-Actor": "bad;name"},
    )
    assert resp.status_code == 200
    [entry] = await audit(gw, limit=1)
    assert entry["actor"].startswith("admin:")
    assert len(entry["actor"]) == len("admin:") + 8


# ---- the bad-adapter table, through the API --------------------------------------------------

CAPS = Caps()
# The gateway's archive limits are not configurable per test; the zip bomb sizes itself by
# them (covered at the pipeline level in test_validate.py).
CASES = [c for c in BAD_ADAPTERS if c.name != "zip-bomb"]


async def test_bad_adapters_get_their_code_and_nothing_routable(
    config: Config, engine: FakeEngine, bootstrapped: Bootstrapped, tmp_path: Path
) -> None:
    shutil.copyfile(bootstrapped.db, config.root / "registry.db")
    engine.served |= bootstrapped.served
    settings = config.settings(
        adapters_file=None,
        registry={"max_adapter_bytes": CAPS.max_adapter_bytes},
        engine={"max_lora_rank": CAPS.max_rank},
    )
    good = Path(new_adapter(config, "good", 5))
    async with running_gateway(settings, engine) as gw:
        outcomes = {}
        for case in CASES:
            source = str(case.make(good, tmp_path / "bad", CAPS))
            check = await gw.client.post(
                "/admin/v1/adapters/validate", json={"source": source}, headers=ADMIN
            )
            resp = await register(gw, "bad", source)
            assert 400 <= resp.status_code < 500, (case.name, resp.text)
            assert check.status_code == resp.status_code, case.name
            outcomes[case.name] = (
                resp.json()["error"]["code"],
                check.json()["error"]["code"],
            )
        assert outcomes == {c.name: (c.code, c.code) for c in CASES}
        assert gw.state.registry.snapshot.versions_of("bad") == []
        assert engine.load_calls == []
        refusals = [e for e in await audit(gw, limit=100) if e["action"] == "adapter.refused"]
        assert sorted(e["after"]["code"] for e in refusals) == sorted(c.code for c in CASES)
        # The good one registers fine on the same gateway.
        assert (await register(gw, "good", str(good))).status_code == 201


# ---- following other replicas' changes -------------------------------------------------------


async def test_another_replicas_retirement_is_followed(gw: Gateway) -> None:
    medical = served(gw, "medical")
    other = await Registry.open(gw.settings.registry.url)  # a second replica, same database
    try:
        who = Actor("replica-2")
        await other.set_alias("medical", "stable", None, who)
        await other.set_state("medical", 1, VersionState.RETIRED, who)
    finally:
        await other.close()
    await wait_until(lambda: medical in gw.engine.unload_calls, what="retired version unloaded")
    assert not gw.state.engines.is_registered(medical)
    assert_error(await gw.chat(model="medical@1"), 404, "model_not_found")
    assert (await gw.chat(model="legal")).status_code == 200


async def test_registry_refresh_leaves_a_registration_in_progress_alone(
    gw: Gateway, config: Config
) -> None:
    """Regression: a registry refresh while a new version ran its smoke generation (state
    validated, registered on the engine) unregistered it: the smoke could then fail on a
    404 and reject a good adapter."""
    gate = asyncio.Event()
    gw.engine.answers.append(
        Answer(200, orjson.dumps(completion_body("x", "completions")), gate=gate)
    )
    task = asyncio.create_task(register(gw, "medical", new_adapter(config, "medical", 99)))
    await wait_until(lambda: len(gw.engine.forwarded) == 1, what="the smoke generation")
    v2 = gw.state.registry.snapshot.versions[("medical", 2)]
    assert v2.state == "validated"
    assert gw.state.engines.is_registered(v2.served_name)
    gw.state.registry.snapshot = dataclasses.replace(gw.state.registry.snapshot, generation=-9)
    await follow_registry(gw.state)  # as if another replica had changed something
    await asyncio.sleep(0)
    gate.set()
    resp = await task
    assert resp.status_code == 201
    assert resp.json()["registered_on_engine"] is True
    assert gw.engine.unload_calls == []
