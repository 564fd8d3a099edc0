"""Engine failures before the first byte map to stable gateway errors; nothing engine-internal
(served names, raw 5xx bodies) reaches the client."""

from __future__ import annotations

import httpx
import orjson
import pytest

from server.errors import EngineUnavailable, UpstreamError, UpstreamTimeout
from tests.unit.conftest import Config
from tests.unit.fakes import SECRET_SERVED_NAME, Answer, FakeEngine, StreamScript, vllm_404_body
from tests.unit.helpers import (
    Gateway,
    assert_error,
    metric,
    running_gateway,
    version,
)

SECRET = b'{"error":{"message":"Traceback ... /srv/secret/path.py CUDA OOM"}}'


def _no_leak(resp: httpx.Response) -> None:
    text = resp.text
    for leaked in (SECRET_SERVED_NAME, "finance", "Valid aliases", "secret/path", "Traceback"):
        assert leaked not in text, text


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_unavailable_is_503_with_retry_after(gw: Gateway, stream: bool) -> None:
    exc = EngineUnavailable("The inference engine is not reachable.", retry_after_s=3)
    if stream:
        gw.engine.streams_script.append(StreamScript(raise_on_open=exc))
    else:
        gw.engine.answers.append(Answer(raise_exc=exc))
    resp = await gw.chat(stream=stream)
    assert_error(resp, 503, "engine_unavailable", type_="server_error")
    assert resp.headers["retry-after"] == "3"


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_timeout_is_504(gw: Gateway, stream: bool) -> None:
    exc = UpstreamTimeout("The inference engine did not answer in time.")
    if stream:
        gw.engine.streams_script.append(StreamScript(raise_on_open=exc))
    else:
        gw.engine.answers.append(Answer(raise_exc=exc))
    resp = await gw.chat(stream=stream)
    assert_error(resp, 504, "upstream_timeout")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [500, 502, 507])
async def test_engine_5xx_is_502_without_engine_text(
    gw: Gateway, stream: bool, status: int
) -> None:
    if stream:
        gw.engine.streams_script.append(StreamScript(status=status, error_body=SECRET))
    else:
        gw.engine.answers.append(Answer(status, SECRET))
    resp = await gw.chat(stream=stream)
    assert_error(resp, 502, "upstream_error")
    _no_leak(resp)
    if stream:
        assert gw.engine.streams[0].body_read
        assert gw.engine.streams[0].closed


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_503_is_our_503_with_retry_after(gw: Gateway, stream: bool) -> None:
    if stream:
        gw.engine.streams_script.append(StreamScript(status=503, error_body=SECRET))
    else:
        gw.engine.answers.append(Answer(503, SECRET))
    resp = await gw.chat(stream=stream)
    assert_error(resp, 503, "engine_unavailable")
    assert resp.headers["retry-after"] == "3"
    _no_leak(resp)


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_400_is_400_with_engine_message(gw: Gateway, stream: bool) -> None:
    body = orjson.dumps({"error": {"message": "max_tokens is too large: 99999", "code": 400}})
    if stream:
        gw.engine.streams_script.append(StreamScript(status=400, error_body=body))
    else:
        gw.engine.answers.append(Answer(400, body))
    resp = await gw.chat(stream=stream, max_tokens=99999)
    err = assert_error(resp, 400, "invalid_request")
    assert err["message"] == "max_tokens is too large: 99999"


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_404_never_leaks_served_names(gw: Gateway, stream: bool) -> None:
    served = gw.engine.served | {"finance"}
    body = vllm_404_body("legal", served)
    assert SECRET_SERVED_NAME.encode() in body
    for _ in range(2):  # the gateway registers the adapter again and retries once
        if stream:
            gw.engine.streams_script.append(StreamScript(status=404, error_body=body))
        else:
            gw.engine.answers.append(Answer(404, body))
    resp = await gw.chat(stream=stream)
    err = assert_error(resp, 404, "model_not_found", param="model")
    assert "legal" in err["message"]
    _no_leak(resp)


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_404_for_routable_adapter_registers_it_again_and_retries(
    config: Config, engine: FakeEngine, stream: bool
) -> None:
    """The engine lost an adapter behind the gateway's back (a restart between health checks,
    or another gateway replica evicting it): the request registers it again and is retried
    once, so the client sees an answer, not a 404."""
    settings = config.settings(engine={"health_interval_s": 30.0})
    async with running_gateway(settings, engine) as gw:
        legal = version(gw, "legal")
        call = (legal.served_name, legal.path)
        loads_before = engine.load_calls.count(call)
        assert loads_before == 1  # registered once, at bootstrap
        engine.restart()
        resp = await gw.chat(model="legal", stream=stream)
        assert resp.status_code == 200
        assert engine.load_calls.count(call) == loads_before + 1
        assert legal.served_name in engine.served
        models = [f.body["model"] for f in engine.forwarded[-2:]]
        assert models == [legal.served_name, legal.served_name]  # the 404, then the retry
        assert (await gw.chat(model="legal")).status_code == 200
        assert engine.load_calls.count(call) == loads_before + 1


async def test_upstream_error_class_maps_to_502(gw: Gateway) -> None:
    gw.engine.answers.append(Answer(raise_exc=UpstreamError("connection reset")))
    resp = await gw.chat()
    assert_error(resp, 502, "upstream_error")


async def test_errors_counted_by_code(gw: Gateway) -> None:
    before = await gw.metrics()
    gw.engine.answers.append(Answer(raise_exc=UpstreamTimeout("slow")))
    gw.engine.answers.append(Answer(raise_exc=UpstreamTimeout("slow")))
    await gw.chat()
    await gw.chat()
    after = await gw.metrics()
    name = "loraplex_errors_total"
    labels = {"tenant": "acme", "code": "upstream_timeout"}
    assert metric(after, name, **labels) - metric(before, name, **labels) == 2
    req = "loraplex_requests_total"
    rl = {"tenant": "acme", "adapter": "legal", "status": "504", "endpoint": "chat"}
    assert metric(after, req, **rl) - metric(before, req, **rl) == 2
    assert metric(after, "loraplex_in_flight_requests", tenant="acme") == 0


async def test_unexpected_exception_is_500_internal_error(
    config: Config, engine: FakeEngine
) -> None:
    async with running_gateway(config.settings(), engine, raise_app_exceptions=False) as gw:
        gw.engine.answers.append(Answer(raise_exc=RuntimeError("secret internals")))
        before = await gw.metrics()
        resp = await gw.chat(headers={"X-Request-Id": "req-500"})
        err = assert_error(resp, 500, "internal_error", type_="server_error")
        assert "secret" not in err["message"]
        assert resp.headers["x-request-id"] == "req-500"
        after = await gw.metrics()
        # The request is still accounted for and no longer in flight.
        assert metric(after, "loraplex_in_flight_requests", tenant="acme") == 0
        assert (
            metric(after, "loraplex_errors_total", code="internal_error")
            - metric(before, "loraplex_errors_total", code="internal_error")
            == 1
        )
