"""Summary statistics of a level: latency percentiles, throughput, errors by code, goodput.

Percentiles use linear interpolation (numpy's default). Goodput is the rate of requests that
succeeded *and* met every SLO bound that is set (TTFT only applies to streams; ITL is the mean
gap of one request, i.e. time per output token after the first).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from loadtest.driver import LevelRun, RequestResult
from loadtest.scenario import SLO

QUANTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def dist_ms(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and p50/p90/p99 in milliseconds (None when there is no sample)."""
    out: dict[str, float | None] = {"mean": float(np.mean(values)) * 1000 if len(values) else None}
    for q in QUANTILES:
        p = percentile(values, q)
        out[f"p{q}"] = None if p is None else p * 1000
    return out


def meets_slo(r: RequestResult, slo: SLO) -> bool:
    if not r.ok:
        return False
    if slo.e2e_ms is not None and r.e2e * 1000 > slo.e2e_ms:
        return False
    if r.stream:
        if slo.ttft_ms is not None and (r.ttft is None or r.ttft * 1000 > slo.ttft_ms):
            return False
        if slo.itl_ms is not None and r.gaps and float(np.mean(r.gaps)) * 1000 > slo.itl_ms:
            return False
    return True


@dataclass
class LevelSummary:
    mode: str
    level: float
    requests: int
    ok: int
    elapsed_s: float
    rps: float
    output_tokens_per_s: float
    goodput_rps: float
    goodput_fraction: float
    errors: dict[str, int]
    e2e_ms: dict[str, float | None]
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    stream_requests: int
    events: int
    chunks: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(run: LevelRun, slo: SLO) -> LevelSummary:
    res = run.results
    ok = [r for r in res if r.ok]
    elapsed = max(run.elapsed_s, 1e-9)
    good = sum(meets_slo(r, slo) for r in res)
    errors = Counter(r.error or f"http_{r.status}" for r in res if not r.ok)
    streams = [r for r in ok if r.stream]
    return LevelSummary(
        mode=run.mode,
        level=run.level,
        requests=len(res),
        ok=len(ok),
        elapsed_s=run.elapsed_s,
        rps=len(ok) / elapsed,
        output_tokens_per_s=sum(r.output_tokens for r in ok) / elapsed,
        goodput_rps=good / elapsed,
        goodput_fraction=good / len(res) if res else 0.0,
        errors=dict(sorted(errors.items())),
        e2e_ms=dist_ms([r.e2e for r in ok]),
        ttft_ms=dist_ms([r.ttft for r in streams if r.ttft is not None]),
        itl_ms=dist_ms([g for r in streams for g in r.gaps]),
        stream_requests=len(streams),
        events=sum(r.events for r in streams),
        chunks=sum(r.chunks for r in streams),
    )
