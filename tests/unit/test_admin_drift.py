"""Drift through the in-process gateway: requests feed the monitor from RequestRecord.finish, the
first-N reference is stored in the registry, /admin/v1/drift shows and sets references (audited),
a shifted domain mix turns the alarm gauge on, references survive a restart."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from router.policy import DEFAULT_ROUTES
from tests.unit.conftest import Bootstrapped, Config
from tests.unit.fakes import Answer, FakeEngine
from tests.unit.helpers import (
    ADMIN_KEY,
    Gateway,
    assert_error,
    auth,
    metric,
    running_gateway,
)
from tests.unit.router_helpers import save_default_tfidf

ADMIN = auth(ADMIN_KEY)
MEDICAL = "I have had a fever and a sore throat for three days, should I see a doctor?"
LEGAL = "Can my landlord keep my security deposit without giving a reason?"
DRIFT = {"reference_size": 20, "window_size": 20, "min_window": 10, "evaluate_every": 1}


def settings_for(
    config: Config, engine: FakeEngine, bootstrapped: Bootstrapped, tmp_path: Path, **drift: Any
) -> Any:
    shutil.copyfile(bootstrapped.db, config.root / "registry.db")
    engine.served |= bootstrapped.served
    router = {"routes_file": DEFAULT_ROUTES, "artefact": save_default_tfidf(tmp_path)}
    return config.settings(adapters_file=None, router=router, drift={**DRIFT, **drift})


@pytest.fixture
async def gw(
    config: Config, engine: FakeEngine, bootstrapped: Bootstrapped, tmp_path: Path
) -> AsyncIterator[Gateway]:
    """A gateway with auto routing and a small drift window (reference: first 20 requests)."""
    async with running_gateway(settings_for(config, engine, bootstrapped, tmp_path), engine) as g:
        yield g


async def ask(gw: Gateway, text: str, n: int = 1, **body: Any) -> None:
    for _ in range(n):
        resp = await gw.chat(messages=[{"role": "user", "content": text}], **body)
        assert resp.status_code == 200, resp.text


async def drift(gw: Gateway) -> dict[str, Any]:
    resp = await gw.client.get("/admin/v1/drift", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


async def tenant_view(gw: Gateway, tenant: str = "acme") -> dict[str, Any]:
    found: list[dict[str, Any]] = [t for t in (await drift(gw))["data"] if t["tenant"] == tenant]
    assert len(found) == 1
    return found[0]


async def stored(gw: Gateway) -> dict[str, dict[str, Any]]:
    return await gw.state.registry.drift_references()


async def audit_actions(gw: Gateway) -> list[tuple[str, str, str]]:
    entries = await gw.state.registry.audit_entries(50)
    return [(e.action, e.target, e.actor) for e in entries if e.action.startswith("drift.")]


async def test_requests_feed_the_monitor_and_the_first_reference_is_stored(gw: Gateway) -> None:
    assert (await drift(gw))["data"] == []
    await ask(gw, MEDICAL, 10, model="auto")
    await ask(gw, LEGAL, 8, model="auto")
    await ask(gw, LEGAL, 1, model="legal")  # explicit: no routing decision
    await ask(gw, MEDICAL, 1, model="auto", stream=True)  # finishes when the stream closes
    view = await tenant_view(gw)
    assert view["reference"]["source"] == "first_n"
    assert view["reference"]["requests"] == 20
    current = view["windows"]["current"]
    assert (current["requests"], current["routed"]) == (20, 19)
    assert current["domains"] == {"legal": 8, "medical": 11}
    assert current["error_rate"] == 0
    assert 0.4 < current["confidence_mean"] <= 1
    assert current["prompt_length_bins"][3] == 20  # the fake engine's 7 prompt tokens: 4-7
    assert not any(view["alarms"].values())
    # Stored by a background task once the 20th request finished.
    ref_id = view["reference"]["id"]
    deadline = time.monotonic() + 3
    while (await stored(gw)).get("acme", {}).get("id") != ref_id:
        assert time.monotonic() < deadline, "first-N reference not stored"
        await asyncio.sleep(0.005)
    assert ("drift.reference.set", "tenant:acme", "system") in await audit_actions(gw)
    text = await gw.metrics()
    assert metric(text, "loraplex_drift_window_requests", tenant="acme", window="reference") == 20
    assert metric(text, "loraplex_drift_alarm", tenant="acme", statistic="domain_psi") == 0
    assert metric(text, "loraplex_drift_domain_psi", tenant="acme") < 0.25


async def test_a_shifted_domain_mix_turns_the_alarm_on(gw: Gateway) -> None:
    for _ in range(10):
        await ask(gw, MEDICAL, model="auto")
        await ask(gw, LEGAL, model="auto")
    await ask(gw, MEDICAL, 20, model="auto")
    text = await gw.metrics()
    assert metric(text, "loraplex_drift_alarm", tenant="acme", statistic="domain_psi") == 1
    assert metric(text, "loraplex_drift_domain_psi", tenant="acme") > 0.25
    assert (await tenant_view(gw))["alarms"]["domain_psi"] is True


async def test_engine_failures_count_as_errors(gw: Gateway) -> None:
    gw.engine.answers.extend(Answer(status=500) for _ in range(5))
    for _ in range(5):
        resp = await gw.chat(messages=[{"role": "user", "content": LEGAL}], model="auto")
        assert resp.status_code == 502
    await ask(gw, LEGAL, 5, model="auto")
    current = (await tenant_view(gw))["windows"]["current"]
    assert (current["requests"], current["error_rate"], current["sized"]) == (10, 0.5, 5)


async def test_set_the_reference_from_the_window_then_reset(gw: Gateway) -> None:
    await ask(gw, LEGAL, 12, model="auto")
    first_n = (await tenant_view(gw))["reference"]
    assert first_n["source"] is None  # still collecting: 12 of 20
    assert first_n["collecting"] == 12
    resp = await gw.client.post(
        "/admin/v1/drift/acme/reference",
        json={"from": "current"},
        headers={**ADMIN, "X-Loraplex-Actor": "alice"},
    )
    assert resp.status_code == 200, resp.text
    ref = resp.json()["reference"]
    assert (ref["source"], ref["requests"], ref["collecting"]) == ("window", 12, None)
    assert (await stored(gw))["acme"]["id"] == ref["id"]
    actions = await audit_actions(gw)
    assert actions[0][:2] == ("drift.reference.set", "tenant:acme")
    assert actions[0][2].startswith("alice (admin:")

    resp = await gw.client.post(
        "/admin/v1/drift/acme/reference", json={"reset": True}, headers=ADMIN
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["reference"] == {
        "id": None,
        "source": None,
        "set_at": None,
        "requests": 0,
        "collecting": 0,
    }
    assert "acme" not in await stored(gw)
    assert (await audit_actions(gw))[0][:2] == ("drift.reference.reset", "tenant:acme")


@pytest.mark.parametrize(
    "body",
    [{}, {"from": "current", "reset": True}, {"from": "yesterday"}, {"reset": False}, {"x": 1}],
)
async def test_bad_reference_bodies_are_400(gw: Gateway, body: dict[str, Any]) -> None:
    resp = await gw.client.post("/admin/v1/drift/acme/reference", json=body, headers=ADMIN)
    assert_error(resp, 400, "invalid_request")


async def test_unknown_tenant_and_small_window(gw: Gateway) -> None:
    resp = await gw.client.post(
        "/admin/v1/drift/nobody/reference", json={"reset": True}, headers=ADMIN
    )
    assert_error(resp, 404, "tenant_not_found")
    await ask(gw, LEGAL, 3, model="auto")
    resp = await gw.client.post(
        "/admin/v1/drift/acme/reference", json={"from": "current"}, headers=ADMIN
    )
    assert_error(resp, 409, "drift_window_too_small")
    assert await stored(gw) == {}


async def test_disabled_drift(
    config: Config, engine: FakeEngine, bootstrapped: Bootstrapped, tmp_path: Path
) -> None:
    settings = settings_for(config, engine, bootstrapped, tmp_path, enabled=False)
    async with running_gateway(settings, engine) as g:
        await ask(g, LEGAL, 3, model="auto")
        view = await drift(g)
        assert (view["enabled"], view["data"]) == (False, [])
        resp = await g.client.post(
            "/admin/v1/drift/acme/reference", json={"reset": True}, headers=ADMIN
        )
        assert_error(resp, 409, "drift_disabled")
        assert "loraplex_drift_" not in await g.metrics()


async def test_a_stored_reference_is_loaded_at_start(
    config: Config, engine: FakeEngine, bootstrapped: Bootstrapped, tmp_path: Path
) -> None:
    settings = settings_for(config, engine, bootstrapped, tmp_path)
    async with running_gateway(settings, engine) as g:
        await ask(g, MEDICAL, 15, model="auto")
        resp = await g.client.post(
            "/admin/v1/drift/acme/reference", json={"from": "current"}, headers=ADMIN
        )
        ref = resp.json()["reference"]
    async with running_gateway(settings, engine) as g:  # same registry database
        view = await tenant_view(g)
        assert view["reference"] == ref
        assert view["windows"]["current"]["requests"] == 0
        await ask(g, LEGAL, 10, model="auto")  # all legal against an all-medical reference
        assert (await tenant_view(g))["alarms"]["domain_psi"] is True
