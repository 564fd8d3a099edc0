"""Experiment definitions and sticky assignment (router.experiments, no I/O)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from router.experiments import (
    ExperimentBook,
    ExperimentSpec,
    LiveExperiment,
    parse_target,
    request_target_key,
    unit_hash,
)


def spec(**kw: Any) -> ExperimentSpec:
    fields: dict[str, Any] = {
        "target": "support@stable",
        "variants": [
            {"name": "control", "model": "support@3"},
            {"name": "v4", "model": "support@4"},
        ],
        "weights": {"v4": 0.1},
    }
    fields.update(kw)
    return ExperimentSpec.model_validate(fields)


def live(s: ExperimentSpec, weights: dict[str, float] | None = None) -> LiveExperiment:
    return LiveExperiment.build("exp", s, "running", weights or s.initial_weights())


def test_same_user_always_gets_the_same_variant() -> None:
    exp = live(spec(weights={"v4": 0.5}))
    for user in (f"user-{i}" for i in range(200)):
        first = exp.assign("acme", user, "req-a").variant
        assert all(exp.assign("acme", user, f"req-{j}").variant == first for j in range(5))
    # Another replica (a new object from the same record) agrees.
    again = live(spec(weights={"v4": 0.5}))
    assert all(
        again.assign("acme", f"u{i}", "r").variant == exp.assign("acme", f"u{i}", "r").variant
        for i in range(500)
    )


@pytest.mark.parametrize("share", [0.1, 0.5, 0.9])
def test_split_matches_the_weights_within_statistical_tolerance(share: float) -> None:
    exp = live(spec(weights={"v4": share}))
    n = 2000
    hits = sum(exp.assign("acme", f"user-{i}", "r").variant == "v4" for i in range(n))
    sd = math.sqrt(n * share * (1 - share))
    assert abs(hits - n * share) < 4 * sd, (hits, n * share)


def test_raising_the_share_only_moves_users_from_control_to_candidate() -> None:
    s = spec(ramp=[0.01, 0.1, 0.5], weights={})
    users = [f"user-{i}" for i in range(3000)]
    before = {u: live(s).assign("acme", u, "r").variant for u in users}
    after = {u: live(s, {"control": 0.5, "v4": 0.5}).assign("acme", u, "r").variant for u in users}
    assert all(after[u] == "v4" for u in users if before[u] == "v4")
    assert sum(v == "v4" for v in before.values()) < sum(v == "v4" for v in after.values())
    rolled_back = live(s, {"control": 1.0, "v4": 0.0})
    assert {rolled_back.assign("acme", u, "r").variant for u in users} == {"control"}


def test_assignment_depends_on_experiment_and_tenant() -> None:
    a = [unit_hash("exp1", "acme", f"u{i}") < 0.5 for i in range(400)]
    b = [unit_hash("exp2", "acme", f"u{i}") < 0.5 for i in range(400)]
    c = [unit_hash("exp1", "beta", f"u{i}") < 0.5 for i in range(400)]
    assert a != b
    assert a != c


def test_shadow_mirrors_a_share_of_requests_without_changing_the_live_variant() -> None:
    exp = live(spec(weights={}, shadow={"variant": "v4", "share": 0.25}))
    picks = [exp.assign("acme", "same-user", f"req-{i}") for i in range(4000)]
    assert {p.variant for p in picks} == {"control"}
    mirrored = [p for p in picks if p.shadow_variant == "v4"]
    assert all(p.shadow_model == "support@4" for p in mirrored)
    assert abs(len(mirrored) / 4000 - 0.25) < 0.03


def test_targets_and_request_keys() -> None:
    assert parse_target("support") == parse_target("support@stable")
    assert parse_target("domain:medical") is not None
    assert parse_target("support@3") is None  # a fixed version moves nobody's traffic
    assert parse_target("domain:") is None
    assert request_target_key("support", None) == "support@stable"
    assert request_target_key("support@canary", None) == "support@canary"
    assert request_target_key("support@3", None) is None
    assert request_target_key("support", "medical") == "domain:medical"


def test_book_finds_active_experiments_by_target_and_tenant_scope() -> None:
    scoped = LiveExperiment.build("s", spec(tenants=["acme"]), "running", {"v4": 1.0})
    book = ExperimentBook([scoped])
    assert book.find("support", None, "acme") is scoped
    assert book.find("support@stable", None, "acme") is scoped
    assert book.find("support", None, "beta") is None
    assert book.find("support@4", None, "acme") is None
    ended = LiveExperiment.build("e", spec(), "rolled_back", {"control": 1.0})
    assert not ExperimentBook([ended])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"variants": [{"name": "a", "model": "x"}]}, "at least 2"),
        ({"target": "support@3"}, "target must be"),
        ({"weights": {"nope": 0.1}}, "unknown variants"),
        ({"weights": {"v4": 1.5}}, "within [0, 1]"),
        ({"ramp": [0.5, 0.1]}, "ramp steps"),
        ({"shadow": {"variant": "control", "share": 0.1}}, "candidate variant"),
        (
            {
                "variants": [
                    {"name": "a", "model": "x"},
                    {"name": "a", "model": "y"},
                ]
            },
            "unique",
        ),
    ],
)
def test_bad_definitions_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        spec(**change)


def test_initial_weights_give_the_control_the_rest() -> None:
    assert spec(weights={"v4": 0.25}).initial_weights() == {"control": 0.75, "v4": 0.25}
    assert spec(ramp=[0.01, 0.5], weights={}).initial_weights() == {"control": 0.99, "v4": 0.01}
