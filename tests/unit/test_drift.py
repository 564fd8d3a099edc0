"""The drift monitor on synthetic traffic: no alarm on 5 000 stationary requests, a shifted domain
mix flagged within 500 requests, each other statistic's alarm, hysteresis, windows by count and
by age, references (first N, from the window, persisted payloads, other replicas), gauges."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from server.telemetry.drift import DriftMonitor, DriftSettings, WindowTooSmall
from server.telemetry.drift_window import STATISTICS, compare, length_bin
from server.telemetry.metrics import GatewayMetrics
from tests.drift_traffic import BASE, DOMAINS, SHIFTED_MIX, SHIFTS, Traffic, seeded

SEEDS = range(5)


def monitor(**settings: Any) -> DriftMonitor:
    return DriftMonitor(GatewayMetrics(), DriftSettings(**settings), DOMAINS)


def feed(
    m: DriftMonitor, traffic: Traffic, n: int, rng: random.Random, tenant: str = "acme"
) -> int:
    """Send `n` requests; returns how many evaluations-after-a-request had any alarm on."""
    alarmed = 0
    requests = traffic.requests(rng)
    for _ in range(n):
        m.observe(tenant, *next(requests))
        alarmed += any(alarms(m, tenant).values())
    return alarmed


def alarms(m: DriftMonitor, tenant: str = "acme") -> dict[str, bool]:
    windows = m.windows(tenant)
    assert windows is not None
    return windows.alarms


def delay(m: DriftMonitor, traffic: Traffic, statistic: str, rng: random.Random) -> int:
    """Requests of `traffic` until `statistic` alarms (fails past 500)."""
    requests = traffic.requests(rng)
    for i in range(1, 501):
        m.observe("acme", *next(requests))
        if alarms(m)[statistic]:
            return i
    raise AssertionError(f"{statistic} not flagged within 500 requests")


@pytest.mark.parametrize("seed", SEEDS)
def test_stationary_traffic_raises_no_alarm_in_5000_requests(seed: int) -> None:
    m = monitor()
    assert feed(m, BASE, 5000, seeded(seed)) == 0
    windows = m.windows("acme")
    assert windows is not None
    assert windows.comparison is not None
    assert windows.comparison.domain_psi is not None
    assert windows.comparison.domain_psi < 0.1  # 0.25 is the alarm


@pytest.mark.parametrize("seed", SEEDS)
def test_domain_mix_shift_is_flagged_within_500_requests(seed: int) -> None:
    rng = seeded(seed)
    m = monitor()
    assert feed(m, BASE, 2000, rng) == 0
    found = delay(m, SHIFTS["domain_psi"], "domain_psi", rng)
    assert 100 < found <= 500  # a window of 500: about half of it shifted (measured: 250-350)


@pytest.mark.parametrize("statistic", [s for s in SHIFTS if s != "domain_psi"])
def test_each_statistic_flags_its_own_shift(statistic: str) -> None:
    rng = seeded(7)
    m = monitor()
    feed(m, BASE, 1500, rng)
    delay(m, SHIFTS[statistic], statistic, rng)
    if statistic != "fallback_rate":  # more "general" is also a domain-mix shift
        assert not alarms(m)["domain_psi"]


def _pattern(share_a: float, n: int) -> list[str]:
    """`n` domains, `share_a` of them "medical", spread evenly (deterministic PSI)."""
    out, acc = [], 0.0
    for _ in range(n):
        acc += share_a
        if acc >= 1.0 - 1e-9:
            acc -= 1.0
            out.append("medical")
        else:
            out.append("legal")
    return out


def _psi_two(share: float) -> float:
    return (share - 0.5) * math.log(share / 0.5) + (0.5 - share) * math.log((1 - share) / 0.5)


def test_hysteresis_raises_at_the_threshold_and_clears_under_80_percent() -> None:
    m = monitor(reference_size=100, window_size=100, min_window=50, evaluate_every=1)

    def run(share: float) -> None:
        for d in _pattern(share, 100):
            m.observe("acme", d, 0.9, False, 10, 10, False)

    run(0.5)  # reference: half and half
    run(0.75)
    assert _psi_two(0.75) > 0.25
    assert alarms(m)["domain_psi"]
    run(0.72)  # between 0.8 x 0.25 and 0.25: stays raised
    assert 0.2 < _psi_two(0.72) < 0.25
    assert alarms(m)["domain_psi"]
    run(0.62)  # under 0.2: clears
    assert _psi_two(0.62) < 0.2
    assert not alarms(m)["domain_psi"]
    run(0.72)  # not raised again from below the threshold
    assert not alarms(m)["domain_psi"]


def test_statistics_wait_for_min_window_and_skip_unrouted_requests() -> None:
    m = monitor(reference_size=300, window_size=300, min_window=200, evaluate_every=1)
    rng = seeded(1)
    feed(m, replace(BASE, routed_share=0.5), 300, rng)  # ~150 routed: too few for routing stats
    windows = m.windows("acme")
    assert windows is not None
    assert windows.reference is not None
    assert windows.reference.routed < 200
    feed(m, replace(BASE, mix=SHIFTED_MIX, routed_share=0.5), 300, rng)
    assert windows.comparison is not None
    assert windows.comparison.domain_psi is None
    assert "domain_psi" not in windows.comparison.checks
    assert not any(alarms(m).values())
    # Unrouted requests carry no domain: they count for errors and lengths only.
    assert sum(windows.current.domains.values()) == windows.current.routed
    assert windows.current.requests == 300


def test_recomputed_at_most_every_k_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(*args: Any) -> Any:
        calls.append(1)
        return compare(*args)

    monkeypatch.setattr("server.telemetry.drift.compare", counting)
    m = monitor(reference_size=200, window_size=200, evaluate_every=50, evaluate_interval_s=1e9)
    feed(m, BASE, 1200, seeded(2))
    assert 19 <= len(calls) <= 21  # after the reference: one per 50 requests


def test_window_max_age_drops_old_requests_and_clears_alarms() -> None:
    now = [0.0]
    m = DriftMonitor(
        GatewayMetrics(),
        DriftSettings(
            reference_size=200, window_size=200, min_window=100, window_max_age_s=60,
            evaluate_every=1, evaluate_interval_s=5,
        ),
        DOMAINS,
        clock=lambda: now[0],
    )  # fmt: skip
    rng = seeded(3)
    feed(m, BASE, 200, rng)
    delay(m, replace(BASE, mix={"code": 1.0}), "domain_psi", rng)
    now[0] += 61  # no traffic for a minute: the window empties at the next refresh
    m.refresh()
    windows = m.windows("acme")
    assert windows is not None
    assert windows.current.requests == 0
    assert not any(alarms(m).values())
    assert windows.reference is not None  # the reference does not age


def test_first_n_reference_is_reported_once_and_round_trips() -> None:
    stored: list[tuple[str, dict[str, Any]]] = []
    m = DriftMonitor(
        GatewayMetrics(),
        DriftSettings(reference_size=300, window_size=200),
        DOMAINS,
        on_reference=lambda t, p: stored.append((t, p)),
    )
    feed(m, BASE, 1000, seeded(4))
    assert [t for t, _ in stored] == ["acme"]
    payload = stored[0][1]
    assert payload["source"] == "first_n"
    assert payload["requests"] == 300
    assert m.reference_payload("acme") == payload
    other = monitor()
    other.load_reference("acme", payload)
    assert other.reference_payload("acme") == payload
    # Tampered payloads are refused.
    with pytest.raises(ValidationError):
        other.load_reference("acme", {**payload, "routed": payload["routed"] + 1})
    with pytest.raises(ValidationError):
        other.load_reference("acme", {**payload, "prompt": payload["prompt"][:-1]})


def test_set_reference_from_the_window_and_reset() -> None:
    rng = seeded(5)
    m = monitor(reference_size=300, window_size=300, min_window=200, evaluate_every=1)
    with pytest.raises(WindowTooSmall):
        m.set_reference("acme")  # nothing seen
    feed(m, BASE, 600, rng)
    feed(m, replace(BASE, mix=SHIFTED_MIX), 400, rng)
    assert alarms(m)["domain_psi"]
    payload = m.set_reference("acme")  # the new mix is the expected one now
    assert payload["source"] == "window"
    assert not any(alarms(m).values())
    assert feed(m, replace(BASE, mix=SHIFTED_MIX), 1000, rng) == 0
    m.reset("acme")
    assert m.reference_payload("acme") is None
    windows = m.windows("acme")
    assert windows is not None
    assert windows.collecting is not None
    feed(m, BASE, 300, rng)  # the next 300 requests are the new reference
    new = m.reference_payload("acme")
    assert new is not None
    assert new["source"] == "first_n"
    assert new["id"] != payload["id"]


def test_sync_follows_references_stored_by_other_replicas() -> None:
    rng = seeded(6)
    a, b = monitor(reference_size=200, window_size=200), monitor(reference_size=200)
    feed(a, BASE, 300, rng)
    feed(b, replace(BASE, mix=SHIFTED_MIX), 300, rng)
    payload = a.set_reference("acme")
    b.sync_references({"acme": payload})  # b adopts a's reference
    assert b.reference_payload("acme") == payload
    b.sync_references({"acme": payload})  # same id: nothing to do
    b.sync_references({})  # removed from the registry: b collects a new one
    assert b.reference_payload("acme") is None
    b.sync_references({"acme": {"id": "x"}})  # malformed: logged, ignored
    assert b.reference_payload("acme") is None


def test_gauges_have_the_contract_names_and_bounded_labels() -> None:
    metrics = GatewayMetrics()
    known = {"acme"}
    m = DriftMonitor(metrics, DriftSettings(reference_size=200, window_size=200, min_window=150),
                     DOMAINS,
                     tenants=lambda: known)  # fmt: skip
    rng = seeded(8)
    feed(m, BASE, 400, rng)
    m.observe("acme", "made-up-domain", 0.9, False, 5, 5, False)  # counted as "other"
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    labels = {
        "loraplex_drift_domain_psi": {"tenant"},
        "loraplex_drift_domain_js": {"tenant"},
        "loraplex_drift_confidence_mean": {"tenant", "window"},
        "loraplex_drift_low_confidence_share": {"tenant", "window"},
        "loraplex_drift_length_psi": {"tenant", "kind"},
        "loraplex_drift_length_ks": {"tenant", "kind"},
        "loraplex_drift_fallback_rate": {"tenant", "window"},
        "loraplex_drift_error_rate": {"tenant", "window"},
        "loraplex_drift_window_requests": {"tenant", "window"},
        "loraplex_drift_alarm": {"tenant", "statistic"},
    }
    for name, keys in labels.items():
        family = families[name]
        assert family.type == "gauge"
        assert family.samples, name
        for s in family.samples:
            assert set(s.labels) == keys
            assert s.labels.get("window", "reference") in ("reference", "current")
            assert s.labels.get("kind", "prompt") in ("prompt", "completion")
    assert {s.labels["statistic"] for s in families["loraplex_drift_alarm"].samples} == set(
        STATISTICS
    )
    get = metrics.registry.get_sample_value
    assert get("loraplex_drift_window_requests", {"tenant": "acme", "window": "reference"}) == 200
    assert get("loraplex_drift_window_requests", {"tenant": "acme", "window": "current"}) == 200
    assert get("loraplex_drift_alarm", {"tenant": "acme", "statistic": "domain_psi"}) == 0
    windows = m.windows("acme")
    assert windows is not None
    assert windows.current.domains["other"] == 1
    known.clear()  # the tenant was deleted: its series go at the next scrape
    assert get("loraplex_drift_window_requests", {"tenant": "acme", "window": "current"}) is None


def test_disabled_monitor_observes_nothing() -> None:
    m = monitor(enabled=False)
    feed_requests = BASE.requests(seeded(0))
    m.observe("acme", *next(feed_requests))
    assert m.tenants() == []


def test_length_bins_are_log2() -> None:
    assert [length_bin(n) for n in (0, 1, 2, 3, 4, 7, 8, 1000, 1 << 15, 10**9)] == [
        0, 1, 2, 2, 3, 3, 4, 10, 16, 16,
    ]  # fmt: skip


def test_settings_refuse_a_min_window_over_the_window() -> None:
    with pytest.raises(ValidationError):
        DriftSettings(window_size=100, min_window=200)
