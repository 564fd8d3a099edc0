"""Experiment state changes (create, ramp, pause, promote, abort, rollback) and the controller
loop that judges running experiments against their guardrails.

Every change is one registry transaction with its audit entry, guarded by the status it
expects, so an operator and a controller (or two replicas' controllers during a lease
hand-over) can never both apply a change. The loop runs in every replica but only the holder of
the `experiment-controller` lease (a registry row with an expiry) acts; the others keep
renewing their claim so one of them takes over within a lease TTL when the leader dies.

A round, per running experiment: read each variant's statistics over the current analysis
window (from Prometheus via PromQL when configured, else this process's counters), compare each
candidate with the control (`analysis.evaluate`), then
- a breach → candidate weights 0, the target alias moved back to the control's version if it
  had moved, status `rolled_back`, audit entry + metric + log event;
- healthy over a full ramp interval → the next ramp step (or, after the last one, promotion
  when `auto_promote` is set);
- not enough samples, or metrics unavailable → nothing (never roll back on missing data).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import aiohttp

from adapters.registry import SYSTEM, Actor, ExperimentRecord, InvalidTransition, Registry
from adapters.types import AdapterRef
from router.experiments import (
    ACTIVE,
    ExperimentSpec,
    parse_target,
    with_control,
)
from server.errors import BadRequest, Conflict
from server.experiments.analysis import Guardrails, VariantStats, Verdict, evaluate
from server.experiments.sources import (
    LocalSource,
    MetricsSource,
    MetricsUnavailable,
    PromQLSource,
)
from server.telemetry.metrics import GatewayMetrics

if TYPE_CHECKING:
    from server.state import GatewayState

LEASE = "experiment-controller"
log = logging.getLogger("loraplex.experiments")


class TargetBusy(Conflict):
    code = "experiment_target_busy"


def guardrails_of(spec: ExperimentSpec) -> Guardrails:
    return Guardrails.model_validate(spec.guardrails)


def check_spec(spec: ExperimentSpec, registry: Registry, base_model: str) -> None:
    """Refuse definitions that cannot work: bad guardrails, or a variant naming no servable
    model (every variant must resolve to a ready version or be the base model)."""
    try:
        guardrails_of(spec)
    except ValueError as exc:
        raise BadRequest(f"invalid guardrails: {exc}", param="guardrails") from None
    snap = registry.snapshot
    for v in spec.variants:
        if v.model == base_model:
            continue
        ref = AdapterRef.parse(v.model)
        version = snap.resolve(ref) if ref is not None else None
        if version is None or not version.routable:
            raise BadRequest(
                f"variant {v.name!r}: model {v.model!r} is not a ready adapter version",
                param="variants",
                code="variant_not_servable",
            )


async def create(
    registry: Registry, name: str, spec: ExperimentSpec, actor: Actor, base_model: str
) -> ExperimentRecord:
    check_spec(spec, registry, base_model)
    target = parse_target(spec.target)
    assert target is not None  # the spec validated it
    for other in registry.snapshot.experiments.values():
        other_target = parse_target(other.target)
        if other.status in ACTIVE and other_target is not None and other_target.key == target.key:
            raise TargetBusy(
                f"experiment {other.name!r} already runs on {target.key}; end it first"
            )
    record = ExperimentRecord(
        name=name,
        target=spec.target,
        definition=spec.model_dump(mode="json"),
        status="running",
        weights=spec.initial_weights(),
        ramp_step=0,
        step_started_at=time.time(),
    )
    await registry.put_experiment(record, actor, create=True)
    return registry.snapshot.experiments[name]


async def set_status(
    registry: Registry,
    record: ExperimentRecord,
    status: str,
    actor: Actor,
    *,
    weights: dict[str, float] | None = None,
    reason: str | None = None,
    expect: tuple[str, ...] = ACTIVE,
    action: str | None = None,
    **changes: Any,
) -> ExperimentRecord:
    after = replace(
        record,
        status=status,
        weights=weights if weights is not None else record.weights,
        reason=reason,
        **changes,
    )
    await registry.put_experiment(
        after, actor, expect_status=expect, action=action or f"experiment.{status}"
    )
    return registry.snapshot.experiments[record.name]


def _require_status(registry: Registry, record: ExperimentRecord, expect: tuple[str, ...]) -> None:
    """Refuse a change before its first side effect (the alias move), not only in the final
    guarded write: an ended experiment must not move its target's alias and then answer 409."""
    current = registry.snapshot.experiments.get(record.name, record)
    if current.status not in expect:
        raise InvalidTransition(
            f"experiment {record.name!r} is {current.status}, expected " + " or ".join(expect)
        )


def spec_of(record: ExperimentRecord) -> ExperimentSpec:
    return ExperimentSpec.model_validate(record.definition)


def all_on_control(spec: ExperimentSpec) -> dict[str, float]:
    """Weights that send everyone to the control (candidates listed at 0 for the gauges)."""
    return with_control(spec.control, {v.name: 0.0 for v in spec.variants[1:]})


async def set_weights(
    registry: Registry, record: ExperimentRecord, shares: dict[str, float], actor: Actor
) -> ExperimentRecord:
    """Manual candidate shares (the control gets the rest)."""
    spec = spec_of(record)
    candidates = {v.name for v in spec.variants[1:]}
    unknown = set(shares) - candidates
    if unknown or sum(shares.values()) > 1.0 + 1e-9 or any(w < 0 for w in shares.values()):
        raise BadRequest(
            "weights must name candidate variants, each >= 0, adding up to at most 1",
            param="weights",
        )
    merged = {n: w for n, w in record.weights.items() if n in candidates} | shares
    if sum(merged.values()) > 1.0 + 1e-9:  # with the shares of candidates not named here
        raise BadRequest(
            "candidate weights (with those not given here) add up to more than 1",
            param="weights",
        )
    return await set_status(
        registry,
        record,
        record.status,
        actor,
        weights=with_control(spec.control, merged),
        action="experiment.weights",
        step_started_at=time.time(),
    )


async def promote(
    registry: Registry, record: ExperimentRecord, variant: str | None, actor: Actor
) -> ExperimentRecord:
    """End the experiment with `variant` (default: the only or the largest candidate) as the
    winner; for an alias target the alias moves to the winner's version."""
    spec = spec_of(record)
    names = [v.name for v in spec.variants]
    if variant is None:
        variant = max(spec.variants[1:], key=lambda v: record.weights.get(v.name, 0.0)).name
    if variant not in names:
        raise BadRequest(f"no variant named {variant[:64]!r}", param="variant")
    _require_status(registry, record, ACTIVE)
    await _point_alias(registry, spec, variant, actor)
    return await set_status(
        registry, record, "promoted", actor, weights={variant: 1.0}, reason=f"winner: {variant}"
    )


async def abort(registry: Registry, record: ExperimentRecord, actor: Actor) -> ExperimentRecord:
    """End the experiment; everyone back on the control (and the alias, if it had moved)."""
    spec = spec_of(record)
    _require_status(registry, record, ACTIVE)
    await _point_alias(registry, spec, spec.control, actor)
    return await set_status(registry, record, "aborted", actor, weights=all_on_control(spec))


async def rollback(
    registry: Registry,
    record: ExperimentRecord,
    verdict: Verdict,
    candidate: str,
    metrics: GatewayMetrics,
) -> ExperimentRecord:
    spec = spec_of(record)
    _require_status(registry, record, ("running",))
    await _point_alias(registry, spec, spec.control, SYSTEM)
    reason = "; ".join(
        f"{b.guardrail}: {b.observed:.4g} > {b.limit:.4g} (p={b.p_value:.2g})"
        for b in verdict.breaches
    )
    after = await set_status(
        registry,
        record,
        "rolled_back",
        Actor("controller"),
        weights=all_on_control(spec),
        reason=f"{candidate}: {reason}",
        expect=("running",),
        action="experiment.rollback",
    )
    for b in verdict.breaches:
        metrics.child(metrics.exp_rollbacks, record.name, b.guardrail).inc()
    log.warning(
        "experiment rolled back",
        extra={
            "experiment": record.name,
            "variant": candidate,
            "reason": reason,
            "summary": verdict.summary,
        },
    )
    await registry.record_audit(
        Actor("controller"),
        "experiment.analysis",
        f"experiment:{record.name}",
        {"variant": candidate, "decision": verdict.decision, "summary": verdict.summary},
    )
    return after


async def _point_alias(
    registry: Registry, spec: ExperimentSpec, variant: str, actor: Actor
) -> None:
    """For alias targets: point the alias at `variant`'s version (no change if it already
    does, or if the variant names the base model or an unresolvable model)."""
    target = parse_target(spec.target)
    if target is None or target.adapter is None or target.alias is None:
        return
    model = next(v.model for v in spec.variants if v.name == variant)
    ref = AdapterRef.parse(model)
    version = registry.snapshot.resolve(ref) if ref is not None else None
    if version is None or version.name != target.adapter:
        return
    await registry.set_alias(target.adapter, target.alias, version.version, actor)


@dataclass(slots=True)
class RoundResult:
    """What one controller round did, per experiment (tests and logs read it)."""

    experiment: str
    action: str  # none | insufficient | unavailable | breach_pending | rollback | ramp | promote
    verdicts: dict[str, Verdict]


class ExperimentController:
    def __init__(
        self,
        registry: Registry,
        source: MetricsSource,
        metrics: GatewayMetrics,
        interval_s: float,
        lease_ttl_s: float,
    ) -> None:
        self.registry = registry
        self.source = source
        self.metrics = metrics
        self.interval_s = interval_s
        self.lease_ttl_s = lease_ttl_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.last_round: list[RoundResult] = []
        # Consecutive breached rounds per (experiment, created_at, candidate): see
        # Guardrails.confirm_rounds. created_at tells a re-created experiment of the same name
        # apart; review_all forgets experiments that are not running (a pause ends the run).
        self._strikes: dict[tuple[str, float, str], int] = {}

    async def run(self) -> None:
        """Forever: take or renew the lease, then review running experiments if leader."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                if await self.registry.acquire_lease(LEASE, self.holder, self.lease_ttl_s):
                    self.last_round = await self.review_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("experiment controller round failed")

    async def close(self) -> None:
        """Hand the lease over at once (a successor need not wait for it to expire)."""
        try:
            await self.registry.release_lease(LEASE, self.holder)
        except Exception:
            log.warning("could not release the experiment controller lease", exc_info=True)
        await self.source.aclose()

    async def review_all(self) -> list[RoundResult]:
        await self.registry.refresh_if_changed()
        running = [r for r in self.registry.snapshot.experiments.values() if r.status == "running"]
        live = {(r.name, r.created_at) for r in running}
        self._strikes = {k: n for k, n in self._strikes.items() if k[:2] in live}
        results = []
        for record in running:
            results.append(await self.review(record))
        return results

    async def analyse(
        self, record: ExperimentRecord, now: float | None = None
    ) -> tuple[float, dict[str, VariantStats], dict[str, Verdict]]:
        """(window, per-variant stats, verdict per candidate) over the current analysis window:
        at most `analysis_window_s`, never before the current ramp step started. Raises
        MetricsUnavailable. Read-only: the admin analysis endpoint shows exactly this."""
        now = time.time() if now is None else now
        spec = spec_of(record)
        rules = guardrails_of(spec)
        window = min(spec.analysis_window_s, max(now - record.step_started_at, 1.0))
        stats = await self.source.variant_stats(record.name, window)
        control = stats.get(spec.control, VariantStats.empty())
        verdicts = {
            v.name: evaluate(control, stats.get(v.name, VariantStats.empty()), rules)
            for v in spec.variants[1:]
        }
        return window, stats, verdicts

    async def review(self, record: ExperimentRecord, now: float | None = None) -> RoundResult:
        now = time.time() if now is None else now
        spec = spec_of(record)
        rules = guardrails_of(spec)
        in_step = max(now - record.step_started_at, 1.0)
        try:
            _, _, judged = await self.analyse(record, now)
        except MetricsUnavailable as exc:
            log.warning("experiment %s: metrics unavailable (%s)", record.name, exc)
            return RoundResult(record.name, "unavailable", {})
        verdicts: dict[str, Verdict] = {}
        shadow = spec.shadow.variant if spec.shadow else None
        for v in spec.variants[1:]:
            if record.weights.get(v.name, 0.0) <= 0.0 and v.name != shadow:
                continue
            verdict = verdicts[v.name] = judged[v.name]
            key = (record.name, record.created_at, v.name)
            self._strikes[key] = (
                self._strikes.get(key, 0) + 1 if verdict.decision == "breach" else 0
            )
            if self._strikes[key] >= rules.confirm_rounds:
                del self._strikes[key]
                await rollback(self.registry, record, verdict, v.name, self.metrics)
                return RoundResult(record.name, "rollback", verdicts)
        if any(d.decision == "breach" for d in verdicts.values()):
            return RoundResult(record.name, "breach_pending", verdicts)
        if not verdicts or any(d.decision != "healthy" for d in verdicts.values()):
            return RoundResult(record.name, "insufficient" if verdicts else "none", verdicts)
        if in_step < spec.ramp_interval_s or not spec.ramp:
            return RoundResult(record.name, "none", verdicts)
        return await self._advance(record, spec, verdicts, now)

    async def _advance(
        self,
        record: ExperimentRecord,
        spec: ExperimentSpec,
        verdicts: dict[str, Verdict],
        now: float,
    ) -> RoundResult:
        candidate = spec.variants[1].name
        step = record.ramp_step + 1
        if step < len(spec.ramp):
            await set_status(
                self.registry,
                record,
                "running",
                Actor("controller"),
                weights=with_control(spec.control, {candidate: spec.ramp[step]}),
                reason=f"ramp step {step}: {spec.ramp[step]:.0%} (guardrails healthy)",
                expect=("running",),
                action="experiment.ramp",
                ramp_step=step,
                step_started_at=now,
            )
            return RoundResult(record.name, "ramp", verdicts)
        if spec.auto_promote:
            await promote(self.registry, record, candidate, Actor("controller"))
            return RoundResult(record.name, "promote", verdicts)
        return RoundResult(record.name, "none", verdicts)


def start_controller(state: GatewayState) -> ExperimentController:
    """The controller with its metrics source: PromQL when a Prometheus URL is configured
    (correct across replicas), else this process's own counters."""
    s = state.settings.experiments
    source: MetricsSource
    if s.prometheus_url:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.prometheus_timeout_s))
        source = PromQLSource(session, s.prometheus_url, owns_session=True)
    else:
        source = LocalSource(state.metrics)
    return ExperimentController(state.registry, source, state.metrics, s.interval_s, s.lease_ttl_s)
