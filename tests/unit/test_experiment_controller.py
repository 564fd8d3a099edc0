"""The experiment controller, one round at a time: `review(record, now=...)` over a registry of
a running gateway, fed chosen statistics by a fake MetricsSource (rollback after confirmed
breaches, nothing on missing data, ramp steps, auto-promotion); the lease between two
controllers; and LocalSource reading real requests served through the gateway."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import pytest

from adapters.registry import SYSTEM, ExperimentRecord, InvalidTransition
from server.experiments.analysis import VariantStats
from server.experiments.controller import LEASE, ExperimentController
from server.experiments.sources import LocalSource, MetricsUnavailable
from tests.unit.conftest import Config
from tests.unit.experiment_helpers import (
    ADMIN,
    add_medical_v2,
    admin,
    audit_actions,
    stable_version,
    start,
    stats,
)
from tests.unit.helpers import ACME_KEY, Gateway, wait_until

HEALTHY = {"control": stats(1000, 5), "candidate": stats(1000, 6)}
BREACH = {"control": stats(1000, 5), "candidate": stats(1000, 150)}
FEW = {"control": stats(50, 0), "candidate": stats(50, 40)}  # awful, but under min_samples
EXP = "experiment:ab"


@dataclass
class FakeSource:
    """A MetricsSource answering `answer` (or failing); records what it was asked."""

    answer: dict[str, VariantStats] = field(default_factory=dict)
    fail: bool = False
    calls: list[tuple[str, float]] = field(default_factory=list)
    closed: bool = False

    async def variant_stats(self, experiment: str, window_s: float) -> dict[str, VariantStats]:
        self.calls.append((experiment, window_s))
        if self.fail:
            raise MetricsUnavailable("prometheus is down")
        return self.answer

    async def aclose(self) -> None:
        self.closed = True


def controller(gw: Gateway, source: FakeSource, interval_s: float = 60.0) -> ExperimentController:
    return ExperimentController(gw.state.registry, source, gw.state.metrics, interval_s, 30.0)


def record(gw: Gateway, name: str = "ab") -> ExperimentRecord:
    return gw.state.registry.snapshot.experiments[name]


@pytest.fixture
async def gw2(gw: Gateway, config: Config) -> Gateway:
    await add_medical_v2(gw, config)
    return gw


def rollbacks(gw: Gateway, guardrail: str = "error_rate") -> float:
    return gw.gauge("loraplex_experiment_rollbacks_total", experiment="ab", guardrail=guardrail)


async def test_insufficient_samples_change_nothing(gw2: Gateway) -> None:
    await start(gw2)
    before = record(gw2)
    generation = gw2.state.registry.snapshot.generation
    ctl = controller(gw2, FakeSource(FEW))
    for _ in range(3):
        result = await ctl.review(record(gw2), now=before.step_started_at + 100)
        assert result.action == "insufficient"
        assert result.verdicts["candidate"].decision == "insufficient"
    assert record(gw2) == before
    assert gw2.state.registry.snapshot.generation == generation


async def test_window_is_the_analysis_window_but_not_before_the_step_started(
    gw2: Gateway,
) -> None:
    await start(gw2, analysis_window_s=300)
    source = FakeSource(HEALTHY)
    ctl = controller(gw2, source)
    t0 = record(gw2).step_started_at
    await ctl.review(record(gw2), now=t0 + 40)
    await ctl.review(record(gw2), now=t0 + 4000)
    await ctl.review(record(gw2), now=t0 - 5)  # clock skew: at least one second
    assert source.calls == [("ab", 40.0), ("ab", 300.0), ("ab", 1.0)]


async def test_breach_is_confirmed_then_rolled_back(gw2: Gateway) -> None:
    await start(gw2, weights={"candidate": 1.0})
    # The alias had moved to the candidate's version: the rollback moves it back.
    await gw2.state.registry.set_alias("medical", "stable", 2, SYSTEM)
    ctl = controller(gw2, FakeSource(BREACH))
    t0 = record(gw2).step_started_at
    first = await ctl.review(record(gw2), now=t0 + 60)
    assert first.action == "breach_pending"
    assert first.verdicts["candidate"].decision == "breach"
    assert record(gw2).status == "running"
    assert record(gw2).weights == {"control": 0.0, "candidate": 1.0}
    assert stable_version(gw2) == 2
    assert rollbacks(gw2) == 0

    second = await ctl.review(record(gw2), now=t0 + 75)
    assert second.action == "rollback"
    after = record(gw2)
    assert after.status == "rolled_back"
    assert after.weights == {"control": 1.0, "candidate": 0.0}
    assert after.reason is not None
    assert after.reason.startswith("candidate: error_rate: ")
    assert stable_version(gw2) == 1
    assert rollbacks(gw2) == 1
    actions = await audit_actions(gw2, EXP)
    assert actions[-2:] == ["experiment.rollback", "experiment.analysis"]
    data = (await gw2.client.get("/admin/v1/audit", headers=ADMIN)).json()["data"]
    analysis = next(e for e in data if e["action"] == "experiment.analysis")
    assert analysis["actor"] == "controller"
    assert analysis["after"]["variant"] == "candidate"
    assert analysis["after"]["decision"] == "breach"
    assert analysis["after"]["summary"]["candidate_error_rate"] == pytest.approx(0.15)
    alias = next(e for e in data if e["action"] == "alias.set" and e["actor"] == "system")
    assert (alias["before"], alias["after"]) == ({"version": 2}, {"version": 1})
    # Users are back on the control, and the ended experiment is no longer reviewed.
    resp = await gw2.chat(model="medical")
    assert resp.headers["x-loraplex-adapter"] == "medical@1"
    assert "x-loraplex-experiment" not in resp.headers
    assert await ctl.review_all() == []


async def test_a_healthy_round_resets_the_breach_count(gw2: Gateway) -> None:
    await start(gw2, guardrails={"confirm_rounds": 2})
    source = FakeSource(BREACH)
    ctl = controller(gw2, source)
    t0 = record(gw2).step_started_at
    actions = []
    for answer in (BREACH, HEALTHY, BREACH, FEW, BREACH):
        source.answer = answer
        actions.append((await ctl.review(record(gw2), now=t0 + 60)).action)
    assert actions == ["breach_pending", "none", "breach_pending", "insufficient", "breach_pending"]
    assert record(gw2).status == "running"
    source.answer = BREACH
    assert (await ctl.review(record(gw2), now=t0 + 60)).action == "rollback"


async def test_a_recreated_experiment_starts_without_the_old_ones_strikes(gw2: Gateway) -> None:
    await start(gw2)
    ctl = controller(gw2, FakeSource(BREACH))
    t0 = record(gw2).step_started_at
    assert (await ctl.review(record(gw2), now=t0 + 60)).action == "breach_pending"
    assert (await admin(gw2, "POST", "/ab/abort")).status_code == 200
    assert (await admin(gw2, "DELETE", "/ab")).status_code == 200
    await start(gw2)
    first = await ctl.review(record(gw2), now=record(gw2).step_started_at + 60)
    assert first.action == "breach_pending"
    assert record(gw2).status == "running"


async def test_a_pause_breaks_the_run_of_breached_rounds(gw2: Gateway) -> None:
    await start(gw2)
    ctl = controller(gw2, FakeSource(BREACH))
    assert [r.action for r in await ctl.review_all()] == ["breach_pending"]
    assert (await admin(gw2, "POST", "/ab/pause")).status_code == 200
    assert await ctl.review_all() == []  # paused: not judged
    assert (await admin(gw2, "POST", "/ab/resume")).status_code == 200
    assert [r.action for r in await ctl.review_all()] == ["breach_pending"]
    assert [r.action for r in await ctl.review_all()] == ["rollback"]


async def test_one_round_suffices_when_configured(gw2: Gateway) -> None:
    await start(gw2, guardrails={"confirm_rounds": 1})
    ctl = controller(gw2, FakeSource(BREACH))
    result = await ctl.review(record(gw2), now=record(gw2).step_started_at + 60)
    assert result.action == "rollback"
    assert record(gw2).status == "rolled_back"
    assert stable_version(gw2) == 1  # it never moved: nothing to move back


async def test_rollback_of_an_experiment_paused_meanwhile_changes_nothing(gw2: Gateway) -> None:
    await start(gw2, guardrails={"confirm_rounds": 1})
    stale = record(gw2)
    await gw2.state.registry.set_alias("medical", "stable", 2, SYSTEM)
    assert (await admin(gw2, "POST", "/ab/pause")).status_code == 200
    ctl = controller(gw2, FakeSource(BREACH))
    with pytest.raises(InvalidTransition):
        await ctl.review(stale, now=stale.step_started_at + 60)
    assert record(gw2).status == "paused"
    assert stable_version(gw2) == 2
    assert rollbacks(gw2) == 0


async def test_metrics_unavailable_change_nothing(gw2: Gateway) -> None:
    await start(gw2, guardrails={"confirm_rounds": 1})
    before = record(gw2)
    ctl = controller(gw2, FakeSource(BREACH, fail=True))
    for _ in range(3):
        result = await ctl.review(record(gw2), now=before.step_started_at + 60)
        assert (result.action, result.verdicts) == ("unavailable", {})
    assert record(gw2) == before
    assert rollbacks(gw2) == 0


async def test_candidates_at_weight_zero_are_not_judged_unless_shadowed(gw2: Gateway) -> None:
    await start(gw2, weights={}, guardrails={"confirm_rounds": 1})
    ctl = controller(gw2, FakeSource(BREACH))
    result = await ctl.review(record(gw2), now=record(gw2).step_started_at + 60)
    assert (result.action, result.verdicts) == ("none", {})
    assert record(gw2).status == "running"


async def test_a_shadowed_candidate_is_judged_and_rolled_back(gw2: Gateway) -> None:
    shadow = {"variant": "candidate", "share": 0.5}
    await start(gw2, weights={}, shadow=shadow, guardrails={"confirm_rounds": 1})
    ctl = controller(gw2, FakeSource(BREACH))
    result = await ctl.review(record(gw2), now=record(gw2).step_started_at + 60)
    assert result.action == "rollback"
    assert record(gw2).status == "rolled_back"


async def test_healthy_ramp_steps_then_auto_promotes(gw2: Gateway) -> None:
    await start(gw2, weights={}, ramp=[0.1, 0.5], ramp_interval_s=60, auto_promote=True)
    ctl = controller(gw2, FakeSource(HEALTHY))
    t0 = record(gw2).step_started_at
    assert record(gw2).weights == {"control": 0.9, "candidate": 0.1}
    early = await ctl.review(record(gw2), now=t0 + 59)
    assert early.action == "none"
    assert early.verdicts["candidate"].decision == "healthy"
    assert record(gw2).ramp_step == 0

    ramp = await ctl.review(record(gw2), now=t0 + 61)
    assert ramp.action == "ramp"
    after = record(gw2)
    assert after.weights == {"control": 0.5, "candidate": 0.5}
    assert (after.ramp_step, after.step_started_at) == (1, t0 + 61)
    assert after.status == "running"
    assert after.reason == "ramp step 1: 50% (guardrails healthy)"
    # The interval counts from the new step.
    assert (await ctl.review(record(gw2), now=t0 + 100)).action == "none"
    assert stable_version(gw2) == 1

    done = await ctl.review(record(gw2), now=t0 + 122)
    assert done.action == "promote"
    final = record(gw2)
    assert final.status == "promoted"
    assert final.weights == {"candidate": 1.0}
    assert stable_version(gw2) == 2
    assert (await audit_actions(gw2, EXP))[-2:] == ["experiment.ramp", "experiment.promoted"]
    resp = await gw2.chat(model="medical")
    assert resp.headers["x-loraplex-adapter"] == "medical@2"


async def test_last_step_without_auto_promote_waits_for_an_operator(gw2: Gateway) -> None:
    await start(gw2, weights={}, ramp=[0.2], ramp_interval_s=10)
    ctl = controller(gw2, FakeSource(HEALTHY))
    t0 = record(gw2).step_started_at
    for later in (11, 100, 1000):
        assert (await ctl.review(record(gw2), now=t0 + later)).action == "none"
    assert record(gw2).status == "running"
    assert record(gw2).weights == {"control": 0.8, "candidate": 0.2}


async def test_no_ramp_step_without_a_healthy_verdict(gw2: Gateway) -> None:
    await start(gw2, weights={}, ramp=[0.1, 0.5], ramp_interval_s=10)
    ctl = controller(gw2, FakeSource(FEW))
    assert (await ctl.review(record(gw2), now=record(gw2).step_started_at + 60)).action == (
        "insufficient"
    )
    assert record(gw2).ramp_step == 0


async def test_review_all_skips_paused_experiments(gw2: Gateway) -> None:
    await start(gw2)
    await start(
        gw2,
        "other",
        target="legal",
        variants=[{"name": "control", "model": "legal@1"}, {"name": "candidate", "model": "base"}],
    )
    await admin(gw2, "POST", "/other/pause")
    source = FakeSource(FEW)
    results = await controller(gw2, source).review_all()
    assert [r.experiment for r in results] == ["ab"]
    assert [c[0] for c in source.calls] == ["ab"]


# -- the lease --------------------------------------------------------------------------------


async def test_only_one_controller_holds_the_lease(gw: Gateway) -> None:
    registry = gw.state.registry
    one, two = controller(gw, FakeSource()), controller(gw, FakeSource())
    assert one.holder != two.holder
    assert await registry.acquire_lease(LEASE, one.holder, 30)
    assert not await registry.acquire_lease(LEASE, two.holder, 30)
    assert await registry.acquire_lease(LEASE, one.holder, 30)  # renewal
    assert not await registry.acquire_lease(LEASE, two.holder, 30)
    await one.close()  # a clean stop hands the lease over at once
    assert await registry.acquire_lease(LEASE, two.holder, 30)
    assert not await registry.acquire_lease(LEASE, one.holder, 30)


async def test_an_expired_lease_is_taken_over(gw: Gateway) -> None:
    registry = gw.state.registry
    # A TTL long enough that a loaded machine cannot let it lapse before the second call.
    assert await registry.acquire_lease(LEASE, "dead-replica", 1.0)
    assert not await registry.acquire_lease(LEASE, "successor", 30)
    await asyncio.sleep(1.05)
    assert await registry.acquire_lease(LEASE, "successor", 30)


async def test_running_controllers_only_the_leader_reviews(gw2: Gateway) -> None:
    await start(gw2)
    sources = [FakeSource(FEW), FakeSource(FEW)]
    ctls = [controller(gw2, s, interval_s=0.01) for s in sources]
    tasks = [asyncio.create_task(c.run()) for c in ctls]
    try:
        await wait_until(lambda: any(len(s.calls) >= 3 for s in sources), what="three rounds")
        leader = 0 if sources[0].calls else 1
        assert sources[1 - leader].calls == []
        assert [r.action for r in ctls[leader].last_round] == ["insufficient"]
        # The leader stops cleanly: the other takes over at its next round.
        tasks[leader].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[leader]
        await ctls[leader].close()
        assert sources[leader].closed
        await wait_until(lambda: bool(sources[1 - leader].calls), what="the successor's round")
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_failing_round_does_not_stop_the_loop(
    gw2: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    await start(gw2)
    source = FakeSource(FEW)
    ctl = controller(gw2, source, interval_s=0.01)
    calls = 0

    async def flaky_review(record: ExperimentRecord, now: float | None = None) -> object:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug in a round")

    monkeypatch.setattr(ctl, "review", flaky_review)
    task = asyncio.create_task(ctl.run())
    try:
        await wait_until(lambda: calls >= 2, what="a second round after a failed one")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ctl.close()


# -- LocalSource over real requests -------------------------------------------------------------


async def test_local_source_sees_requests_served_through_the_gateway(gw2: Gateway) -> None:
    await start(gw2, weights={"candidate": 0.5})
    source = LocalSource(gw2.state.metrics)
    assert await source.variant_stats("ab", 60) == {}
    counts = {"control": 0, "candidate": 0}
    for i in range(16):
        resp = await gw2.chat(
            key=ACME_KEY, model="medical", headers={"X-Loraplex-User": f"user-{i}"}
        )
        counts[resp.headers["x-loraplex-variant"]] += 1
    assert min(counts.values()) > 0
    seen = await source.variant_stats("ab", 60)
    assert set(seen) == {"control", "candidate"}
    for variant, n in counts.items():
        s = seen[variant]
        assert (s.requests, s.errors) == (n, 0)
        assert s.latency.total == n
        assert s.completion_tokens.total == n
        assert s.ttft.total == 0
        assert s.completion_tokens.quantile(0.5) <= 4  # the fake engine answers 3 tokens
    # The controller judges the same numbers: too few requests for a verdict.
    result = await controller(gw2, FakeSource(seen)).review(record(gw2))
    assert result.action == "insufficient"
    assert result.verdicts["candidate"].summary["control_requests"] == counts["control"]
