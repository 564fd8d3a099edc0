"""Tenant isolation, property-based (hypothesis): random tenants, entitlements, defaults,
experiments and requests (keys, endpoints, `model` fields and adapter headers naming adapters,
versions, aliases, `auto`, engine-side names, garbage) against one in-process gateway over the
fake engine, which records every request it was asked to serve.

Properties, for every request:
- the engine only ever serves a tenant an adapter version (or the base model) the tenant is
  entitled to — the request itself, experiment variants and shadow copies included;
- no response (body or header, answers and errors alike) names an adapter the tenant is not
  entitled to, unless the client itself sent that name; engine-side names never leak;
- only the documented outcomes happen (200, 400, 401, 404; never a 5xx).
Plus the key rules: admin routes refuse tenant keys (403), /v1 refuses the admin key (401),
keys are stored only as sha256 digests and compared with `hmac.compare_digest`, a rotation
without `keep_previous` revokes the old key at once.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adapters.registry import ExperimentRecord, NewVersion, Registry, TenantRecord
from adapters.registry_types import Actor
from adapters.types import AdapterRef, VersionState
from router.experiments import ExperimentSpec
from server import auth as auth_module
from server.auth import hash_key
from tests.unit.conftest import Bootstrapped, Config
from tests.unit.fakes import SECRET_SERVED_NAME, FakeEngine
from tests.unit.helpers import (
    ACME_KEY,
    ADMIN_KEY,
    Gateway,
    assert_error,
    auth,
    running_gateway,
    wait_until,
)

POOL = ("qzalpha", "qzbravo", "qzcharl", "qzdelta", "qzecho")  # no one is part of another
DOMAINS = {"dalpha": "qzalpha", "dbravo": "qzbravo@canary", "dcharl": "qzcharl@2"}
KEYWORDS = {"dalpha": "kwone", "dbravo": "kwtwo", "dcharl": "kwthree"}
TENANTS = ("t0", "t1", "t2")
KEYS = {t: f"sk-iso-{t}-0123456789" for t in TENANTS}
OPS = Actor("admin:test")
# Other registered names a tenant of this world never gets (bootstrap adapters' engine names).
OTHER_MARKERS = (SECRET_SERVED_NAME, "legal@1-", "medical@1-", "finance@1-")

EXAMPLES = 50  # per property; the file stays well under 20 s
TMPFS = "/dev/shm" if os.path.isdir("/dev/shm") else None
PROFILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def digest(name: str, version: int) -> str:
    return "sha256:" + (f"{name}{version}".encode().hex() * 8)[:64]


def served_name(name: str, version: int) -> str:
    return f"{name}@{version}-{digest(name, version).removeprefix('sha256:')[:10]}"


# ---- the world --------------------------------------------------------------------------------


@pytest.fixture
async def world(
    config: Config, engine: FakeEngine, bootstrapped: Bootstrapped, tmp_path: Path
) -> AsyncIterator[Gateway]:
    """A gateway with `auto` routing (keyword classifier) and the adapter pool: versions 1
    and 2 ready, 3 retired, 4 rejected; aliases stable → 1, canary → 2."""
    routes = {
        "version": 1,
        "fallback": "qzecho",  # an adapter: a tenant without it must never see its name
        "threshold": 0.3,
        "domains": {
            d: {"target": target, "keywords": [KEYWORDS[d]], "examples": [f"{KEYWORDS[d]} text"]}
            for d, target in DOMAINS.items()
        },
        "tenants": {
            "t0": {"fallback": "qzdelta", "domains": {"dalpha": "qzecho@stable"}},
            "t1": {"auto": True},
        },
    }
    routes_file = tmp_path / "routes.yaml"
    routes_file.write_text(yaml.safe_dump(routes))
    # The registry on tmpfs when there is one: each example rewrites tenants and experiments,
    # and fsyncs on a busy disk would dominate the run time.
    db_dir = Path(tempfile.mkdtemp(dir=TMPFS, prefix="loraplex-iso-"))
    shutil.copyfile(bootstrapped.db, db_dir / "registry.db")
    engine.served |= bootstrapped.served
    settings_ = config.settings(
        adapters_file=None,
        router={"routes_file": routes_file, "classifier": "keyword"},
        registry={"url": f"sqlite+aiosqlite:///{db_dir / 'registry.db'}"},
    )
    try:
        async with running_gateway(settings_, engine) as gw:
            reg = gw.state.registry
            for name in POOL:
                for number, state in ((1, "ready"), (2, "ready"), (3, "retired"), (4, "rejected")):
                    await add_version(reg, name, number, VersionState(state))
                await reg.set_alias(name, "stable", 1, OPS)
                await reg.set_alias(name, "canary", 2, OPS)
            for t in TENANTS:
                await reg.put_tenant(TenantRecord(t, (hash_key(KEYS[t]),), frozenset()), OPS)
            yield gw
    finally:
        shutil.rmtree(db_dir, ignore_errors=True)


async def add_version(reg: Registry, name: str, number: int, state: VersionState) -> None:
    new = NewVersion(
        digest=digest(name, number),
        base_digest=None,
        rank=8,
        alpha=16.0,
        target_modules=("q_proj",),
        size_bytes=1,
        source_uri=f"/pool/{name}",
        path=f"/pool/{name}/{number}",
    )
    v = await reg.add_version(name, new, VersionState.VALIDATED, OPS)
    assert v.version == number
    if state is not VersionState.VALIDATED:
        await reg.set_state(name, number, state, OPS)


# ---- strategies ---------------------------------------------------------------------------------

pool_name = st.sampled_from(POOL)
adapter_ref = st.one_of(
    pool_name,
    st.builds("{}@{}".format, pool_name, st.integers(0, 5)),
    st.builds("{}@{}".format, pool_name, st.sampled_from(["stable", "canary", "nope"])),
)
# Weighted towards what gets served (auto routing, experiment targets, entitled names).
model_field = st.one_of(
    st.just("auto"),
    st.just("auto"),
    pool_name,
    pool_name,
    st.none(),
    st.sampled_from(["", "default", "AUTO", "base", "legal", "medical@1", "finance"]),
    st.just(SECRET_SERVED_NAME),
    adapter_ref,
    st.builds(served_name, pool_name, st.integers(1, 2)),
    st.text(max_size=24),
)
ascii_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
header_value = st.one_of(*[st.none()] * 8, st.just(""), adapter_ref, st.just("base"), ascii_text)


@st.composite
def tenant_specs(draw: st.DrawFn) -> dict[str, Any]:
    adapters = draw(st.sets(st.sampled_from([*POOL, "base"]), max_size=5))
    defaults = [None, *sorted(adapters)]
    defaults += [f"{a}@{s}" for a in sorted(adapters - {"base"}) for s in ("canary", "2", "nope")]
    return {"adapters": adapters, "default": draw(st.sampled_from(defaults))}


@st.composite
def experiment_specs(draw: st.DrawFn) -> list[dict[str, Any]]:
    targets = draw(
        st.lists(
            st.sampled_from([*POOL, "qzalpha@canary", "domain:dalpha", "domain:dbravo"]),
            max_size=3,
            unique=True,
        )
    )
    specs = []
    for target in targets:
        control = target.partition("@")[0] if not target.startswith("domain:") else "base"
        candidates = draw(
            st.lists(st.one_of(pool_name, adapter_ref, st.just("base")), min_size=1, max_size=2)
        )
        variants = [{"name": "ctl", "model": control}] + [
            {"name": f"cand{i}", "model": m} for i, m in enumerate(candidates)
        ]
        weights = {f"cand{i}": draw(st.sampled_from([0.0, 0.5])) for i in range(len(candidates))}
        spec: dict[str, Any] = {"target": target, "variants": variants, "weights": weights}
        if draw(st.booleans()):
            spec["shadow"] = {"variant": "cand0", "share": 1.0}
        if draw(st.booleans()):
            spec["tenants"] = draw(st.lists(st.sampled_from(TENANTS), max_size=2, unique=True))
        specs.append(spec)
    return specs


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    """Tenants, experiments, then requests; the requests' model fields lean towards what the
    sender is entitled to, experiment targets and `auto`, so most of them get served."""
    tenants = [draw(tenant_specs()) for _ in TENANTS]
    experiments = draw(experiment_specs())
    targets = [e["target"] for e in experiments if not e["target"].startswith("domain:")]
    batch = []
    for _ in range(draw(st.integers(1, 6))):
        who = draw(st.sampled_from([*TENANTS, *TENANTS, *TENANTS, "admin", "nobody"]))
        entitled = sorted(tenants[TENANTS.index(who)]["adapters"]) if who in TENANTS else []
        focused = [st.just("auto")]
        focused += [st.sampled_from(entitled)] if entitled else []
        focused += [st.sampled_from(targets)] if targets else []
        batch.append(
            {
                "who": who,
                "endpoint": draw(st.sampled_from(["chat", "chat", "completions", "models"])),
                "stream": draw(st.booleans()),
                "model": draw(st.one_of(*focused, *focused, model_field)),
                "header": draw(header_value),
                "user": draw(st.one_of(st.none(), ascii_text)),
                "prompt": draw(st.sampled_from(["kwone please", "about kwtwo", "kwthree", "hi"])),
            }
        )
    return {"tenants": tenants, "experiments": experiments, "batch": batch}


# ---- the property -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    tenant: str | None
    text: str  # everything the client itself put in the request


async def apply_world(gw: Gateway, tenants: list[dict[str, Any]], experiments: list[Any]) -> None:
    reg = gw.state.registry
    for name in list(reg.snapshot.experiments):
        await reg.delete_experiment(name, OPS)
    for t, entitled in zip(TENANTS, tenants, strict=True):
        digests = (hash_key(KEYS[t]),)
        adapters = frozenset(entitled["adapters"])
        await reg.put_tenant(TenantRecord(t, digests, adapters, entitled["default"]), OPS)
    for i, raw in enumerate(experiments):
        spec = ExperimentSpec.model_validate(raw)
        experiment = ExperimentRecord(
            name=f"exp{i}",
            target=spec.target,
            definition=spec.model_dump(mode="json"),
            status="running",
            weights=spec.initial_weights(),
            ramp_step=0,
            step_started_at=time.time(),
        )
        await reg.put_experiment(experiment, OPS, create=True)


def allowed_engine_names(gw: Gateway, tenant: str) -> set[str]:
    snap = gw.state.registry.snapshot
    adapters = snap.tenants[tenant].adapters
    names = {v.served_name for v in snap.versions.values() if v.name in adapters and v.routable}
    if "base" in adapters:
        names.add("base")
    return names


def forbidden_names(gw: Gateway, tenant: str | None, sent: str) -> list[str]:
    """Names that must not appear in what this client gets back."""
    entitled = gw.state.registry.snapshot.tenants[tenant].adapters if tenant else frozenset()
    lowered = sent.lower()
    names = [n for n in POOL if n not in entitled and n not in lowered]
    return names + [m for m in OTHER_MARKERS if m.lower() not in lowered]


async def send(gw: Gateway, r: dict[str, Any]) -> tuple[httpx.Response, Sent]:
    key = {"admin": ADMIN_KEY, "nobody": "sk-iso-nobody"}.get(r["who"], KEYS.get(r["who"], ""))
    tenant = r["who"] if r["who"] in TENANTS else None
    headers = auth(key)
    if r["header"] is not None:
        headers["X-Loraplex-Adapter"] = r["header"]
    if r["user"] is not None:
        headers["X-Loraplex-User"] = r["user"]
    sent = " ".join(str(v) for v in (r["model"], r["header"], r["user"]) if v is not None)
    if r["endpoint"] == "models":
        return await gw.client.get("/v1/models", headers=headers), Sent(tenant, sent)
    body: dict[str, Any] = {"stream": r["stream"]}
    if r["model"] is not None:
        body["model"] = r["model"]
    if r["endpoint"] == "chat":
        body["messages"] = [{"role": "user", "content": r["prompt"]}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = r["prompt"]
        path = "/v1/completions"
    resp = await gw.client.post(path, content=orjson.dumps(body), headers=headers)
    return resp, Sent(tenant, sent)


def check_response(gw: Gateway, r: dict[str, Any], resp: httpx.Response, sent: Sent) -> None:
    if sent.tenant is None:
        assert_error(resp, 401, "invalid_api_key")
        return
    assert resp.status_code in (200, 400, 404), (resp.status_code, resp.text, r)
    if resp.status_code == 404:
        assert resp.json()["error"]["code"] == "model_not_found"
    seen = (resp.text + " " + " ".join(f"{k}: {v}" for k, v in resp.headers.items())).lower()
    for name in forbidden_names(gw, sent.tenant, sent.text):
        assert name.lower() not in seen, (name, resp.status_code, seen[:600], r)
    if r["endpoint"] == "models" and resp.status_code == 200:
        entitled = gw.state.registry.snapshot.tenants[sent.tenant].adapters
        assert {m["id"] for m in resp.json()["data"]} <= entitled


@given(scenario=scenarios())
@PROFILE
async def test_no_request_reaches_or_reveals_an_adapter_the_tenant_may_not_use(
    world: Gateway, scenario: dict[str, Any]
) -> None:
    gw = world
    await apply_world(gw, scenario["tenants"], scenario["experiments"])
    for r in scenario["batch"]:
        gw.engine.forwarded.clear()
        resp, sent = await send(gw, r)
        # Shadow copies run in the background: wait for them, they count for this request.
        await wait_until(lambda: gw.state.shadow.in_flight == 0, what="shadow copies done")
        check_response(gw, r, resp, sent)
        if sent.tenant is None:
            assert gw.engine.forwarded == []
            continue
        event(f"status {resp.status_code}")
        for header in ("x-loraplex-domain", "x-loraplex-variant"):
            if header in resp.headers:
                event(f"{header}: {resp.headers[header]}")
        if len(gw.engine.forwarded) > 1:
            event("shadow copy sent")
        if r["header"]:
            event(f"adapter header, status {resp.status_code}")
        allowed = allowed_engine_names(gw, sent.tenant)
        for f in gw.engine.forwarded:
            assert f.body["model"] in allowed, (f.body["model"], sent.tenant, allowed, r)
        if resp.status_code == 200 and r["endpoint"] != "models":
            label = resp.headers["x-loraplex-adapter"]
            ref = AdapterRef.parse(label)
            assert ref is not None
            assert ref.name in gw.state.registry.snapshot.tenants[sent.tenant].adapters


# ---- admin and tenant keys never cross --------------------------------------------------------

ADMIN_ROUTES = [
    ("GET", "/admin/v1/adapters"),
    ("POST", "/admin/v1/adapters"),
    ("GET", "/admin/v1/adapters/qzalpha"),
    ("PUT", "/admin/v1/adapters/qzalpha/aliases/stable"),
    ("DELETE", "/admin/v1/adapters/qzalpha/versions/1"),
    ("GET", "/admin/v1/tenants"),
    ("POST", "/admin/v1/tenants"),
    ("PATCH", "/admin/v1/tenants/t0"),
    ("POST", "/admin/v1/tenants/t0/rotate-key"),
    ("DELETE", "/admin/v1/tenants/t0"),
    ("GET", "/admin/v1/audit"),
    ("GET", "/admin/v1/residency"),
    ("GET", "/admin/v1/engine"),
    ("GET", "/admin/v1/experiments"),
    ("POST", "/admin/v1/experiments"),
    ("POST", "/admin/v1/experiments/x/pause"),
    ("GET", "/admin/v1/drift"),
]
TENANT_ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("POST", "/v1/feedback"),
]


@given(
    route=st.sampled_from(ADMIN_ROUTES),
    tenant=st.sampled_from(TENANTS),
    body=st.one_of(st.just(b""), st.just(b"{}"), st.just(b'{"name": "x"}'), st.binary(max_size=40)),
)
@PROFILE
async def test_admin_routes_refuse_tenant_keys(
    world: Gateway, route: tuple[str, str], tenant: str, body: bytes
) -> None:
    before = world.state.registry.snapshot.generation
    method, path = route
    resp = await world.client.request(method, path, content=body, headers=auth(KEYS[tenant]))
    assert_error(resp, 403, "permission_denied")
    resp = await world.client.request(method, path, content=body, headers=auth("sk-unknown"))
    assert_error(resp, 401, "invalid_api_key")
    assert world.state.registry.snapshot.generation == before  # nothing changed


@given(route=st.sampled_from(TENANT_ROUTES), body=st.sampled_from([b"", b"{}", b'{"prompt":"x"}']))
@PROFILE
async def test_tenant_routes_refuse_the_admin_key(
    world: Gateway, route: tuple[str, str], body: bytes
) -> None:
    method, path = route
    world.engine.forwarded.clear()
    resp = await world.client.request(method, path, content=body, headers=auth(ADMIN_KEY))
    assert_error(resp, 401, "invalid_api_key")
    assert world.engine.forwarded == []


# ---- keys: stored hashed, compared in constant time, rotation is immediate -----------------------


def test_keys_are_compared_with_hmac_compare_digest() -> None:
    """By inspection: both lookups confirm the digest with `hmac.compare_digest`, and nothing
    in the module compares keys or digests with `==`."""
    source = inspect.getsource(auth_module)
    for method in (
        auth_module.TenantDirectory.authenticate,
        auth_module.TenantDirectory.authenticate_admin,
    ):
        assert "hmac.compare_digest(digest, d)" in inspect.getsource(method)
    assert "digest ==" not in source
    assert "== digest" not in source
    assert "token ==" not in source


async def test_the_registry_holds_only_key_digests(gw: Gateway, config: Config) -> None:
    admin = auth(ADMIN_KEY)
    made = await gw.client.post(
        "/admin/v1/tenants", json={"name": "gamma", "adapters": ["medical"]}, headers=admin
    )
    assert made.status_code == 201
    key = made.json()["api_key"]
    rotated = await gw.client.post(
        "/admin/v1/tenants/gamma/rotate-key", json={"keep_previous": True}, headers=admin
    )
    new_key = rotated.json()["api_key"]
    assert set(gw.state.registry.snapshot.tenants["gamma"].key_digests) == {
        hash_key(new_key),
        hash_key(key),
    }
    # Neither key, nor any tenant key of the fixture, is anywhere in the database files.
    db = config.root / "registry.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(FULL)")
        dump = "\n".join(conn.iterdump())
    raw = b"".join(p.read_bytes() for p in db.parent.glob("registry.db*"))
    for secret in (key, new_key, ACME_KEY, ADMIN_KEY):
        assert secret not in dump
        assert secret.encode() not in raw
    assert hash_key(new_key) in dump
    # The API never shows a digest whole either (12-character prefixes identify keys).
    view = (await gw.client.get("/admin/v1/tenants/gamma", headers=admin)).json()
    assert view["keys"] == [hash_key(new_key)[:12], hash_key(key)[:12]]


async def test_rotation_without_keep_previous_revokes_the_old_key_at_once(gw: Gateway) -> None:
    admin = auth(ADMIN_KEY)
    made = await gw.client.post(
        "/admin/v1/tenants", json={"name": "gamma", "adapters": ["medical"]}, headers=admin
    )
    old = made.json()["api_key"]
    assert (await gw.chat(old, model="medical")).status_code == 200
    stream = asyncio.create_task(gw.chat(old, model="medical", stream=True))
    rotated = await gw.client.post(
        "/admin/v1/tenants/gamma/rotate-key", json={"keep_previous": False}, headers=admin
    )
    assert rotated.status_code == 200
    new = rotated.json()["api_key"]
    # The very next request: old key 401 (every route), new key served.
    assert_error(await gw.chat(old, model="medical"), 401, "invalid_api_key")
    assert_error(await gw.client.get("/v1/models", headers=auth(old)), 401, "invalid_api_key")
    assert (await gw.chat(new, model="medical")).status_code == 200
    assert (await stream).status_code == 200  # a request admitted before finishes normally
    # Keeping the previous key keeps exactly one: the one before is revoked.
    again = await gw.client.post(
        "/admin/v1/tenants/gamma/rotate-key", json={"keep_previous": True}, headers=admin
    )
    newest = again.json()["api_key"]
    assert (await gw.chat(new, model="medical")).status_code == 200
    assert (await gw.chat(newest, model="medical")).status_code == 200
    await gw.client.post(
        "/admin/v1/tenants/gamma/rotate-key", json={"keep_previous": True}, headers=admin
    )
    assert_error(await gw.chat(new, model="medical"), 401, "invalid_api_key")
    # Deleting the tenant revokes its keys at once too.
    assert (await gw.client.delete("/admin/v1/tenants/gamma", headers=admin)).status_code == 200
    assert_error(await gw.chat(newest, model="medical"), 401, "invalid_api_key")


async def test_auto_with_no_usable_target_does_not_name_the_fallback(world: Gateway) -> None:
    """Found by the property above: when neither the domain's target, nor the tenant's or the
    global fallback, nor its default may serve the tenant, the 404 named the global fallback
    (here `qzecho`, an adapter the tenant is not entitled to)."""
    await apply_world(world, [{"adapters": set(), "default": None}] * 3, [])
    for prompt in ("kwone please", "nothing to route"):
        resp = await world.chat(
            KEYS["t0"], model="auto", messages=[{"role": "user", "content": prompt}]
        )
        err = assert_error(resp, 404, "model_not_found", param="model")
        assert "qzecho" not in resp.text
        assert "qzdelta" not in resp.text
        assert "auto" in err["message"]
    assert world.engine.forwarded == []
