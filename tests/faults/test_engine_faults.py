"""The engine process dies: before, during and after streamed responses, and comes back.

A real gateway process in front of the fake engine process (kill -9, then started again on
the same port: it forgets its adapters as vLLM does). Refused connections answer 503 with
Retry-After at once, broken streams end with an SSE error event and [DONE], and once the
engine is back the gateway registers the adapters it lost and serves them again.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import report
from tests.faults.harness import ADAPTER, Engine, Gateway, call, check, new_id, run_all

STREAMS = 8
HEALTH_INTERVAL_S = 1.0


@pytest.fixture(scope="module")
def gateway_env() -> dict[str, str]:
    return {"LORAPLEX_ENGINE__HEALTH_INTERVAL_S": str(HEALTH_INTERVAL_S)}


@pytest.fixture(autouse=True)
def engine_up(engine: Engine, gw: Gateway) -> None:
    """Each test starts with the engine running, no faults, the gateway ready."""
    if engine.proc is None or engine.proc.poll() is not None:
        engine.start()
    engine.faults()
    gw.wait_ready()


def served_name(gw: Gateway) -> str:
    slots = gw.admin.get("/admin/v1/residency").json()["slots"]
    return str(next(s["served_name"] for s in slots if s["adapter"].startswith(ADAPTER)))


def restart_and_recover(engine: Engine, gw: Gateway) -> dict[str, float]:
    """Start the engine again; seconds until it is healthy, until the gateway registered the
    adapter the engine lost again, and until that adapter answers through the gateway."""
    t0 = time.monotonic()
    engine.start()
    healthy = time.monotonic() - t0
    name = served_name(gw)
    deadline = t0 + 2 * HEALTH_INTERVAL_S + 5
    while name not in engine.models():
        assert time.monotonic() < deadline, "the adapter was not registered again"
        time.sleep(0.05)
    registered = time.monotonic() - t0
    gw.wait_ready()
    out = call(gw.client, new_id("recover"), ADAPTER, stream=True)
    assert out.kind == "answer", out
    return {
        "engine_healthy_s": round(healthy, 2),
        "adapter_registered_s": round(registered, 2),
        "served_again_s": round(time.monotonic() - t0, 2),
    }


def test_killed_before_requests_refused_fast_then_restart_reconciles(
    engine: Engine, gw: Gateway
) -> None:
    prefix = new_id("before")
    before = gw.requests_total()
    engine.kill()
    calls = [
        {"rid": f"{prefix}-{i}", "model": ADAPTER if i % 2 else "base", "stream": i % 4 < 2}
        for i in range(20)
    ]
    outcomes = run_all(gw.client, calls)
    for o in outcomes:
        assert (o.kind, o.status, o.code) == ("error", 503, "engine_unavailable"), o
        assert o.retry_after == "1"
        assert o.seconds < 1.0, f"{o.rid} took {o.seconds:.2f} s"
    summary = check(engine, prefix, outcomes, wait_ended=False)
    assert summary["engine_received"] == 0
    assert gw.requests_total() - before == len(calls)  # each accounted once
    ready = httpx.get(f"{gw.url}/readyz", timeout=5)
    assert ready.status_code == 503
    assert ready.headers["retry-after"] == "1"

    recovery = restart_and_recover(engine, gw)
    report(
        "fault: engine killed before requests",
        requests=len(calls),
        status_503=sum(o.status == 503 for o in outcomes),
        max_seconds=round(max(o.seconds for o in outcomes), 3),
        **recovery,
    )


def test_killed_during_streams(engine: Engine, gw: Gateway, tmp_path: Path) -> None:
    """Streams in progress when the engine dies end with an SSE error event and [DONE]."""
    prefix = new_id("during")
    engine.faults(prefix="", event_delay_ms=50, events=60)  # 3 s streams
    before = gw.requests_total()
    ids = [f"{prefix}-{i}" for i in range(STREAMS)]
    with ThreadPoolExecutor(STREAMS) as pool:
        futures = [
            pool.submit(call, gw.client, rid, ADAPTER if i % 2 else "base", True)
            for i, rid in enumerate(ids)
        ]
        engine.wait_events(ids, lambda ev: ev == ["received"])
        time.sleep(0.3)  # a few events on the way to every client
        engine.kill()
        killed = time.monotonic()
        outcomes = [f.result() for f in futures]
    after_kill = max(o.ended for o in outcomes) - killed
    assert after_kill < 1.0, "clients were left hanging"
    for o in outcomes:
        assert o.kind == "error", o
        assert o.status == 200  # the stream had started: the error comes as an SSE event
        assert o.code == "engine_unavailable", o
        assert 0 < o.events < 60
    summary = check(engine, prefix, outcomes, max_attempts=1, wait_ended=False)
    assert summary["engine_received"] == STREAMS
    assert gw.requests_total() - before == STREAMS
    assert gw.in_flight() == 0  # leases released with the broken streams

    recovery = restart_and_recover(engine, gw)
    report(
        "fault: engine killed during streams",
        streams=STREAMS,
        sse_error_then_done=sum(o.kind == "error" for o in outcomes),
        events_before_error=sorted(o.events for o in outcomes),
        ended_within_s_of_kill=round(after_kill, 3),
        **recovery,
    )


def test_killed_after_streams(engine: Engine, gw: Gateway) -> None:
    """Finished streams are untouched; the first requests after the restart are served even
    though the gateway's pooled connections all died with the old engine process."""
    prefix = new_id("after")
    calls = [
        {"rid": f"{prefix}-{i}", "model": ADAPTER if i % 2 else "base", "stream": i % 3 != 0}
        for i in range(12)
    ]
    outcomes = run_all(gw.client, calls)
    assert all(o.kind == "answer" for o in outcomes), outcomes
    check(engine, prefix, outcomes, max_attempts=1)
    engine.kill()
    refused = call(gw.client, f"{prefix}-down", ADAPTER, stream=True)
    assert (refused.status, refused.code) == (503, "engine_unavailable")
    recovery = restart_and_recover(engine, gw)
    again = run_all(
        gw.client,
        [{"rid": f"{prefix}-again-{i}", "stream": i % 2 == 0} for i in range(12)],
    )
    assert all(o.kind == "answer" for o in again), again
    summary = check(engine, prefix, [*outcomes, refused, *again])
    report(
        "fault: engine killed after streams",
        answered_before_kill=len(outcomes),
        answered_after_restart=len(again),
        retried=summary["retried"],
        **recovery,
    )


def test_restart_between_health_probes_is_noticed(engine: Engine, gw: Gateway) -> None:
    """An engine back within one health interval may never look down to the gateway (here:
    the fake forgets its adapters without going away); the watcher still finds what it lost
    (it compares what the engine serves with what it registered) and registers it again."""
    name = served_name(gw)
    t0 = time.monotonic()
    httpx.post(f"{engine.url}/adapters/forget", timeout=5).raise_for_status()
    while name not in engine.models():
        assert time.monotonic() - t0 < 2 * HEALTH_INTERVAL_S + 1, "not registered again"
        time.sleep(0.05)
    registered = time.monotonic() - t0
    out = call(gw.client, new_id("recover"), ADAPTER, stream=True)
    assert out.kind == "answer", out
    report(
        "fault: engine lost its adapters between health probes", registered_s=round(registered, 2)
    )
