"""Small, dependency-free statistics over counts: the A/B guardrails and the drift monitor.

Everything here works on what Prometheus gives us — event counts and histogram buckets — not on
raw samples, so the tests are the binned versions (Mann-Whitney U with one tie group per bucket,
KS over bucket boundaries). Inputs are plain sequences of (possibly fractional: `increase()`
extrapolates) non-negative counts; the arrays are a dozen buckets long, so plain Python beats
numpy here and keeps the module free of scipy (not a gateway dependency).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

_SQRT2 = math.sqrt(2.0)


class Significance(NamedTuple):
    """A test's statistic and its p-value (one-sided unless the function says otherwise)."""

    statistic: float
    p_value: float


NO_EVIDENCE = Significance(0.0, 1.0)
"""What a test returns when the data cannot say anything (no samples, no variance)."""


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z; erfc keeps precision far in the upper tail."""
    return 0.5 * math.erfc(z / _SQRT2)


def _check_counts(counts: Sequence[float], what: str) -> None:
    for c in counts:
        if not c >= 0.0 or math.isinf(c):  # also rejects NaN
            raise ValueError(f"{what}: counts must be finite and >= 0, got {c!r}")


def _same_length(a: Sequence[float], b: Sequence[float]) -> None:
    if len(a) != len(b):
        raise ValueError(f"histograms differ in length ({len(a)} vs {len(b)} buckets)")
    _check_counts(a, "first histogram")
    _check_counts(b, "second histogram")


def two_proportion_z(
    control_events: float, control_n: float, candidate_events: float, candidate_n: float
) -> Significance:
    """One-sided pooled two-proportion z-test of H1: candidate rate > control rate.

    Returns `NO_EVIDENCE` when either side has no trials or the pooled rate is 0 or 1 (the
    difference has no variance to be judged against).
    """
    for events, n in ((control_events, control_n), (candidate_events, candidate_n)):
        if not 0.0 <= events <= n or math.isinf(n):
            raise ValueError(f"need 0 <= events <= trials, got {events!r} of {n!r}")
    if control_n <= 0 or candidate_n <= 0:
        return NO_EVIDENCE
    pooled = (control_events + candidate_events) / (control_n + candidate_n)
    variance = pooled * (1.0 - pooled) * (1.0 / control_n + 1.0 / candidate_n)
    if variance <= 0.0:
        return NO_EVIDENCE
    z = (candidate_events / candidate_n - control_events / control_n) / math.sqrt(variance)
    return Significance(z, normal_sf(z))


def _log_hypergeom(k: int, population: int, successes: int, draws: int) -> float:
    """log P(X = k), X ~ Hypergeometric(population, successes, draws)."""

    def log_comb(n: int, r: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)

    return (
        log_comb(successes, k)
        + log_comb(population - successes, draws - k)
        - log_comb(population, draws)
    )


def fisher_exact_greater(
    control_events: float, control_n: float, candidate_events: float, candidate_n: float
) -> Significance:
    """One-sided Fisher exact test of H1: candidate rate > control rate; the statistic is the
    candidate's rate minus the control's.

    Conditional on the total number of events, the candidate's count is hypergeometric under
    H0; p = P(X >= observed). Exact where the z-test is not: at a 1 % error rate 200 requests
    hold ~2 errors, and the pooled z-test then rejects a healthy candidate several times more
    often than its level says. Fractional counts (`increase()` extrapolates) are rounded. The
    tail is summed from the observed count until its terms stop mattering, so the cost grows
    with the square root of the event count, not with it.
    """
    for events, n in ((control_events, control_n), (candidate_events, candidate_n)):
        if not 0.0 <= events <= n or math.isinf(n):
            raise ValueError(f"need 0 <= events <= trials, got {events!r} of {n!r}")
    n1, n2 = round(control_n), round(candidate_n)
    e1, e2 = min(round(control_events), n1), min(round(candidate_events), n2)
    if n1 <= 0 or n2 <= 0:
        return NO_EVIDENCE
    diff = e2 / n2 - e1 / n1
    total = e1 + e2
    population = n1 + n2
    if total in (0, population):
        return Significance(diff, 1.0)
    mode = (total + 1) * (n2 + 1) // (population + 2)

    def tail(ks: range) -> float:
        """Sum of P(X = k) over ks, along which the terms decrease (away from the mode)."""
        if not ks:
            return 0.0
        log_first = _log_hypergeom(ks[0], population, total, n2)
        acc = 0.0
        for k in ks:
            term = math.exp(_log_hypergeom(k, population, total, n2) - log_first)
            acc += term
            if term < 1e-17 * acc:
                break
        return acc * math.exp(log_first)

    if e2 > mode:
        p = tail(range(e2, min(total, n2) + 1))
    else:  # the upper tail holds the mode: one minus the lower tail instead
        p = 1.0 - tail(range(e2 - 1, max(0, total - n1) - 1, -1))
    return Significance(diff, min(max(p, 0.0), 1.0))


def mann_whitney_binned(
    control: Sequence[float], candidate: Sequence[float], *, continuity: bool = True
) -> Significance:
    """Mann-Whitney U of H1: candidate stochastically greater than control, on two histograms
    with the same buckets (non-cumulative counts, ascending).

    Each bucket is one tie group: its members get the group's mid-rank, and the normal
    approximation uses the tie-corrected variance n1·n2/12 · ((N+1) - Σ(t³-t)/(N(N-1))).
    The statistic returned is U of the candidate (the number of (control, candidate) pairs with
    the candidate larger, ties counting one half); with `continuity`, P(U >= u) is read at
    u - 0.5, as scipy's `mannwhitneyu(..., alternative="greater", method="asymptotic")` does.
    For the opposite alternative (candidate smaller, e.g. a score drop) swap the arguments.
    """
    _same_length(control, candidate)
    n1 = math.fsum(control)
    n2 = math.fsum(candidate)
    n = n1 + n2
    if n1 <= 0 or n2 <= 0 or n < 2:
        return NO_EVIDENCE
    u = 0.0
    below = 0.0  # control observations in lower buckets
    ties = 0.0
    for a, b in zip(control, candidate, strict=True):
        u += b * (below + 0.5 * a)
        below += a
        t = a + b
        ties += t * t * t - t
    mean = n1 * n2 / 2.0
    variance = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)))
    if variance <= 1e-12 * n1 * n2:  # everything in one bucket: no ordering information
        return Significance(u, 1.0)
    shift = u - mean - (0.5 if continuity else 0.0)
    return Significance(u, normal_sf(shift / math.sqrt(variance)))


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float:
    """The q-quantile of a histogram, as PromQL's `histogram_quantile` computes it.

    `bounds` are the buckets' upper bounds (ascending, the last +Inf), `counts` the
    NON-cumulative counts. Linear interpolation inside the bucket holding the rank; the first
    bucket starts at 0 (unless its bound is <= 0: then that bound is the answer); a rank in the
    +Inf bucket answers the highest finite bound. NaN when there are no observations.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q!r}")
    if len(bounds) != len(counts) or not bounds:
        raise ValueError("bounds and counts must be non-empty and of the same length")
    if not math.isinf(bounds[-1]) or bounds[-1] < 0:
        raise ValueError("the last bucket bound must be +Inf")
    if any(lo >= hi for lo, hi in itertools.pairwise(bounds)):
        raise ValueError("bucket bounds must be strictly increasing")
    _check_counts(counts, "histogram")
    total = math.fsum(counts)
    if total <= 0 or len(bounds) < 2:
        return math.nan
    rank = q * total
    before = 0.0
    for i, (bound, count) in enumerate(zip(bounds, counts, strict=True)):
        if i == len(bounds) - 1:
            return bounds[-2]
        if count > 0 and before + count >= rank:  # count > 0: q = 0 skips empty buckets
            if i == 0 and bound <= 0:
                return bound
            start = 0.0 if i == 0 else bounds[i - 1]
            return start + (bound - start) * (rank - before) / count
        before += count
    raise AssertionError("unreachable: the +Inf bucket returns")


def histogram_mean(bounds: Sequence[float], counts: Sequence[float]) -> float:
    """Mean estimated from bucket midpoints (first bucket from 0, the +Inf bucket at the highest
    finite bound); NaN when empty. For bounded quantities such as feedback scores."""
    if len(bounds) != len(counts):
        raise ValueError("bounds and counts must be of the same length")
    _check_counts(counts, "histogram")
    total = math.fsum(counts)
    if total <= 0:
        return math.nan
    acc = 0.0
    lower = 0.0
    for bound, count in zip(bounds, counts, strict=True):
        mid = lower if math.isinf(bound) else (lower + bound) / 2.0
        acc += count * mid
        if not math.isinf(bound):
            lower = bound
    return acc / total


def _proportions(counts: Sequence[float], what: str) -> list[float]:
    _check_counts(counts, what)
    total = math.fsum(counts)
    if total <= 0:
        raise ValueError(f"{what}: no observations")
    return [c / total for c in counts]


def psi(reference: Sequence[float], current: Sequence[float], *, eps: float = 1e-4) -> float:
    """Population Stability Index Σ (c-r)·ln(c/r) over bins of two count vectors.

    Empty bins would make it infinite, so every proportion is floored at `eps` and the vector
    renormalised. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift.
    Raises ValueError when either side has no observations.
    """
    if len(reference) != len(current):
        raise ValueError(f"distributions differ in length ({len(reference)} vs {len(current)})")
    if eps <= 0:
        raise ValueError("eps must be > 0")
    smoothed = []
    for counts, what in ((reference, "reference"), (current, "current")):
        floored = [max(p, eps) for p in _proportions(counts, what)]
        total = math.fsum(floored)
        smoothed.append([p / total for p in floored])
    ref, cur = smoothed
    return math.fsum((c - r) * math.log(c / r) for r, c in zip(ref, cur, strict=True))


def js_divergence(p_counts: Sequence[float], q_counts: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits: 0 for identical distributions, 1 for disjoint ones.
    Symmetric and finite with empty bins (no smoothing needed)."""
    if len(p_counts) != len(q_counts):
        raise ValueError(f"distributions differ in length ({len(p_counts)} vs {len(q_counts)})")
    p = _proportions(p_counts, "first distribution")
    q = _proportions(q_counts, "second distribution")
    acc = 0.0
    for pi, qi in zip(p, q, strict=True):
        m = (pi + qi) / 2.0
        if pi > 0:
            acc += 0.5 * pi * math.log2(pi / m)
        if qi > 0:
            acc += 0.5 * qi * math.log2(qi / m)
    return min(max(acc, 0.0), 1.0)


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution (limit of sqrt(n)·D_n); each of its two series
    is used where it converges fast."""
    if x <= 0:
        return 1.0
    if x < 1.18:
        # 1 - CDF, CDF = sqrt(2π)/x · Σ exp(-(2k-1)²π²/(8x²))
        c = -(math.pi**2) / (8.0 * x * x)
        cdf = (
            math.sqrt(2.0 * math.pi)
            / x
            * math.fsum(math.exp((2 * k - 1) ** 2 * c) for k in (1, 2, 3, 4, 5))
        )
        return min(max(1.0 - cdf, 0.0), 1.0)
    terms = (2.0 * (-1.0) ** (k - 1) * math.exp(-2.0 * k * k * x * x) for k in range(1, 8))
    return min(max(math.fsum(terms), 0.0), 1.0)


def ks_binned(first: Sequence[float], second: Sequence[float]) -> Significance:
    """Two-sample Kolmogorov-Smirnov on two histograms with the same buckets: D is the largest
    gap between the empirical CDFs at the bucket boundaries (a lower bound of the raw-sample D,
    so the test is conservative), with the asymptotic two-sided p-value
    P(K > sqrt(n1·n2/(n1+n2))·D). `NO_EVIDENCE` when either side is empty."""
    _same_length(first, second)
    n1 = math.fsum(first)
    n2 = math.fsum(second)
    if n1 <= 0 or n2 <= 0:
        return NO_EVIDENCE
    d = 0.0
    c1 = c2 = 0.0
    for a, b in zip(first, second, strict=True):
        c1 += a
        c2 += b
        d = max(d, abs(c1 / n1 - c2 / n2))
    return Significance(d, kolmogorov_sf(math.sqrt(n1 * n2 / (n1 + n2)) * d))
