"""Clients that hang up: the gateway closes the upstream request (the fake engine sees its
connection go, so vLLM would abort the generation), releases the adapter lease, and leaves no
asyncio task, file descriptor or engine connection behind."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.harness import report
from tests.faults.harness import (
    ADAPTER,
    Engine,
    Gateway,
    body,
    check,
    new_id,
    run_all,
)

CLIENTS = 10
ENGINE_DELAY_MS = 3000


pytestmark = pytest.mark.usefixtures("no_faults")


def warm_up(gw: Gateway) -> dict[str, object]:
    """A few full requests first, so pools and caches exist before the baseline is read."""
    outcomes = run_all(gw.client, [{"rid": new_id("warm"), "stream": True} for _ in range(4)])
    assert all(o.kind == "answer" for o in outcomes)
    time.sleep(0.2)
    return gw.runtime()


def test_stream_disconnect_aborts_upstream_and_frees_everything(
    engine: Engine, gw: Gateway
) -> None:
    baseline = warm_up(gw)
    fds_before = gw.open_fds()
    disconnected_before = gw.metric("loraplex_requests_total", status="499")
    prefix = new_id("leave")
    engine.faults(prefix="", event_delay_ms=100, events=50)  # 5 s streams
    calls = [
        {"rid": f"{prefix}-{i}", "model": ADAPTER if i % 2 else "base", "leave_after": 3}
        for i in range(CLIENTS)
    ]
    outcomes = run_all(gw.client, calls)
    assert all(o.kind == "left" and o.events == 3 for o in outcomes), outcomes
    left_at = max(o.ended for o in outcomes)
    ids = [o.rid for o in outcomes]
    engine.wait_events(ids, lambda ev: ev == ["received", "aborted"], timeout_s=3)
    aborted_within = time.monotonic() - left_at
    engine_side = engine.durations(ids)
    assert max(engine_side.values()) < 2.0, engine_side  # not the 5 s of the full stream
    after = gw.settle(baseline, fds=True)
    fds_after = gw.open_fds()
    assert after["leases_in_flight"] == 0
    assert gw.in_flight() == 0  # /admin/v1/residency agrees
    assert after["engine_connections"]["in_use"] == 0
    assert after["tasks"] <= baseline["tasks"], (baseline, after)
    assert after["open_fds"] <= baseline["open_fds"], (baseline, after)
    assert fds_after <= fds_before, (fds_before, fds_after)
    summary = check(engine, prefix, outcomes, max_attempts=1)
    assert summary["left"] == CLIENTS
    disconnected = gw.metric("loraplex_requests_total", status="499") - disconnected_before
    assert disconnected == CLIENTS
    report(
        "fault: clients disconnect mid-stream",
        clients=CLIENTS,
        engine_aborted=sum(engine.events()[i][-1] == "aborted" for i in ids),
        engine_saw_close_within_s=round(aborted_within, 3),
        counted_499=disconnected,
        tasks_before_after=(baseline["tasks"], after["tasks"]),
        fds_before_after=(fds_before, fds_after),
        leases_in_flight_after=after["leases_in_flight"],
    )


def test_json_request_disconnect_aborts_upstream_and_frees_the_lease(
    engine: Engine, gw: Gateway
) -> None:
    """A client that gives up on a non-streamed request while the engine works on it: the
    gateway closes the upstream request at once (vLLM aborts the generation) and releases the
    lease and everything else (server/disconnects.py)."""
    baseline = warm_up(gw)
    disconnected_before = gw.metric("loraplex_requests_total", status="499")
    prefix = new_id("leave-json")
    engine.faults(prefix="", delay_ms=ENGINE_DELAY_MS)
    ids = [f"{prefix}-{i}" for i in range(4)]
    for rid in ids:
        with pytest.raises(httpx.ReadTimeout):
            gw.client.post("/v1/chat/completions", json=body(rid, ADAPTER, False), timeout=0.3)
    engine.wait_events(ids, lambda ev: ev == ["received", "aborted"], timeout_s=5)
    engine_side = engine.durations(ids)
    assert max(engine_side.values()) < ENGINE_DELAY_MS / 1000 / 2, engine_side
    after = gw.settle(baseline)
    assert after["leases_in_flight"] == 0
    assert after["engine_connections"]["in_use"] == 0
    assert after["tasks"] <= baseline["tasks"], (baseline, after)
    disconnected = gw.metric("loraplex_requests_total", status="499") - disconnected_before
    assert disconnected == len(ids)
    report(
        "fault: clients disconnect from a non-streamed request",
        clients=len(ids),
        engine_outcomes=[engine.events()[i][-1] for i in ids],
        engine_side_s=sorted(round(v, 2) for v in engine_side.values()),
        counted_499=disconnected,
        leases_in_flight_after=after["leases_in_flight"],
    )
