"""server.telemetry.stats: hand-computed values, scipy cross-checks (scipy is in the venv as a
scikit-learn dependency, not a gateway one) and the properties the guardrails rely on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.telemetry.stats import (
    NO_EVIDENCE,
    fisher_exact_greater,
    histogram_mean,
    histogram_quantile,
    js_divergence,
    kolmogorov_sf,
    ks_binned,
    mann_whitney_binned,
    normal_sf,
    psi,
    two_proportion_z,
)

INF = math.inf
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, INF)


def binned(values: np.ndarray, bounds: tuple[float, ...] = BOUNDS) -> list[float]:
    """Counts per bucket as Prometheus would have them (upper bound inclusive), non-cumulative."""
    idx = np.searchsorted(np.array(bounds), values, side="left")
    return [float(c) for c in np.bincount(idx, minlength=len(bounds))]


def test_normal_sf() -> None:
    assert normal_sf(0.0) == 0.5
    assert normal_sf(1.959963984540054) == pytest.approx(0.025, rel=1e-9)
    assert normal_sf(-1.6448536269514722) == pytest.approx(0.95, rel=1e-9)
    assert 0 < normal_sf(10.0) < 1e-22  # erfc: no cancellation in the tail


# -- two-proportion z ---------------------------------------------------------------------------


def test_two_proportion_hand_computed() -> None:
    # p1 = .1, p2 = .2, pooled .15: z = .1 / sqrt(.15 * .85 * (2 / 100)) = 1.98030
    z, p = two_proportion_z(10, 100, 20, 100)
    assert z == pytest.approx(1.980295, rel=1e-6)
    assert p == pytest.approx(0.0238352, rel=1e-5)
    z2, p2 = two_proportion_z(20, 100, 10, 100)  # one-sided: the other direction is no evidence
    assert z2 == pytest.approx(-z)
    assert p2 == pytest.approx(1 - p)


def test_two_proportion_degenerate() -> None:
    assert two_proportion_z(0, 100, 0, 100) == NO_EVIDENCE
    assert two_proportion_z(100, 100, 50, 50) == NO_EVIDENCE
    assert two_proportion_z(0, 0, 3, 10) == NO_EVIDENCE
    assert two_proportion_z(5, 100, 5, 100).p_value == 0.5
    with pytest.raises(ValueError, match="events <= trials"):
        two_proportion_z(11, 10, 0, 10)
    with pytest.raises(ValueError, match="events <= trials"):
        two_proportion_z(1, 10, math.nan, 10)


def test_two_proportion_matches_statsmodels_formula_on_fractional_counts() -> None:
    # increase() gives fractional counts; the formula does not care.
    z, p = two_proportion_z(2.5, 200.4, 12.25, 199.9)
    p1, p2 = 2.5 / 200.4, 12.25 / 199.9
    pooled = (2.5 + 12.25) / (200.4 + 199.9)
    expect = (p2 - p1) / math.sqrt(pooled * (1 - pooled) * (1 / 200.4 + 1 / 199.9))
    assert z == pytest.approx(expect)
    assert p == pytest.approx(normal_sf(expect))


def test_fisher_exact_hand_computed() -> None:
    # 0 vs 6 events in 200 + 200: all 6 in the candidate, P = C(200, 6) / C(400, 6)
    diff, p = fisher_exact_greater(0, 200, 6, 200)
    assert diff == 0.03
    assert p == pytest.approx(math.prod((200 - i) / (400 - i) for i in range(6)), rel=1e-10)
    assert p == pytest.approx(0.015042, rel=1e-4)
    # the pooled z-test calls the same table significant at 1 %: why the guardrails use Fisher
    assert two_proportion_z(0, 200, 6, 200).p_value < 0.01
    assert fisher_exact_greater(0, 10, 0, 10) == (0.0, 1.0)
    assert fisher_exact_greater(10, 10, 10, 10) == (0.0, 1.0)
    assert fisher_exact_greater(0, 0, 1, 10) == NO_EVIDENCE
    assert fisher_exact_greater(4000, 1_000_000, 100, 1_000_000).p_value == 1.0
    with pytest.raises(ValueError, match="events <= trials"):
        fisher_exact_greater(3, 2, 0, 2)


def test_fisher_exact_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(13)
    for _ in range(60):
        n1, n2 = (int(x) for x in rng.integers(1, 3000, 2))
        e1 = int(rng.binomial(n1, rng.uniform(0, 0.1)))
        e2 = int(rng.binomial(n2, rng.uniform(0, 0.1)))
        ref = stats.fisher_exact([[e2, n2 - e2], [e1, n1 - e1]], alternative="greater").pvalue
        assert fisher_exact_greater(e1, n1, e2, n2).p_value == pytest.approx(
            float(ref), rel=1e-8, abs=1e-12
        )


def test_fisher_exact_rounds_fractional_counts_and_stays_fast() -> None:
    assert fisher_exact_greater(2.4, 200.3, 12.6, 199.8) == fisher_exact_greater(2, 200, 13, 200)
    # a million requests per side: the tail sum stops after O(sqrt(events)) terms
    assert fisher_exact_greater(40_000, 1_000_000, 41_000, 1_000_000).p_value < 1e-3


# -- Mann-Whitney on buckets ---------------------------------------------------------------------


def test_mann_whitney_hand_computed() -> None:
    # control {0, 0, 1}, candidate {1, 2, 2}: U = 0.5 + 2 + 3 + 3 = 8.5, mean 4.5,
    # ties 3 * (2**3 - 2) = 18, var = 9/12 * (7 - 18/30) = 4.8, z = (4 - 0.5) / sqrt(4.8)
    u, p = mann_whitney_binned([2, 1, 0], [0, 1, 2])
    assert u == 8.5
    assert p == pytest.approx(normal_sf(3.5 / math.sqrt(4.8)), rel=1e-12)
    assert p == pytest.approx(0.055073, rel=1e-4)
    _, p_plain = mann_whitney_binned([2, 1, 0], [0, 1, 2], continuity=False)
    assert p_plain == pytest.approx(normal_sf(4.0 / math.sqrt(4.8)))


def test_mann_whitney_matches_scipy_on_expanded_samples() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    for shift in (1.0, 1.1, 1.5, 0.8):
        ctrl = binned(rng.lognormal(-1.5, 1.0, 300))
        cand = binned(rng.lognormal(-1.5, 1.0, 250) * shift)
        # one tie group per bucket == samples replaced by their bucket index
        xs = np.repeat(np.arange(len(BOUNDS)), np.array(cand, dtype=int))
        ys = np.repeat(np.arange(len(BOUNDS)), np.array(ctrl, dtype=int))
        ref = stats.mannwhitneyu(xs, ys, alternative="greater", method="asymptotic")
        u, p = mann_whitney_binned(ctrl, cand)
        assert u == pytest.approx(float(ref.statistic))
        assert p == pytest.approx(float(ref.pvalue), rel=1e-9, abs=1e-15)


def test_mann_whitney_identical_and_shifted() -> None:
    counts = binned(np.random.default_rng(1).lognormal(-1.0, 0.8, 1000))
    assert mann_whitney_binned(counts, counts).p_value == pytest.approx(0.5, abs=1e-3)
    assert mann_whitney_binned(counts, counts, continuity=False).p_value == 0.5
    slower = binned(np.random.default_rng(2).lognormal(-1.0, 0.8, 1000) * 2)
    assert mann_whitney_binned(counts, slower).p_value < 1e-20
    assert mann_whitney_binned(slower, counts).p_value > 1 - 1e-12  # opposite alternative


def test_mann_whitney_degenerate() -> None:
    assert mann_whitney_binned([0, 0, 0], [1, 2, 3]) == NO_EVIDENCE
    assert mann_whitney_binned([0, 5, 0], [0, 7, 0]).p_value == 1.0  # one bucket: all ties
    with pytest.raises(ValueError, match="length"):
        mann_whitney_binned([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        mann_whitney_binned([1, -2], [1, 2])


def test_mann_whitney_is_calibrated_under_the_null() -> None:
    """Healthy traffic: about alpha of the one-sided p-values fall below alpha."""
    rng = np.random.default_rng(11)
    ps = [
        mann_whitney_binned(
            binned(rng.lognormal(-1.2, 0.9, 200)), binned(rng.lognormal(-1.2, 0.9, 200))
        ).p_value
        for _ in range(400)
    ]
    below = sum(p < 0.05 for p in ps) / len(ps)
    assert 0.02 <= below <= 0.09
    assert 0.4 < float(np.mean(ps)) < 0.6


# -- histogram_quantile --------------------------------------------------------------------------


def test_quantile_like_promql() -> None:
    bounds = (1.0, 2.0, 4.0, INF)
    assert histogram_quantile(0.5, bounds, (10, 10, 0, 0)) == 1.0
    assert histogram_quantile(0.75, bounds, (10, 10, 0, 0)) == 1.5
    assert histogram_quantile(1.0, bounds, (10, 10, 0, 0)) == 2.0
    assert histogram_quantile(0.25, bounds, (10, 10, 0, 0)) == 0.5  # first bucket starts at 0
    assert histogram_quantile(0.95, bounds, (1, 1, 1, 17)) == 4.0  # +Inf: highest finite bound
    assert histogram_quantile(0.5, bounds, (0, 10, 0, 0)) == 1.5
    assert math.isnan(histogram_quantile(0.5, bounds, (0, 0, 0, 0)))
    assert histogram_quantile(0.5, (-1.0, 0.0, INF), (4, 0, 0)) == -1.0  # bound <= 0: the bound
    assert histogram_quantile(0.0, bounds, (0, 10, 0, 0)) == 1.0  # start of the first non-empty


def test_quantile_is_close_to_the_sample_quantile() -> None:
    values = np.random.default_rng(3).uniform(0.0, 1.0, 20_000)
    got = histogram_quantile(0.95, BOUNDS, binned(values))
    assert got == pytest.approx(0.95, abs=0.01)  # uniform inside (0.5, 1.0]: interpolation exact


def test_quantile_validates() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        histogram_quantile(1.5, (1.0, INF), (1, 1))
    with pytest.raises(ValueError, match=r"\+Inf"):
        histogram_quantile(0.5, (1.0, 2.0), (1, 1))
    with pytest.raises(ValueError, match="increasing"):
        histogram_quantile(0.5, (2.0, 1.0, INF), (1, 1, 1))
    with pytest.raises(ValueError, match="same length"):
        histogram_quantile(0.5, (1.0, INF), (1,))


def test_histogram_mean() -> None:
    assert histogram_mean((0.5, 1.0, INF), (1, 1, 0)) == pytest.approx((0.25 + 0.75) / 2)
    assert histogram_mean((0.5, 1.0, INF), (0, 0, 2)) == 1.0
    assert math.isnan(histogram_mean((1.0, INF), (0, 0)))


# -- drift statistics ---------------------------------------------------------------------------


def test_psi_hand_computed() -> None:
    # (.25 - .5) ln(.5) + (.75 - .5) ln(1.5)
    assert psi([50, 50], [25, 75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    assert psi([3, 5, 7], [30, 50, 70]) == pytest.approx(0.0, abs=1e-15)
    assert psi([50, 50], [25, 75]) == pytest.approx(psi([25, 75], [50, 50]))  # symmetric


def test_psi_smooths_empty_bins() -> None:
    value = psi([100, 0], [50, 50])
    assert math.isfinite(value)
    assert value > 1.0  # a bin appearing from nothing is a major shift
    assert psi([100, 0], [50, 50], eps=1e-2) < value
    with pytest.raises(ValueError, match="no observations"):
        psi([0, 0], [1, 1])
    with pytest.raises(ValueError, match="length"):
        psi([1, 2], [1, 2, 3])


def test_js_divergence() -> None:
    assert js_divergence([1, 0], [0, 1]) == 1.0
    assert js_divergence([2, 3, 5], [4, 6, 10]) == pytest.approx(0.0, abs=1e-15)
    # P = (1, 0), Q = (.5, .5), M = (.75, .25)
    expect = 0.5 * math.log2(1 / 0.75) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * 1.0)
    assert js_divergence([1, 0], [1, 1]) == pytest.approx(expect)
    assert js_divergence([1, 1], [1, 0]) == pytest.approx(expect)


def test_js_matches_scipy() -> None:
    distance = pytest.importorskip("scipy.spatial.distance")
    p, q = [5, 1, 0, 9, 3], [1, 1, 4, 2, 0]
    assert js_divergence(p, q) == pytest.approx(distance.jensenshannon(p, q, base=2) ** 2)


def test_kolmogorov_sf_known_values() -> None:
    assert kolmogorov_sf(1.3580986393225505) == pytest.approx(0.05, rel=1e-6)  # 5% critical
    assert kolmogorov_sf(1.6276236115189) == pytest.approx(0.01, rel=1e-6)
    assert kolmogorov_sf(0.0) == 1.0
    assert kolmogorov_sf(0.1) == 1.0
    # the two series meet smoothly at their switch point
    assert kolmogorov_sf(1.18 - 1e-12) == pytest.approx(kolmogorov_sf(1.18), rel=1e-9)


def test_kolmogorov_sf_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for x in (0.2, 0.5, 0.8, 1.0, 1.17, 1.19, 1.5, 2.0, 3.0):
        assert kolmogorov_sf(x) == pytest.approx(float(stats.kstwobign.sf(x)), rel=1e-9, abs=1e-15)


def test_ks_binned() -> None:
    d, p = ks_binned([10, 0], [0, 10])
    assert d == 1.0
    assert p < 1e-3
    assert ks_binned([1, 2, 3], [2, 4, 6]) == (0.0, 1.0)
    assert ks_binned([0, 0], [1, 1]) == NO_EVIDENCE
    # D between CDFs (.5, 1) and (.25, 1) = .25; n_eff = 40 * 40 / 80 = 20
    d, p = ks_binned([20, 20], [10, 30])
    assert d == 0.25
    assert p == pytest.approx(kolmogorov_sf(math.sqrt(20) * 0.25))


def test_ks_matches_scipy_statistic_on_bucket_indices() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    a = binned(rng.lognormal(-1.0, 1.0, 400))
    b = binned(rng.lognormal(-0.7, 1.0, 300))
    xs = np.repeat(np.arange(len(BOUNDS)), np.array(a, dtype=int))
    ys = np.repeat(np.arange(len(BOUNDS)), np.array(b, dtype=int))
    d, p = ks_binned(a, b)
    assert d == pytest.approx(float(stats.ks_2samp(xs, ys).statistic))
    assert p == pytest.approx(float(stats.kstwobign.sf(math.sqrt(400 * 300 / 700) * d)))
    assert p < 0.01
