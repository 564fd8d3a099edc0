"""A/B experiments through a running in-process gateway: the admin API (create, list/show,
pause/resume, weights, promote, abort, delete, analysis, auth, audit) and the request path
(sticky assignment, variant headers and versions, entitlements, per-variant metrics, shadow
copies)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.policy import DEFAULT_ROUTES
from server.experiments.analysis import VariantStats
from server.experiments.sources import MetricsUnavailable
from tests.unit.conftest import Bootstrapped, Config
from tests.unit.experiment_helpers import (
    ADMIN,
    add_medical_v2,
    admin,
    audit_actions,
    create,
    definition,
    stable_version,
    start,
    stats,
)
from tests.unit.fakes import Answer, FakeEngine
from tests.unit.helpers import (
    ACME_KEY,
    BETA_KEY,
    NODEFAULT_KEY,
    Gateway,
    assert_error,
    auth,
    metric,
    running_gateway,
    served,
    wait_until,
)
from tests.unit.router_helpers import save_default_tfidf
from tests.unit.test_registry_api import new_adapter, register

EXP = "experiment:ab"


@pytest.fixture
async def gw2(gw: Gateway, config: Config) -> Gateway:
    """The gateway with `medical@2` ready next to `medical@1` (stable)."""
    await add_medical_v2(gw, config)
    return gw


async def chat_as(gw: Gateway, user: str, key: str = ACME_KEY, **body: Any) -> httpx.Response:
    body.setdefault("model", "medical")
    resp = await gw.chat(key=key, headers={"X-Loraplex-User": user}, **body)
    assert resp.status_code == 200, resp.text
    return resp


def engine_model(gw: Gateway) -> str:
    model: str = gw.engine.forwarded[-1].body["model"]
    return model


# -- admin API: create ------------------------------------------------------------------------


async def test_create_list_show(gw2: Gateway) -> None:
    created = await start(gw2, guardrails={"min_samples": 50})
    assert created["name"] == "ab"
    assert created["target"] == "medical"
    assert created["status"] == "running"
    assert created["weights"] == {"control": 0.5, "candidate": 0.5}
    assert created["ramp_step"] == 0
    assert created["definition"]["guardrails"] == {"min_samples": 50}
    listed = (await admin(gw2, "GET", "")).json()
    assert listed["object"] == "list"
    assert [e["name"] for e in listed["data"]] == ["ab"]
    shown = await admin(gw2, "GET", "/ab")
    assert shown.status_code == 200
    assert shown.json() == created
    assert_error(await admin(gw2, "GET", "/nope"), 404, "experiment_not_found")


async def test_ramp_starts_at_its_first_step_and_the_base_model_is_a_variant(gw: Gateway) -> None:
    variants = [{"name": "control", "model": "medical@1"}, {"name": "plain", "model": "base"}]
    created = await start(gw, variants=variants, weights={}, ramp=[0.05, 0.5])
    assert created["weights"] == {"control": 0.95, "plain": 0.05}


BAD_DEFINITIONS: list[tuple[dict[str, Any], str, str | None]] = [
    (
        {
            "variants": [
                {"name": "control", "model": "medical@1"},
                {"name": "candidate", "model": "x"},
            ]
        },
        "variant_not_servable",
        "variants",
    ),
    (
        {
            "variants": [
                {"name": "control", "model": "medical@1"},
                {"name": "candidate", "model": "medical@7"},
            ]
        },
        "variant_not_servable",
        "variants",
    ),
    (
        {
            "variants": [
                {"name": "control", "model": "broken"},  # rejected at bootstrap
                {"name": "candidate", "model": "medical@1"},
            ]
        },
        "variant_not_servable",
        "variants",
    ),
    ({"guardrails": {"alpha": 2}}, "invalid_request", "guardrails"),
    ({"guardrails": {"no_such_rule": 1}}, "invalid_request", "guardrails"),
    ({"target": "medical@1"}, "invalid_request", None),
    ({"weights": {"candidate": 0.7, "control": 0.1, "x": 0.1}}, "invalid_request", None),
    ({"ramp": [0.5, 0.1]}, "invalid_request", None),
    ({"shadow": {"variant": "control", "share": 0.5}}, "invalid_request", None),
    ({"name": "bad name!"}, "invalid_request", "name"),
    ({"surprise": True}, "invalid_request", "surprise"),
]


async def test_bad_definitions_are_400(gw2: Gateway) -> None:
    for changes, code, param in BAD_DEFINITIONS:
        resp = await create(gw2, **changes)
        assert resp.status_code == 400, changes
        assert_error(resp, 400, code, param=param)
    assert gw2.state.registry.snapshot.experiments == {}


async def test_weights_over_one_at_create_are_400(gw2: Gateway) -> None:
    variants = [
        {"name": "control", "model": "medical@1"},
        {"name": "a", "model": "medical@2"},
        {"name": "b", "model": "base"},
    ]
    resp = await create(gw2, variants=variants, weights={"a": 0.6, "b": 0.6})
    err = assert_error(resp, 400, "invalid_request")
    assert "more than 1" in err["message"]


async def test_one_active_experiment_per_target_and_unique_names(gw2: Gateway) -> None:
    await start(gw2)
    assert_error(await create(gw2, target="legal"), 409, "experiment_exists")
    busy = assert_error(await create(gw2, "other"), 409, "experiment_target_busy")
    assert "medical@stable" in busy["message"]
    # `medical@stable` is the same target as `medical`.
    assert_error(await create(gw2, "other", target="medical@stable"), 409, "experiment_target_busy")
    # Another alias of the same adapter is another target.
    await start(gw2, "canary", target="medical@canary")
    # Ended experiments free their target, but keep their name.
    assert (await admin(gw2, "POST", "/ab/abort")).status_code == 200
    assert_error(await create(gw2), 409, "experiment_exists")
    await start(gw2, "other")


# -- admin API: state changes -------------------------------------------------------------------


async def test_pause_and_resume(gw2: Gateway) -> None:
    await start(gw2, weights={"candidate": 1.0})
    paused = await admin(gw2, "POST", "/ab/pause")
    assert paused.status_code == 200
    assert paused.json()["status"] == "paused"
    # A paused experiment still assigns, with its frozen weights.
    resp = await chat_as(gw2, "u1")
    assert resp.headers["x-loraplex-variant"] == "candidate"
    resumed = await admin(gw2, "POST", "/ab/resume")
    assert resumed.status_code == 200
    assert resumed.json()["status"] == "running"
    assert_error(await admin(gw2, "POST", "/ab/resume"), 409, "invalid_state_transition")
    assert_error(await admin(gw2, "POST", "/nope/pause"), 404, "experiment_not_found")


async def test_weights(gw2: Gateway) -> None:
    await start(gw2, weights={})
    before = gw2.state.registry.snapshot.experiments["ab"].step_started_at
    resp = await admin(gw2, "POST", "/ab/weights", {"weights": {"candidate": 0.2}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["weights"] == {"control": 0.8, "candidate": 0.2}
    assert resp.json()["step_started_at"] >= before
    for bad in ({"nope": 0.1}, {"candidate": 1.5}, {"candidate": -0.1}, {"control": 0.5}):
        err = assert_error(
            await admin(gw2, "POST", "/ab/weights", {"weights": bad}), 400, "invalid_request"
        )
        assert err["param"] == "weights"
    assert_error(await admin(gw2, "POST", "/ab/weights", {"w": {}}), 400, "invalid_request")
    assert gw2.state.registry.snapshot.experiments["ab"].weights == {
        "control": 0.8,
        "candidate": 0.2,
    }


async def test_weights_over_one_with_the_other_candidates_share_are_400(gw2: Gateway) -> None:
    variants = [
        {"name": "control", "model": "medical@1"},
        {"name": "a", "model": "medical@2"},
        {"name": "b", "model": "base"},
    ]
    await start(gw2, variants=variants, weights={"a": 0.6})
    resp = await admin(gw2, "POST", "/ab/weights", {"weights": {"b": 0.6}})
    assert_error(resp, 400, "invalid_request", param="weights")
    assert gw2.state.registry.snapshot.experiments["ab"].weights == {
        "control": 0.4,
        "a": 0.6,
        "b": 0.0,
    }
    ok = await admin(gw2, "POST", "/ab/weights", {"weights": {"a": 0.3, "b": 0.6}})
    assert ok.json()["weights"] == {"control": 0.1, "a": 0.3, "b": 0.6}


async def test_promote_moves_the_alias_to_the_winner(gw2: Gateway) -> None:
    await start(gw2)
    assert stable_version(gw2) == 1
    assert_error(await admin(gw2, "POST", "/ab/promote", {"variant": "x"}), 400, "invalid_request")
    resp = await admin(gw2, "POST", "/ab/promote", {"variant": "candidate"})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["status"] == "promoted"
    assert out["weights"] == {"candidate": 1.0}
    assert out["reason"] == "winner: candidate"
    assert stable_version(gw2) == 2
    # Everyone is now served by medical@2 without an experiment.
    after = await chat_as(gw2, "u1")
    assert after.headers["x-loraplex-adapter"] == "medical@2"
    assert "x-loraplex-experiment" not in after.headers
    assert engine_model(gw2) == served(gw2, "medical@2")
    header = await gw2.chat(model="legal", headers={"X-Loraplex-Adapter": "medical"})
    assert header.headers["x-loraplex-adapter"] == "medical@2"
    # An ended experiment takes no more changes, and a refused change moves no alias.
    assert_error(await admin(gw2, "POST", "/ab/abort"), 409, "invalid_state_transition")
    assert stable_version(gw2) == 2
    assert_error(
        await admin(gw2, "POST", "/ab/promote", {"variant": "control"}),
        409,
        "invalid_state_transition",
    )
    assert stable_version(gw2) == 2
    assert_error(await admin(gw2, "POST", "/ab/pause"), 409, "invalid_state_transition")
    assert_error(
        await admin(gw2, "POST", "/ab/weights", {"weights": {"candidate": 0.1}}),
        409,
        "invalid_state_transition",
    )


async def test_promote_defaults_to_the_largest_candidate(gw2: Gateway) -> None:
    await start(gw2, weights={"candidate": 0.1})
    resp = await admin(gw2, "POST", "/ab/promote", {})
    assert resp.json()["reason"] == "winner: candidate"
    assert stable_version(gw2) == 2


async def test_promoting_a_domain_target_moves_no_alias(gw2: Gateway) -> None:
    await start(gw2, target="domain:medical")
    resp = await admin(gw2, "POST", "/ab/promote", {"variant": "candidate"})
    assert resp.json()["status"] == "promoted"
    assert stable_version(gw2) == 1


async def test_abort_sends_everyone_back_to_control(gw2: Gateway) -> None:
    await start(gw2, weights={"candidate": 1.0})
    assert (await chat_as(gw2, "u1")).headers["x-loraplex-variant"] == "candidate"
    # Someone moved the alias to the candidate's version meanwhile: abort moves it back.
    moved = await gw2.client.put(
        "/admin/v1/adapters/medical/aliases/stable", json={"version": 2}, headers=ADMIN
    )
    assert moved.status_code == 200
    resp = await admin(gw2, "POST", "/ab/abort")
    assert resp.status_code == 200
    assert resp.json()["status"] == "aborted"
    assert resp.json()["weights"] == {"control": 1.0, "candidate": 0.0}
    assert stable_version(gw2) == 1
    after = await chat_as(gw2, "u1")
    assert after.headers["x-loraplex-adapter"] == "medical@1"
    assert "x-loraplex-variant" not in after.headers
    assert engine_model(gw2) == served(gw2, "medical@1")


async def test_delete_only_after_the_end(gw2: Gateway) -> None:
    await start(gw2)
    assert_error(await admin(gw2, "DELETE", "/ab"), 409, "experiment_active")
    await admin(gw2, "POST", "/ab/pause")
    assert_error(await admin(gw2, "DELETE", "/ab"), 409, "experiment_active")
    assert (await admin(gw2, "POST", "/ab/abort")).status_code == 200
    resp = await admin(gw2, "DELETE", "/ab")
    assert resp.status_code == 200
    assert resp.json()["status"] == "aborted"
    assert_error(await admin(gw2, "GET", "/ab"), 404, "experiment_not_found")
    assert_error(await admin(gw2, "DELETE", "/ab"), 404, "experiment_not_found")
    assert (await admin(gw2, "GET", "")).json()["data"] == []
    await start(gw2)  # the name is free again


ADMIN_CALLS: list[tuple[str, str, Any]] = [
    ("GET", "", None),
    ("POST", "", definition()),
    ("GET", "/ab", None),
    ("GET", "/ab/analysis", None),
    ("POST", "/ab/pause", None),
    ("POST", "/ab/resume", None),
    ("POST", "/ab/weights", {"weights": {"candidate": 0.1}}),
    ("POST", "/ab/promote", {}),
    ("POST", "/ab/abort", None),
    ("DELETE", "/ab", None),
]


async def test_tenant_keys_and_no_key_are_refused(gw2: Gateway) -> None:
    await start(gw2)
    for method, path, body in ADMIN_CALLS:
        url = f"/admin/v1/experiments{path}"
        for key in (ACME_KEY, BETA_KEY):
            resp = await gw2.client.request(method, url, json=body, headers=auth(key))
            assert resp.status_code == 403, (method, path)
            assert_error(resp, 403, "permission_denied")
        resp = await gw2.client.request(method, url, json=body)
        assert resp.status_code == 401, (method, path)
        assert_error(resp, 401, "invalid_api_key")
        wrong = await gw2.client.request(method, url, json=body, headers=auth("sk-wrong"))
        assert_error(wrong, 401, "invalid_api_key")
    record = gw2.state.registry.snapshot.experiments["ab"]
    assert (record.status, dict(record.weights)) == ("running", {"control": 0.5, "candidate": 0.5})


async def test_every_change_is_audited(gw2: Gateway) -> None:
    await start(gw2, weights={})
    steps = [
        ("POST", "/ab/pause", None),
        ("POST", "/ab/resume", None),
        ("POST", "/ab/weights", {"weights": {"candidate": 0.3}}),
        ("POST", "/ab/promote", {"variant": "candidate"}),
        ("DELETE", "/ab", None),
    ]
    for method, path, body in steps:
        resp = await gw2.client.request(
            method,
            f"/admin/v1/experiments{path}",
            json=body,
            headers={**ADMIN, "X-Loraplex-Actor": "alice"},
        )
        assert resp.status_code == 200, (path, resp.text)
    assert await audit_actions(gw2, EXP) == [
        "experiment.create",
        "experiment.paused",
        "experiment.running",
        "experiment.weights",
        "experiment.promoted",
        "experiment.delete",
    ]
    assert (await audit_actions(gw2, "medical@stable"))[-1] == "alias.set"
    data = (await gw2.client.get("/admin/v1/audit", headers=ADMIN)).json()["data"]
    promoted = next(e for e in data if e["action"] == "experiment.promoted")
    assert promoted["actor"].startswith("alice (admin:")
    assert promoted["before"]["status"] == "running"
    assert promoted["after"]["status"] == "promoted"
    assert promoted["request_id"]
    created = next(e for e in data if e["action"] == "experiment.create")
    assert created["after"]["definition"]["target"] == "medical"


# -- analysis ---------------------------------------------------------------------------------


async def test_analysis_from_the_gateways_own_counters(gw2: Gateway) -> None:
    await start(gw2, weights={"candidate": 0.5})
    for i in range(12):
        await chat_as(gw2, f"user-{i}")
    resp = await admin(gw2, "GET", "/ab/analysis")
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["experiment"] == "ab"
    assert 0 < out["window_s"] <= 600
    assert sum(out["requests"].values()) == 12
    verdict = out["verdicts"]["candidate"]
    assert verdict["decision"] == "insufficient"  # min_samples 200
    assert verdict["breaches"] == []
    assert set(out["verdicts"]) == {"candidate"}
    assert_error(await admin(gw2, "GET", "/nope/analysis"), 404, "experiment_not_found")


@dataclass
class CannedSource:
    """A MetricsSource answering chosen statistics (or failing)."""

    answer: dict[str, VariantStats] = field(default_factory=dict)
    fail: bool = False

    async def variant_stats(self, experiment: str, window_s: float) -> dict[str, VariantStats]:
        if self.fail:
            raise MetricsUnavailable("prometheus is down")
        return self.answer

    async def aclose(self) -> None:
        return None


async def test_analysis_shows_breaches_and_unavailable_metrics(
    gw2: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    await start(gw2)
    source = CannedSource({"control": stats(1000, 5), "candidate": stats(1000, 150)})
    assert gw2.state.controller is not None
    monkeypatch.setattr(gw2.state.controller, "source", source)
    resp = await admin(gw2, "GET", "/ab/analysis")
    assert resp.status_code == 200, resp.text
    verdict = resp.json()["verdicts"]["candidate"]
    assert verdict["decision"] == "breach"
    [breach] = verdict["breaches"]
    assert breach["guardrail"] == "error_rate"
    assert breach["observed"] == pytest.approx(0.145)
    assert breach["limit"] == 0.02
    assert breach["p_value"] < 0.01
    assert verdict["summary"]["candidate_error_rate"] == pytest.approx(0.15)
    # Judging is read-only: nothing was rolled back.
    assert gw2.state.registry.snapshot.experiments["ab"].status == "running"
    source.fail = True
    assert_error(await admin(gw2, "GET", "/ab/analysis"), 503, "metrics_unavailable")


# -- request path -----------------------------------------------------------------------------


async def test_variants_are_served_by_their_versions_and_sticky_per_user(gw2: Gateway) -> None:
    await start(gw2, weights={"candidate": 0.5})
    seen: dict[str, str] = {}
    for i in range(40):
        resp = await chat_as(gw2, f"user-{i}")
        assert resp.headers["x-loraplex-experiment"] == "ab"
        variant = resp.headers["x-loraplex-variant"]
        label = "medical@2" if variant == "candidate" else "medical@1"
        assert resp.headers["x-loraplex-adapter"] == label
        assert engine_model(gw2) == served(gw2, label)
        assert resp.headers["x-request-id"]
        seen[f"user-{i}"] = variant
    assert set(seen.values()) == {"control", "candidate"}
    for user, variant in list(seen.items())[:10]:
        for _ in range(2):
            assert (await chat_as(gw2, user)).headers["x-loraplex-variant"] == variant
    # Without X-Loraplex-User the API key is the user: one key, one variant.
    by_key = {(await gw2.chat(model="medical")).headers["x-loraplex-variant"] for _ in range(4)}
    assert len(by_key) == 1


async def test_target_named_by_alias_header_and_completions(gw2: Gateway) -> None:
    await start(gw2, weights={"candidate": 1.0})
    resp = await gw2.chat(model="legal", headers={"X-Loraplex-Adapter": "medical@stable"})
    assert resp.headers["x-loraplex-variant"] == "candidate"
    assert engine_model(gw2) == served(gw2, "medical@2")
    comp = await gw2.client.post(
        "/v1/completions", json={"model": "medical", "prompt": "hi"}, headers=auth(ACME_KEY)
    )
    assert comp.status_code == 200
    assert comp.headers["x-loraplex-variant"] == "candidate"
    assert gw2.engine.forwarded[-1].path == "/v1/completions"
    assert engine_model(gw2) == served(gw2, "medical@2")


async def test_a_pinned_version_is_not_in_the_experiment(gw2: Gateway) -> None:
    await start(gw2, weights={"candidate": 1.0})
    for pinned in ("medical@1", "medical@2"):
        resp = await chat_as(gw2, "u1", model=pinned)
        assert resp.headers["x-loraplex-adapter"] == pinned
        assert "x-loraplex-experiment" not in resp.headers
        assert "x-loraplex-variant" not in resp.headers
        assert engine_model(gw2) == served(gw2, pinned)
    other_alias = await chat_as(gw2, "u1", model="legal")
    assert "x-loraplex-experiment" not in other_alias.headers
    assert (
        gw2.gauge(
            "loraplex_experiment_requests_total", experiment="ab", variant="candidate", outcome="ok"
        )
        == 0
    )


async def test_tenant_not_entitled_to_a_variant_is_served_as_it_asked(gw2: Gateway) -> None:
    # nodefault may use medical and base, not legal.
    variants = [
        {"name": "control", "model": "medical@1"},
        {"name": "candidate", "model": "legal@1"},
    ]
    await start(gw2, variants=variants, weights={"candidate": 1.0})
    acme = await chat_as(gw2, "u1")
    assert acme.headers["x-loraplex-variant"] == "candidate"
    assert acme.headers["x-loraplex-adapter"] == "legal@1"
    assert engine_model(gw2) == served(gw2, "legal@1")
    other = await chat_as(gw2, "u1", key=NODEFAULT_KEY)
    assert other.headers["x-loraplex-adapter"] == "medical@1"
    assert "x-loraplex-experiment" not in other.headers
    assert "x-loraplex-variant" not in other.headers
    assert engine_model(gw2) == served(gw2, "medical@1")
    # beta may use neither: the usual 404, the experiment changes nothing.
    resp = await gw2.chat(key=BETA_KEY, model="medical")
    assert_error(resp, 404, "model_not_found")
    assert "x-loraplex-experiment" not in resp.headers
    total = gw2.gauge(
        "loraplex_experiment_requests_total", experiment="ab", variant="candidate", outcome="ok"
    )
    assert total == 1


async def test_experiment_restricted_to_some_tenants(gw2: Gateway) -> None:
    await start(gw2, weights={"candidate": 1.0}, tenants=["nodefault"])
    assert "x-loraplex-experiment" not in (await chat_as(gw2, "u1")).headers
    inside = await chat_as(gw2, "u1", key=NODEFAULT_KEY)
    assert inside.headers["x-loraplex-variant"] == "candidate"


async def test_per_variant_metrics(gw2: Gateway) -> None:
    await start(gw2, weights={"candidate": 0.5})
    counts = {"control": 0, "candidate": 0}
    for i in range(10):
        counts[(await chat_as(gw2, f"user-{i}")).headers["x-loraplex-variant"]] += 1
    streamed = await chat_as(gw2, "user-0", stream=True)
    assert streamed.text.endswith("data: [DONE]\n\n")
    stream_variant = streamed.headers["x-loraplex-variant"]
    counts[stream_variant] += 1
    # An engine failure is the variant's error (user-0 is sticky on stream_variant).
    gw2.engine.answers.append(Answer(500, b'{"error": "boom"}'))
    failed = await gw2.chat(model="medical", headers={"X-Loraplex-User": "user-0"})
    assert_error(failed, 502, "upstream_error")
    # A client error (bad body) never reaches experiment assignment.
    bad = await gw2.chat(model="medical", temperature="hot")
    assert bad.status_code == 400

    text = await gw2.metrics()
    for variant, n in counts.items():
        labels = {"experiment": "ab", "variant": variant}
        assert metric(text, "loraplex_experiment_requests_total", outcome="ok", **labels) == n
        assert metric(text, "loraplex_experiment_request_duration_seconds_count", **labels) == (
            n + (variant == stream_variant)
        )
        assert metric(text, "loraplex_experiment_completion_tokens_sum", **labels) == 3 * n
        assert metric(text, "loraplex_experiment_weight", **labels) == 0.5
    errors = {"experiment": "ab", "variant": stream_variant, "outcome": "error"}
    assert metric(text, "loraplex_experiment_requests_total", **errors) == 1
    assert metric(text, "loraplex_experiment_requests_total", outcome="client_error") == 0
    ttft = metric(text, "loraplex_experiment_ttft_seconds_count", experiment="ab")
    assert ttft == 1
    assert metric(text, "loraplex_experiment_status", experiment="ab", status="running") == 1
    assert metric(text, "loraplex_experiment_status", experiment="ab", status="paused") == 0


async def test_status_and_weight_gauges_follow_the_record(gw2: Gateway) -> None:
    await start(gw2, weights={"candidate": 0.5})
    await chat_as(gw2, "u1")
    await admin(gw2, "POST", "/ab/abort")
    await chat_as(gw2, "u1")  # the request path rebuilds its view (and the gauges)
    labels = {"experiment": "ab"}
    assert gw2.gauge("loraplex_experiment_status", status="aborted", **labels) == 1
    assert gw2.gauge("loraplex_experiment_status", status="running", **labels) == 0
    assert gw2.gauge("loraplex_experiment_weight", variant="candidate", **labels) == 0
    await admin(gw2, "DELETE", "/ab")
    await chat_as(gw2, "u1")
    sample = gw2.state.metrics.registry.get_sample_value
    assert sample("loraplex_experiment_weight", {"variant": "candidate", **labels}) is None
    assert sample("loraplex_experiment_status", {"status": "aborted", **labels}) is None


# -- shadow -----------------------------------------------------------------------------------


def shadow_count(gw: Gateway, outcome: str) -> float:
    return gw.gauge(
        "loraplex_experiment_shadow_requests_total",
        experiment="ab",
        variant="candidate",
        outcome=outcome,
    )


async def test_shadow_copy_goes_to_the_candidate_and_is_thrown_away(gw2: Gateway) -> None:
    await start(gw2, weights={}, shadow={"variant": "candidate", "share": 1.0})
    resp = await chat_as(gw2, "u1", stream=True, stream_options={"include_usage": False})
    assert resp.status_code == 200
    assert resp.headers["x-loraplex-variant"] == "control"
    assert resp.headers["x-loraplex-adapter"] == "medical@1"
    assert served(gw2, "medical@2") not in resp.text
    await wait_until(lambda: shadow_count(gw2, "ok") == 1, what="shadow copy counted")
    real, copy = gw2.engine.forwarded
    assert real.stream
    assert real.body["model"] == served(gw2, "medical@1")
    assert not copy.stream
    assert copy.path == real.path
    assert copy.body["model"] == served(gw2, "medical@2")
    assert "stream" not in copy.body
    assert "stream_options" not in copy.body
    assert copy.body["messages"] == real.body["messages"]
    # The copy lands in the candidate's live series (the guardrails judge it).
    labels = {"experiment": "ab", "variant": "candidate"}
    assert gw2.gauge("loraplex_experiment_requests_total", outcome="ok", **labels) == 1
    assert gw2.gauge("loraplex_experiment_completion_tokens_sum", **labels) == 3
    assert gw2.state.shadow.in_flight == 0
    assert gw2.state.engines.in_flight(served(gw2, "medical@2")) == 0


async def test_shadow_at_capacity_is_dropped(gw2: Gateway) -> None:
    await start(gw2, weights={}, shadow={"variant": "candidate", "share": 1.0})
    gw2.state.shadow.max_concurrency = 0
    resp = await chat_as(gw2, "u1")
    assert resp.headers["x-loraplex-variant"] == "control"
    assert shadow_count(gw2, "dropped") == 1
    assert shadow_count(gw2, "ok") == 0
    await asyncio.sleep(0)
    assert len(gw2.engine.forwarded) == 1


async def test_a_failing_shadow_copy_never_affects_the_answer(
    gw2: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    await start(gw2, weights={}, shadow={"variant": "candidate", "share": 1.0})
    candidate = served(gw2, "medical@2")
    real_post = gw2.engine.post

    async def post(path: str, payload: bytes) -> Any:
        if candidate.encode() in payload:
            raise RuntimeError("candidate crashed")
        return await real_post(path, payload)

    monkeypatch.setattr(gw2.engine, "post", post)
    for i in range(3):
        resp = await chat_as(gw2, f"u{i}")
        assert resp.json()["choices"][0]["message"]["content"] == "hello"
        assert resp.headers["x-loraplex-variant"] == "control"
    await wait_until(lambda: shadow_count(gw2, "error") == 3, what="failed copies counted")
    labels = {"experiment": "ab", "variant": "candidate"}
    assert gw2.gauge("loraplex_experiment_requests_total", outcome="error", **labels) == 3
    assert gw2.gauge("loraplex_experiment_requests_total", outcome="ok", **labels) == 0
    control = {"experiment": "ab", "variant": "control", "outcome": "ok"}
    assert gw2.gauge("loraplex_experiment_requests_total", **control) == 3
    assert gw2.state.shadow.in_flight == 0


async def test_no_shadow_copy_of_a_model_the_tenant_may_not_use(gw2: Gateway) -> None:
    variants = [
        {"name": "control", "model": "medical@1"},
        {"name": "candidate", "model": "legal@1"},
    ]
    await start(gw2, variants=variants, weights={}, shadow={"variant": "candidate", "share": 1.0})
    resp = await chat_as(gw2, "u1", key=NODEFAULT_KEY)
    assert resp.headers["x-loraplex-variant"] == "control"
    await asyncio.sleep(0.01)
    assert len(gw2.engine.forwarded) == 1
    assert shadow_count(gw2, "ok") + shadow_count(gw2, "dropped") == 0


# -- domain targets (auto routing) ------------------------------------------------------------

MEDICAL = "I have had a fever and a sore throat for three days, should I see a doctor?"
LEGAL = "Can my landlord keep my security deposit without giving a reason?"


@pytest.fixture
async def routed(
    config: Config, engine: FakeEngine, bootstrapped: Bootstrapped, tmp_path: Path
) -> AsyncIterator[Gateway]:
    """The `gw2` gateway with auto routing on (default routes and model)."""
    router = {"routes_file": DEFAULT_ROUTES, "artefact": save_default_tfidf(tmp_path)}
    shutil.copyfile(bootstrapped.db, config.root / "registry.db")
    engine.served |= bootstrapped.served
    async with running_gateway(config.settings(adapters_file=None, router=router), engine) as gw:
        await add_medical_v2(gw, config)
        yield gw


async def test_domain_target_takes_auto_routed_requests_only(routed: Gateway) -> None:
    await start(routed, target="domain:medical", weights={"candidate": 1.0})
    asked = [{"role": "user", "content": MEDICAL}]
    auto = await routed.chat(model="auto", messages=asked)
    assert auto.status_code == 200
    assert auto.headers["x-loraplex-domain"] == "medical"
    assert auto.headers["x-loraplex-variant"] == "candidate"
    assert auto.headers["x-loraplex-adapter"] == "medical@2"
    assert engine_model(routed) == served(routed, "medical@2")
    # Naming the adapter is not the domain target; another domain is not either.
    named = await routed.chat(model="medical", messages=asked)
    assert named.headers["x-loraplex-adapter"] == "medical@1"
    assert "x-loraplex-experiment" not in named.headers
    legal = await routed.chat(model="auto", messages=[{"role": "user", "content": LEGAL}])
    assert legal.headers["x-loraplex-adapter"] == "legal@1"
    assert "x-loraplex-experiment" not in legal.headers


async def test_a_request_for_the_tenant_default_is_in_the_default_adapters_experiment(
    gw: Gateway, config: Config
) -> None:
    """acme's default is `legal` (its `stable` alias): no model, or "default", is that target."""
    resp = await register(gw, "legal", new_adapter(config, "legal", 98))
    assert resp.status_code == 201, resp.text
    await start(
        gw,
        "default-model",
        target="legal",
        variants=[
            {"name": "control", "model": "legal@1"},
            {"name": "candidate", "model": "legal@2"},
        ],
        weights={"candidate": 1.0},
    )
    bodies: list[dict[str, Any]] = [{}, {"model": "default"}]
    for body in bodies:
        r = await gw.chat(**body)
        assert r.status_code == 200, r.text
        assert r.headers["x-loraplex-variant"] == "candidate"
        assert r.headers["x-loraplex-adapter"] == "legal@2"
