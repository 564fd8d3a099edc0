"""Guardrail analysis of an A/B experiment: is the candidate measurably worse than the control?

Pure: it judges two `VariantStats` (what a `MetricsSource` read over the analysis window) against
the experiment's `Guardrails` and returns a `Verdict`; the controller decides what to do with it
(roll back on "breach", wait on "insufficient").

A guardrail is breached only when BOTH hold:
- the degradation is statistically significant, one-sided (candidate worse): Fisher's exact
  test for rates (errors, thumbs-down; the pooled two-proportion z-test, at ~2 expected errors
  per window, flagged healthy candidates twice as often as its level says), a Mann-Whitney U
  on the binned histograms for distributions (latency, TTFT: candidate slower; score: candidate
  lower), at level alpha / k, Bonferroni over the k enabled checks that had data;
- the observed degradation exceeds the practical margin (error rate +2 points, p95 x1.5, ...).
Significance alone would roll back a candidate for a real but harmless 3 ms; the margin alone
would roll back on noise at low volume. Requiring both keeps the false-breach rate far below
alpha per round: ~0.5 % at 200 requests per variant, 0 at 5 000, in the simulation of
tests/unit/test_experiment_analysis.py. The controller evaluates every round over overlapping
windows, so it should still want a breach to persist before rolling back.

Mann-Whitney compares whole distributions, so it is the significance half of the p95 guardrails
(a shift in the tail moves it too); the p95 itself comes from the buckets like PromQL's
`histogram_quantile`, so what the audit log shows matches the dashboards.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.telemetry.stats import (
    Significance,
    fisher_exact_greater,
    histogram_mean,
    histogram_quantile,
    mann_whitney_binned,
)

GUARDRAILS = ("error_rate", "latency_p95", "ttft_p95", "feedback_down", "score")
"""Guardrail names: `Breach.guardrail`, the `guardrail` label of loraplex_experiment_rollbacks."""

Decision = Literal["insufficient", "healthy", "breach"]


@dataclass(frozen=True, slots=True)
class Histo:
    """A Prometheus histogram over a window: bucket upper bounds (ascending, the last +Inf) and
    NON-cumulative counts (fractional when they come from `increase()`)."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.bounds or len(self.bounds) != len(self.counts):
            raise ValueError("a histogram needs as many counts as bounds, at least one")
        if self.bounds[-1] != math.inf:
            raise ValueError("the last bucket bound must be +Inf")
        if any(lo >= hi for lo, hi in itertools.pairwise(self.bounds)):
            raise ValueError("bucket bounds must be strictly increasing")
        if any(not 0.0 <= c < math.inf for c in self.counts):
            raise ValueError("bucket counts must be finite and >= 0")

    @classmethod
    def empty(cls, bounds: tuple[float, ...] = (math.inf,)) -> Histo:
        return cls(bounds, (0.0,) * len(bounds))

    @property
    def total(self) -> float:
        return math.fsum(self.counts)

    def quantile(self, q: float) -> float:
        """PromQL `histogram_quantile(q, ...)` of these buckets; NaN when empty."""
        return histogram_quantile(q, self.bounds, self.counts)

    def mean(self) -> float:
        """Mean from bucket midpoints; NaN when empty."""
        return histogram_mean(self.bounds, self.counts)

    def rebin(self, bounds: tuple[float, ...]) -> Histo:
        """The same observations on coarser buckets; `bounds` must be a subset of ours (then the
        regrouping is exact)."""
        if bounds == self.bounds:
            return self
        missing = set(bounds) - set(self.bounds)
        if missing:
            raise ValueError(f"cannot rebin onto bounds we do not have: {sorted(missing)}")
        out: list[float] = []
        acc = 0.0
        targets = iter(bounds)
        target = next(targets)
        for bound, count in zip(self.bounds, self.counts, strict=True):
            acc += count
            if bound == target:
                out.append(acc)
                acc = 0.0
                target = next(targets, math.inf)
        return Histo(tuple(bounds), tuple(out))


def aligned(a: Histo, b: Histo) -> tuple[Histo, Histo]:
    """Both histograms on their common bounds (e.g. after a bucket layout change between
    releases, two replicas may disagree); +Inf is always common."""
    if a.bounds == b.bounds:
        return a, b
    common = tuple(sorted(set(a.bounds) & set(b.bounds)))
    return a.rebin(common), b.rebin(common)


@dataclass(frozen=True, slots=True)
class VariantStats:
    """One variant's traffic over the analysis window. `errors` counts outcome="error" (5xx,
    engine failures, broken streams), not client errors; `requests` counts every outcome."""

    requests: float
    errors: float
    latency: Histo
    ttft: Histo
    completion_tokens: Histo
    feedback_up: float
    feedback_down: float
    feedback_score: Histo

    @classmethod
    def empty(cls) -> VariantStats:
        h = Histo.empty()
        return cls(0.0, 0.0, h, h, h, 0.0, 0.0, h)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests > 0 else math.nan

    @property
    def feedback(self) -> float:
        return self.feedback_up + self.feedback_down

    @property
    def feedback_down_rate(self) -> float:
        return self.feedback_down / self.feedback if self.feedback > 0 else math.nan


class Guardrails(BaseModel):
    """Rules of one experiment (stored as JSON in its definition). Margins are absolute for
    rates and scores, ratios for p95s; see the module docstring for how they combine with
    alpha."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_samples: int = Field(200, ge=1, description="requests per variant before any verdict")
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="family-wise, over enabled checks")
    max_error_rate_increase: float = Field(0.02, ge=0.0, le=1.0)
    max_latency_p95_ratio: float = Field(1.5, ge=1.0)
    max_ttft_p95_ratio: float = Field(1.5, ge=1.0)
    max_feedback_down_increase: float = Field(0.1, ge=0.0, le=1.0)
    max_score_drop: float = Field(0.1, ge=0.0, le=1.0)
    # Sub-populations (streamed requests for TTFT, rated requests for feedback and scores) are
    # much smaller than the traffic; below this many per variant that check is skipped
    # (normal approximations need some mass) and the summary says so.
    min_check_samples: int = Field(30, ge=1)
    # The controller judges overlapping windows every round; a rollback needs this many
    # consecutive breached rounds so one unlucky window cannot end a healthy candidate.
    confirm_rounds: int = Field(2, ge=1, le=10)
    check_error_rate: bool = True
    check_latency: bool = True
    check_ttft: bool = True
    check_feedback: bool = True
    check_score: bool = True

    def enabled(self) -> list[str]:
        """Names (from GUARDRAILS) of the checks switched on."""
        switches = (
            self.check_error_rate,
            self.check_latency,
            self.check_ttft,
            self.check_feedback,
            self.check_score,
        )
        return [name for name, on in zip(GUARDRAILS, switches, strict=True) if on]


@dataclass(frozen=True, slots=True)
class Breach:
    """A guardrail the candidate broke: the observed degradation (difference or ratio), the
    margin it exceeded, and the one-sided p-value (below alpha / k)."""

    guardrail: str
    observed: float
    limit: float
    p_value: float


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    breaches: list[Breach] = field(default_factory=list)
    # Observed per-variant numbers, effects and p-values for the audit entry / logs; keys whose
    # value is undefined (e.g. TTFT without streamed requests) are left out, never NaN.
    summary: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Check:
    observed: float  # degradation: candidate - control (rates, scores reversed) or a ratio
    limit: float
    test: Significance


def _ratio(candidate: float, control: float) -> float:
    if control > 0:
        return candidate / control
    return math.inf if candidate > 0 else 1.0


def _check_error_rate(c: VariantStats, x: VariantStats, r: Guardrails) -> _Check | None:
    return _Check(
        x.error_rate - c.error_rate,
        r.max_error_rate_increase,
        fisher_exact_greater(c.errors, c.requests, x.errors, x.requests),
    )


def _p95_check(c: Histo, x: Histo, limit: float, r: Guardrails) -> _Check | None:
    if min(c.total, x.total) < r.min_check_samples:
        return None
    ca, xa = aligned(c, x)
    return _Check(
        _ratio(x.quantile(0.95), c.quantile(0.95)),
        limit,
        mann_whitney_binned(ca.counts, xa.counts),
    )


def _check_latency(c: VariantStats, x: VariantStats, r: Guardrails) -> _Check | None:
    return _p95_check(c.latency, x.latency, r.max_latency_p95_ratio, r)


def _check_ttft(c: VariantStats, x: VariantStats, r: Guardrails) -> _Check | None:
    return _p95_check(c.ttft, x.ttft, r.max_ttft_p95_ratio, r)


def _check_feedback(c: VariantStats, x: VariantStats, r: Guardrails) -> _Check | None:
    if min(c.feedback, x.feedback) < r.min_check_samples:
        return None
    return _Check(
        x.feedback_down_rate - c.feedback_down_rate,
        r.max_feedback_down_increase,
        fisher_exact_greater(c.feedback_down, c.feedback, x.feedback_down, x.feedback),
    )


def _check_score(c: VariantStats, x: VariantStats, r: Guardrails) -> _Check | None:
    cs, xs = c.feedback_score, x.feedback_score
    if min(cs.total, xs.total) < r.min_check_samples:
        return None
    ca, xa = aligned(cs, xs)
    # candidate worse = control stochastically greater: the arguments swap
    return _Check(
        cs.mean() - xs.mean(), r.max_score_drop, mann_whitney_binned(xa.counts, ca.counts)
    )


_CHECKS: dict[str, Callable[[VariantStats, VariantStats, Guardrails], _Check | None]] = {
    "error_rate": _check_error_rate,
    "latency_p95": _check_latency,
    "ttft_p95": _check_ttft,
    "feedback_down": _check_feedback,
    "score": _check_score,
}


def describe(control: VariantStats, candidate: VariantStats) -> dict[str, float]:
    """The observed per-variant numbers (requests, error rate, p50/p95 latency and TTFT, median
    completion length, feedback counts and thumbs-down rate, mean score); undefined ones left
    out (JSON has no NaN)."""
    out: dict[str, float] = {}
    for side, s in (("control", control), ("candidate", candidate)):
        values = {
            "requests": s.requests,
            "errors": s.errors,
            "error_rate": s.error_rate,
            "latency_p50": s.latency.quantile(0.5),
            "latency_p95": s.latency.quantile(0.95),
            "ttft_p95": s.ttft.quantile(0.95),
            "completion_tokens_p50": s.completion_tokens.quantile(0.5),
            "feedback": s.feedback,
            "feedback_down_rate": s.feedback_down_rate,
            "score_mean": s.feedback_score.mean(),
        }
        out.update({f"{side}_{k}": v for k, v in values.items() if math.isfinite(v)})
    return out


def evaluate(control: VariantStats, candidate: VariantStats, rules: Guardrails) -> Verdict:
    """Judge the candidate against the control. "insufficient" while either variant has fewer
    than `min_samples` requests; else "breach" with every broken guardrail, or "healthy".

    Bonferroni runs over the k enabled checks that had data this round: a check skipped for a
    small sub-population (no streamed requests, few ratings) cannot reject, so it spends no
    alpha; which checks run depends on counts, not on the outcome of any test.

    Summary keys besides `describe`'s: `checks` (k), `alpha_per_check`, and per check NAME
    `NAME_effect` (the degradation compared with the margin) and `NAME_p`, or `NAME_skipped` = 1
    when its sub-population is below `min_check_samples`."""
    summary = describe(control, candidate)
    if min(control.requests, candidate.requests) < rules.min_samples:
        return Verdict("insufficient", [], summary)
    ran: list[tuple[str, _Check]] = []
    for name in rules.enabled():
        check = _CHECKS[name](control, candidate, rules)
        if check is None or math.isnan(check.observed):
            summary[f"{name}_skipped"] = 1.0
            continue
        ran.append((name, check))
        if math.isfinite(check.observed):
            summary[f"{name}_effect"] = check.observed
        summary[f"{name}_p"] = check.test.p_value
    alpha = rules.alpha / max(len(ran), 1)
    summary["checks"] = float(len(ran))
    summary["alpha_per_check"] = alpha
    breaches = [
        Breach(name, check.observed, check.limit, check.test.p_value)
        for name, check in ran
        if check.test.p_value < alpha and check.observed > check.limit
    ]
    return Verdict("breach" if breaches else "healthy", breaches, summary)
