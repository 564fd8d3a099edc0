"""Health, metrics exposition, and routing errors in the gateway's error shape."""

from __future__ import annotations

import pytest

from tests.unit.conftest import Config
from tests.unit.fakes import FakeEngine
from tests.unit.helpers import ACME_KEY, Gateway, assert_error, auth, metric, running_gateway


async def test_healthz_ok_even_without_engine(config: Config, engine: FakeEngine) -> None:
    engine.healthy = False
    async with running_gateway(config.settings(), engine, wait_ready=False) as gw:
        resp = await gw.client.get("/healthz")
        assert resp.status_code == 200
        assert resp.json() == {"status": "ok"}
        assert_error(await gw.client.get("/readyz"), 503, "engine_unavailable")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("POST", "/v1/embeddings"),
        ("GET", "/admin/v1/nothing-here"),
        ("GET", "/v1/chat/completions/extra"),
    ],
)
async def test_unknown_route_is_404_in_error_shape(gw: Gateway, method: str, path: str) -> None:
    resp = await gw.client.request(method, path, headers=auth(ACME_KEY))
    assert_error(resp, 404, "not_found", param=None)
    assert "x-request-id" in resp.headers


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/completions", "POST"),
        ("POST", "/v1/models", "GET"),
        ("POST", "/healthz", "GET"),
        ("DELETE", "/metrics", "GET"),
    ],
)
async def test_wrong_method_is_405_in_error_shape(
    gw: Gateway, method: str, path: str, allow: str
) -> None:
    resp = await gw.client.request(method, path, headers=auth(ACME_KEY))
    assert_error(resp, 405, "method_not_allowed")
    assert resp.headers["allow"] == allow


async def test_metrics_exposition(config: Config, engine: FakeEngine) -> None:
    """A gateway started from an empty registry: the bootstrap registrations show up."""
    async with running_gateway(config.settings(), engine) as gw:
        await gw.chat()
        # Gauges are set at the end of a watcher round: wait for the round after readiness.
        await gw.wait_gauge("loraplex_adapters_resident", 3)
        await gw.wait_gauge("loraplex_adapter_versions", 3, state="ready")
        resp = await gw.client.get("/metrics")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        text = resp.text
        for name in (
            "loraplex_requests_total",
            "loraplex_errors_total",
            "loraplex_request_duration_seconds_bucket",
            "loraplex_time_to_first_token_seconds",
            "loraplex_inter_token_latency_seconds",
            "loraplex_prompt_tokens_total",
            "loraplex_completion_tokens_total",
            "loraplex_in_flight_requests",
            "loraplex_adapter_operations_total",
            "loraplex_adapter_operation_seconds_bucket",
            "loraplex_adapter_residency_events_total",
            "loraplex_adapter_load_seconds_bucket",
            "loraplex_adapters_resident",
            "loraplex_adapter_versions",
            "loraplex_engine_up",
        ):
            assert name in text, name
        # Bootstrap registered legal, medical and finance (one smoke generation each);
        # the engine refused broken, whose version is stored as rejected.
        ops = "loraplex_adapter_operations_total"
        assert metric(text, ops, result="load") == 3
        assert metric(text, ops, adapter="broken", result="load_error") == 1
        events = "loraplex_adapter_residency_events_total"
        assert metric(text, events, event="load") == 3
        assert metric(text, events, event="load_error") == 1
        assert metric(text, events, event="miss") == 4  # each smoke test's first lease
        assert metric(text, events, adapter="legal", event="hit") == 1  # the chat above
        assert metric(text, "loraplex_adapter_load_seconds_count") == 3
        assert metric(text, "loraplex_adapters_resident") == 3
        assert metric(text, "loraplex_adapter_versions", state="ready") == 3
        assert metric(text, "loraplex_adapter_versions", state="rejected") == 1
        assert metric(text, "loraplex_adapter_versions", state="retired") == 0
        assert metric(text, "loraplex_engine_up") == 1


async def test_non_stream_metrics_move_by_the_right_amounts(gw: Gateway) -> None:
    before = await gw.metrics()
    for _ in range(3):
        assert (await gw.chat(model="medical")).status_code == 200
    assert_error(await gw.chat(model="nope"), 404, "model_not_found")
    after = await gw.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    ok = {"tenant": "acme", "adapter": "medical", "endpoint": "chat"}
    assert delta("loraplex_requests_total", **ok, status="200") == 3
    assert delta("loraplex_request_duration_seconds_count", **ok, stream="False") == 3
    assert delta("loraplex_prompt_tokens_total", tenant="acme", adapter="medical") == 21
    assert delta("loraplex_completion_tokens_total", tenant="acme", adapter="medical") == 9
    # No TTFT for non-streamed answers.
    assert delta("loraplex_time_to_first_token_seconds_count") == 0
    # The unknown name is never used as a label value.
    assert delta("loraplex_requests_total", tenant="acme", adapter="none", status="404") == 1
    assert delta("loraplex_errors_total", tenant="acme", code="model_not_found") == 1
    assert 'adapter="nope"' not in after
    assert metric(after, "loraplex_in_flight_requests", tenant="acme") == 0


async def test_two_apps_have_independent_registries(config: Config) -> None:
    async with (
        running_gateway(config.settings(), FakeEngine()) as a,
        running_gateway(config.settings(), FakeEngine()) as b,
    ):
        await a.chat()
        assert metric(await a.metrics(), "loraplex_requests_total") == 1
        assert metric(await b.metrics(), "loraplex_requests_total") == 0


async def test_engine_client_closed_on_shutdown(config: Config, engine: FakeEngine) -> None:
    async with running_gateway(config.settings(), engine):
        assert not engine.closed
    assert engine.closed


async def test_openapi_documents_the_routes(gw: Gateway) -> None:
    resp = await gw.client.get("/openapi.json")
    assert resp.status_code == 200
    paths = resp.json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/admin/v1/adapters"):
        assert path in paths
    chat = paths["/v1/chat/completions"]["post"]
    assert "messages" in str(chat["requestBody"])
