"""A slow engine: the gateway answers 504 `upstream_timeout` after its read timeout and closes
the upstream request (the fake engine sees its connection go), never retrying it.

The gateway runs with `engine.read_timeout_s=1` (silence allowed between bytes) and
`engine.request_timeout_s=2` (a non-streamed answer's total); a stream that keeps moving is
not cut by the total, only a silent one.
"""

from __future__ import annotations

import pytest

from tests.e2e.harness import report
from tests.faults.harness import ADAPTER, Engine, Gateway, check, new_id, run_all

READ_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def gateway_env() -> dict[str, str]:
    return {
        "LORAPLEX_ENGINE__READ_TIMEOUT_S": str(READ_TIMEOUT_S),
        "LORAPLEX_ENGINE__REQUEST_TIMEOUT_S": "2",
    }


pytestmark = pytest.mark.usefixtures("no_faults")


def calls(prefix: str, n: int, stream: bool) -> list[dict[str, object]]:
    return [
        {"rid": f"{prefix}-{i}", "model": ADAPTER if i % 2 else "base", "stream": stream}
        for i in range(n)
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_no_answer_in_time_is_504_and_upstream_cancelled(
    engine: Engine, gw: Gateway, stream: bool
) -> None:
    """No response headers within the read timeout (a stream's too: nothing was sent yet,
    so the client gets a plain 504 JSON error rather than an SSE event)."""
    prefix = new_id("slow")
    engine.faults(prefix="", delay_ms=5000)
    baseline = gw.runtime()
    before = gw.requests_total()
    outcomes = run_all(gw.client, calls(prefix, 6, stream))
    assert gw.requests_total() - before == len(outcomes)  # each accounted once
    for o in outcomes:
        assert (o.kind, o.status, o.code) == ("error", 504, "upstream_timeout"), o
        assert READ_TIMEOUT_S <= o.seconds < READ_TIMEOUT_S + 0.75, o.seconds
    ids = [o.rid for o in outcomes]
    journal = engine.wait_events(ids, lambda ev: ev == ["received", "aborted"], timeout_s=3)
    engine_side = engine.durations(ids)
    # The engine saw the connection close at the gateway's timeout, not after its 5 s.
    assert max(engine_side.values()) < READ_TIMEOUT_S + 0.75, engine_side
    summary = check(engine, prefix, outcomes, max_attempts=1)  # timeouts are never retried
    assert summary["engine_received"] == len(outcomes)
    after = gw.settle(baseline)
    assert after["engine_connections"]["in_use"] == 0
    assert after["leases_in_flight"] == 0
    report(
        f"fault: slow engine, no headers ({'stream' if stream else 'json'})",
        requests=len(outcomes),
        status_504=sum(o.status == 504 for o in outcomes),
        client_seconds_max=round(max(o.seconds for o in outcomes), 3),
        engine_saw_close_after_s_max=round(max(engine_side.values()), 3),
        engine_aborted=sum(journal[i][-1] == "aborted" for i in ids),
    )


def test_stalled_stream_ends_with_timeout_event(engine: Engine, gw: Gateway) -> None:
    """A stream that stops moving mid-way: SSE error `upstream_timeout`, then [DONE]."""
    prefix = new_id("stall")
    engine.faults(prefix="", after_events=4, stall_ms=5000)
    outcomes = run_all(gw.client, calls(prefix, 6, True))
    for o in outcomes:
        assert (o.kind, o.status, o.code, o.events) == ("error", 200, "upstream_timeout", 4), o
        assert o.seconds < READ_TIMEOUT_S + 0.75
    ids = [o.rid for o in outcomes]
    engine.wait_events(ids, lambda ev: ev == ["received", "aborted"], timeout_s=3)
    engine_side = engine.durations(ids)
    assert max(engine_side.values()) < READ_TIMEOUT_S + 0.75, engine_side
    check(engine, prefix, outcomes, max_attempts=1)
    assert gw.in_flight() == 0
    report(
        "fault: stream stalls mid-way",
        streams=len(outcomes),
        events_then_error=sorted({o.events for o in outcomes}),
        engine_saw_close_after_s_max=round(max(engine_side.values()), 3),
    )


def test_slow_but_steady_stream_is_not_cut(engine: Engine, gw: Gateway) -> None:
    """Events every 0.3 s for 3 s: past `request_timeout_s` (2 s) but never silent for the
    read timeout, so the stream completes."""
    prefix = new_id("steady")
    engine.faults(prefix="", event_delay_ms=300, events=11)
    outcomes = run_all(gw.client, calls(prefix, 4, True))
    assert all(o.kind == "answer" and o.events == 11 for o in outcomes), outcomes
    assert min(o.seconds for o in outcomes) > 2.0
    check(engine, prefix, outcomes, max_attempts=1)
