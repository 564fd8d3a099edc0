"""Synthetic tenant traffic for the drift monitor, and the measurement docs/drift.md reports.

A request population is a domain mix (None: nothing claimed the request), a router confidence
distribution, lognormal prompt and completion lengths and an error rate. `python -m
tests.drift_traffic [stationary seeds] [shift seeds]` runs the monitor with its default settings
on 5 000 stationary requests per seed (false alarms), then each shift after 5 000 stationary
requests (detection delay).
"""

from __future__ import annotations

import logging
import random
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from server.telemetry.drift import DriftMonitor, DriftSettings
from server.telemetry.metrics import GatewayMetrics

DOMAINS = ["medical", "legal", "finance", "code", "general"]
BASE_MIX = {"medical": 0.2, "legal": 0.2, "finance": 0.15, "code": 0.15, "general": 0.2, None: 0.1}
# medical 20% → 60%, the rest scaled down in proportion.
SHIFTED_MIX = {d: (0.6 if d == "medical" else p * 0.4 / 0.8) for d, p in BASE_MIX.items()}


def seeded(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 - reproducible synthetic traffic, not a secret


@dataclass(frozen=True)
class Traffic:
    """A tenant's request population: domain mix, router confidence, token lengths, errors."""

    mix: dict[str | None, float]
    confidence: tuple[float, float] = (8.0, 3.0)  # Beta(a, b) for claimed domains
    prompt_log_mean: float = 4.0  # lognormal prompt tokens, median ~55
    completion_log_mean: float = 5.0
    error_rate: float = 0.01
    routed_share: float = 1.0  # the rest name an adapter (no routing decision)

    def requests(self, rng: random.Random) -> Iterator[tuple[Any, ...]]:
        """`DriftMonitor.observe` arguments after the tenant, one request at a time."""
        names, weights = list(self.mix), list(self.mix.values())
        while True:
            error = rng.random() < self.error_rate
            prompt = 0 if error else int(rng.lognormvariate(self.prompt_log_mean, 0.8)) + 1
            completion = 0 if error else int(rng.lognormvariate(self.completion_log_mean, 0.7))
            if rng.random() >= self.routed_share:
                yield (None, None, False, prompt, completion, error)
                continue
            domain = rng.choices(names, weights)[0]
            if domain is None:  # nothing claimed it: low confidence, fallback
                confidence = rng.uniform(0.0, 0.4)
            else:
                confidence = rng.betavariate(*self.confidence)
            yield (domain, confidence, domain in (None, "general"), prompt, completion, error)


BASE = Traffic(BASE_MIX)
SHIFTS: dict[str, Traffic] = {
    "domain_psi": replace(BASE, mix=SHIFTED_MIX),
    "prompt_length": replace(BASE, prompt_log_mean=5.5),  # prompts ~4.5x longer
    "completion_length": replace(BASE, completion_log_mean=3.5),
    "confidence": replace(BASE, confidence=(3.0, 3.0)),  # mean 0.73 → 0.5
    "fallback_rate": replace(BASE, mix={**BASE_MIX, "general": 0.5, "code": 0.0}),
    "error_rate": replace(BASE, error_rate=0.12),
}


def stationary(seed: int, n: int = 5000) -> tuple[DriftMonitor, int, float]:
    """`n` requests of BASE with the default settings: the monitor, how many alarms were
    raised (any statistic) and the largest domain PSI seen."""
    m = DriftMonitor(GatewayMetrics(), DriftSettings(), DOMAINS)
    requests = BASE.requests(seeded(seed))
    raised, psi_max, before = 0, 0.0, 0
    for _ in range(n):
        m.observe("acme", *next(requests))
        windows = m.windows("acme")
        assert windows is not None
        on = sum(windows.alarms.values())
        raised += max(on - before, 0)
        before = on
        if windows.comparison is not None and windows.comparison.domain_psi is not None:
            psi_max = max(psi_max, windows.comparison.domain_psi)
    return m, raised, psi_max


def detection_delay(seed: int, statistic: str, limit: int = 2000) -> int | None:
    """After 5 000 stationary requests, shifted requests until `statistic` alarms."""
    m, _, _ = stationary(seed)
    requests = SHIFTS[statistic].requests(seeded(seed + 10_000))
    for i in range(1, limit + 1):
        m.observe("acme", *next(requests))
        windows = m.windows("acme")
        assert windows is not None
        if windows.alarms[statistic]:
            return i
    return None


def main(stationary_seeds: int = 100, shift_seeds: int = 20) -> None:
    logging.getLogger("loraplex.drift").setLevel(logging.ERROR)
    runs = [stationary(seed) for seed in range(stationary_seeds)]
    print(
        f"stationary: {stationary_seeds} x 5000 requests, alarms raised "
        f"{sum(r[1] for r in runs)}, largest domain PSI {max(r[2] for r in runs):.3f}"
    )
    for statistic in SHIFTS:
        delays = [detection_delay(seed, statistic) for seed in range(shift_seeds)]
        found = [d for d in delays if d is not None]
        print(
            f"{statistic:18} detected {len(found)}/{shift_seeds}, delay (requests) "
            f"min/median/max {min(found)}/{statistics.median(found):.0f}/{max(found)}"
        )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
