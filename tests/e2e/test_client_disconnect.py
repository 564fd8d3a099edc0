"""A client that hangs up on real vLLM through the gateway: the engine stops generating (the
gateway closes the upstream request, vLLM aborts it), and the gateway counts a 499 and frees
the request. Token counts, not times, say so: an answer runs to `MAX_TOKENS` (ignore_eos)
unless it was aborted."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.harness import KEYS, Gateway, report
from tests.promtext import metric

MAX_TOKENS = 1500  # with ignore_eos: many seconds of generation on the CPU engine
LEAVE_AFTER_S = 2.0


def engine_metrics(gw: Gateway) -> str:
    return httpx.get(f"{gw.engine_url}/metrics", timeout=10).text


def gateway_metrics(gw: Gateway) -> str:
    return httpx.get(f"{gw.url}/metrics", timeout=10).text


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_client_leaving_stops_the_engine(gateway: Gateway, stream: bool) -> None:
    tokens_before = metric(engine_metrics(gateway), "vllm:generation_tokens_total")
    left_before = metric(gateway_metrics(gateway), "loraplex_requests_total", status="499")
    body = {
        "model": "medical",
        "messages": [{"role": "user", "content": "Tell me about the heart."}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {KEYS['clinic']}"}
    started = time.monotonic()
    events = 0
    with httpx.Client(base_url=gateway.url, headers=headers) as client:
        if stream:
            with client.stream("POST", "/v1/chat/completions", json=body, timeout=60) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    events += line.startswith("data: ")
                    if events >= 3 and time.monotonic() - started >= LEAVE_AFTER_S:
                        break  # leaving the block closes the connection
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/chat/completions", json=body, timeout=LEAVE_AFTER_S)
    left_at = time.monotonic()

    deadline = left_at + 30
    while True:
        text = engine_metrics(gateway)
        idle = metric(text, "vllm:num_requests_running") + metric(text, "vllm:num_requests_waiting")
        if idle == 0:
            break
        assert time.monotonic() < deadline, "the engine kept generating for the gone client"
        time.sleep(0.1)
    engine_idle_after_s = time.monotonic() - left_at
    generated = metric(text, "vllm:generation_tokens_total") - tokens_before
    assert 0 < generated < MAX_TOKENS, generated  # started, and stopped before the end

    gw_text = gateway_metrics(gateway)
    deadline = time.monotonic() + 10
    while metric(gw_text, "loraplex_requests_total", status="499") < left_before + 1:
        assert time.monotonic() < deadline, "the gateway did not count the 499"
        time.sleep(0.1)
        gw_text = gateway_metrics(gateway)
    assert metric(gw_text, "loraplex_in_flight_requests") == 0
    report(
        f"client disconnect against real vLLM ({'stream' if stream else 'json'})",
        left_after_s=round(left_at - started, 2),
        events_read=events,
        engine_idle_after_s=round(engine_idle_after_s, 2),
        tokens_generated=int(generated),
        max_tokens=MAX_TOKENS,
    )
