"""Retries (server/upstream.py): only before the response headers, only for attempts the
engine refused (503) or never got (connection refused, or closed before the headers), at most
`engine.retries` (1) more, after a jittered backoff. Anything the engine may have started on —
a timeout, a 500, a stream broken mid-way — is never tried again."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from tests.e2e.harness import report
from tests.faults.harness import ADAPTER, Engine, Gateway, call, check, new_id, run_all

N = 6


pytestmark = pytest.mark.usefixtures("no_faults")


def one_by_one(engine: Engine, gw: Gateway, prefix: str, **fault: Any) -> list[Any]:
    """N requests (streams and not, adapter and base), each after arming `fault` afresh."""
    out = []
    for i in range(N):
        engine.faults(prefix="", **fault)
        out.append(call(gw.client, f"{prefix}-{i}", ADAPTER if i % 2 else "base", i % 3 != 0))
    return out


def retry_gaps(engine: Engine, ids: list[str]) -> list[float]:
    """Seconds between the end of each refused attempt and the next attempt's arrival."""
    gaps, ended = [], {}
    for entry in engine.entries():
        rid = entry["id"]
        if rid not in ids:
            continue
        if entry["event"] in ("error", "dropped"):
            ended[rid] = entry["t"]
        elif entry["event"] == "received" and rid in ended:
            gaps.append(entry["t"] - ended.pop(rid))
    return gaps


@pytest.mark.parametrize(
    "fault",
    [
        {"error_rate": 1, "status": 503, "times": 1},
        {"drop": "before_headers", "times": 1},
    ],
    ids=["503-once", "reset-before-headers-once"],
)
def test_refused_once_is_retried_and_answered(
    engine: Engine, gw: Gateway, fault: dict[str, Any]
) -> None:
    prefix = new_id("retry-ok")
    retried_before = sum(gw.runtime()["engine_retries"].values())
    outcomes = one_by_one(engine, gw, prefix, **fault)
    assert all(o.kind == "answer" for o in outcomes), outcomes
    summary = check(engine, prefix, outcomes, max_attempts=2)
    assert summary["retried"] == N  # each exactly once: one refusal, one generation
    assert sum(gw.runtime()["engine_retries"].values()) - retried_before == N
    gaps = retry_gaps(engine, [o.rid for o in outcomes])
    assert len(gaps) == N
    assert max(gaps) < 0.25  # backoff ≤ retry_backoff_s (0.05) + scheduling
    report(
        f"fault: engine refused once ({'503' if 'status' in fault else 'reset'}), retried",
        requests=N,
        answered=summary["answer"],
        engine_generations=N,
        retry_gap_ms=[round(g * 1000, 1) for g in sorted(gaps)],
    )


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ({"error_rate": 1, "status": 503}, 503, "engine_unavailable"),
        ({"drop": "before_headers"}, 503, "engine_unavailable"),
    ],
    ids=["503-always", "reset-always"],
)
def test_retries_are_bounded(
    engine: Engine, gw: Gateway, fault: dict[str, Any], status: int, code: str
) -> None:
    prefix = new_id("retry-bounded")
    engine.faults(prefix="", **fault)
    before = gw.requests_total()
    outcomes = run_all(
        gw.client, [{"rid": f"{prefix}-{i}", "stream": i % 2 == 0} for i in range(N)]
    )
    for o in outcomes:
        assert (o.kind, o.status, o.code, o.retry_after) == ("error", status, code, "1"), o
        assert o.seconds < 1.0
    assert gw.requests_total() - before == N  # retries are not requests of their own
    summary = check(engine, prefix, outcomes, max_attempts=2)
    assert summary["engine_received"] == 2 * N  # one retry each, no more
    gaps = retry_gaps(engine, [o.rid for o in outcomes])
    report(
        f"fault: engine refuses every attempt ({fault})",
        requests=N,
        engine_attempts=summary["engine_received"],
        client_status=status,
        max_seconds=round(max(o.seconds for o in outcomes), 3),
        retry_gap_ms_mean_sd=(
            round(statistics.mean(gaps) * 1000, 1),
            round(statistics.stdev(gaps) * 1000, 1),
        ),
    )
    assert statistics.stdev(gaps) > 0  # jittered, not in lockstep


@pytest.mark.parametrize(
    ("fault", "stream", "status", "code"),
    [
        ({"error_rate": 1, "status": 500}, False, 502, "upstream_error"),
        ({"error_rate": 1, "status": 500}, True, 502, "upstream_error"),
        ({"drop": "mid_stream", "after_events": 3}, True, 200, "engine_unavailable"),
    ],
    ids=["500-json", "500-stream", "reset-mid-stream"],
)
def test_not_retried_once_the_engine_may_have_started(
    engine: Engine, gw: Gateway, fault: dict[str, Any], stream: bool, status: int, code: str
) -> None:
    prefix = new_id("no-retry")
    engine.faults(prefix="", **fault)
    outcomes = run_all(gw.client, [{"rid": f"{prefix}-{i}", "stream": stream} for i in range(N)])
    for o in outcomes:
        assert (o.kind, o.status, o.code) == ("error", status, code), o
    summary = check(engine, prefix, outcomes, max_attempts=1)
    assert summary["retried"] == 0
    if status == 200:
        assert all(o.events == 3 for o in outcomes)  # the events sent before the break
