"""Per-tenant limits (concurrency, caps on max_tokens / n / best_of), the request timeout and the
maximum stream duration, in-process over the fake engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from adapters.registry import Quotas, TenantRecord
from server.auth import hash_key, read_tenants_file
from server.deadlines import _SWEEPERS, RequestTimeout, _Sweeper, within
from tests.unit.conftest import Bootstrapped, Config
from tests.unit.fakes import Answer, FakeEngine, StreamScript, stream_chunks
from tests.unit.helpers import (
    ADMIN_KEY,
    ASGIClient,
    Gateway,
    assert_error,
    assert_error_payload,
    auth,
    metric,
    running_gateway,
    served,
    sse_data,
    wait_until,
)

ADMIN = auth(ADMIN_KEY)
CHAT = {"messages": [{"role": "user", "content": "hi"}], "model": "medical"}

GatewayFactory = Callable[..., contextlib.AbstractAsyncContextManager[Gateway]]


@pytest.fixture
def make_gw(config: Config, engine: FakeEngine, bootstrapped: Bootstrapped) -> GatewayFactory:
    """Like the `gw` fixture, with settings overridden (timeouts)."""

    @contextlib.asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Gateway]:
        shutil.copyfile(bootstrapped.db, config.root / "registry.db")
        engine.served |= bootstrapped.served
        settings = config.settings(adapters_file=None, **overrides)
        async with running_gateway(settings, engine) as gateway:
            yield gateway

    return start


async def tenant(gw: Gateway, **quotas: int) -> str:
    """A tenant "gamma" (medical, legal) with these quotas; returns its key."""
    resp = await gw.client.post(
        "/admin/v1/tenants",
        json={"name": "gamma", "adapters": ["medical", "legal"], "quotas": quotas},
        headers=ADMIN,
    )
    assert resp.status_code == 201, resp.text
    key: str = resp.json()["api_key"]
    return key


def stream_body(**extra: Any) -> bytes:
    return orjson.dumps({**CHAT, "stream": True, **extra})


def asgi(gw: Gateway, key: str, body: bytes) -> ASGIClient:
    headers = [
        (b"authorization", f"Bearer {key}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    return ASGIClient(gw, body, headers=headers)


# ---- concurrency ------------------------------------------------------------------------------


async def test_concurrency_limit_is_429_with_retry_after_and_slots_come_back(gw: Gateway) -> None:
    key = await tenant(gw, max_concurrent=2)
    scripts = [
        StreamScript(events=stream_chunks("m", ["a", "b"], with_usage=False), block_after=1)
        for _ in range(2)
    ]
    gw.engine.streams_script.extend(scripts)
    clients = [asgi(gw, key, stream_body()) for _ in range(2)]
    tasks = [c.run() for c in clients]
    await wait_until(lambda: all(len(c.bodies()) == 1 for c in clients), what="2 streams open")
    assert gw.state.quotas.in_flight("gamma") == 2

    refused = await gw.chat(key, model="medical")
    err = assert_error(refused, 429, "concurrency_limit_exceeded", type_="rate_limit_error")
    assert "2" in err["message"]
    assert refused.headers["retry-after"] == "1"
    assert len(gw.engine.forwarded) == 2  # the refused one never reached the engine
    # Another tenant is not limited by gamma's slots.
    assert (await gw.chat(model="medical")).status_code == 200

    scripts[0].release.set()
    async with asyncio.timeout(3):
        await tasks[0]
    assert gw.state.quotas.in_flight("gamma") == 1
    assert (await gw.chat(key, model="medical")).status_code == 200  # a slot is free again
    clients[1].disconnect.set()  # a disconnect gives its slot back too
    async with asyncio.timeout(3):
        await tasks[1]
    assert gw.state.quotas.in_flight("gamma") == 0
    text = await gw.metrics()
    assert metric(text, "loraplex_errors_total", tenant="gamma", code="concurrency_limit_exceeded")


async def test_concurrency_slot_is_given_back_on_every_error(gw: Gateway) -> None:
    key = await tenant(gw, max_concurrent=1)
    assert (await gw.chat(key, model="finance")).status_code == 404  # not entitled
    assert (await gw.post_raw("/v1/chat/completions", b"{bad", key=key)).status_code == 400
    gw.engine.answers.append(Answer(status=500, body=b"boom"))
    assert (await gw.chat(key, model="medical")).status_code == 502
    gw.engine.answers.append(Answer(raise_exc=RuntimeError("bug")))
    with pytest.raises(RuntimeError):
        await gw.chat(key, model="medical")
    gw.engine.streams_script.append(
        StreamScript(events=[b'{"choices": []}'], fail_after=1, raise_mid=RuntimeError("mid"))
    )
    resp = await gw.client.post("/v1/chat/completions", content=stream_body(), headers=auth(key))
    assert sse_data(resp.text)[-1] == "[DONE]"
    assert gw.state.quotas.in_flight("gamma") == 0
    for _ in range(3):
        assert (await gw.chat(key, model="medical")).status_code == 200


async def test_non_streaming_requests_hold_their_slot_until_answered(gw: Gateway) -> None:
    key = await tenant(gw, max_concurrent=1)
    gate = asyncio.Event()
    gw.engine.answers.append(Answer(body=b'{"usage": null}', gate=gate))
    first = asyncio.create_task(gw.chat(key, model="medical"))
    await wait_until(lambda: gw.state.quotas.in_flight("gamma") == 1, what="slot taken")
    await wait_until(lambda: len(gw.engine.forwarded) == 1, what="first forwarded")
    assert_error(await gw.chat(key, model="medical"), 429, "concurrency_limit_exceeded")
    gate.set()
    assert (await first).status_code == 200
    assert gw.state.quotas.in_flight("gamma") == 0


async def test_lowering_the_limit_applies_to_new_requests(gw: Gateway) -> None:
    key = await tenant(gw, max_concurrent=5)
    resp = await gw.client.patch(
        "/admin/v1/tenants/gamma", json={"quotas": {"max_concurrent": 1}}, headers=ADMIN
    )
    assert resp.status_code == 200
    assert resp.json()["quotas"]["max_concurrent"] == 1
    gate = asyncio.Event()
    gw.engine.answers.append(Answer(body=b"{}", gate=gate))
    first = asyncio.create_task(gw.chat(key, model="medical"))
    await wait_until(lambda: len(gw.engine.forwarded) == 1, what="first forwarded")
    assert (await gw.chat(key, model="medical")).status_code == 429
    gate.set()
    assert (await first).status_code == 200


# ---- caps on max_tokens / n / best_of ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "max_tokens", 257),
        ("/v1/chat/completions", "max_tokens", "1000000"),
        ("/v1/chat/completions", "max_tokens", 1e9),
        ("/v1/chat/completions", "max_completion_tokens", 300),
        ("/v1/chat/completions", "n", 3),
        ("/v1/completions", "n", 100),
        ("/v1/completions", "best_of", 5),
        ("/v1/completions", "best_of", "4"),
        ("/v1/completions", "max_tokens", 10**30),
    ],
)
async def test_fields_over_the_tenants_caps_are_400_naming_the_field(
    gw: Gateway, path: str, field: str, value: Any
) -> None:
    key = await tenant(gw, max_tokens=256, max_n=2, max_best_of=3, requests_per_minute=1)
    body: dict[str, Any] = {"model": "medical", field: value}
    if path.endswith("chat/completions"):
        body["messages"] = CHAT["messages"]
    else:
        body["prompt"] = "hi"
    resp = await gw.post_raw(path, json.dumps(body).encode(), key=key)
    if value == 10**30:  # refused by the protocol check already: too big for an integer
        assert_error(resp, 400, "invalid_request", param=field)
    else:
        err = assert_error(resp, 400, "quota_exceeded", param=field, type_="invalid_request_error")
        assert "at most" in err["message"]
    assert gw.engine.forwarded == []
    # The refusal spent none of the tenant's 1 request per minute.
    assert (await gw.chat(key, model="medical")).status_code == 200


async def test_fields_within_the_caps_pass_as_whole_numbers(gw: Gateway) -> None:
    key = await tenant(gw, max_tokens=256, max_n=2, max_best_of=3)
    body = {"model": "medical", "prompt": "hi", "max_tokens": "256", "n": 2.0, "best_of": 3}
    resp = await gw.post_raw("/v1/completions", orjson.dumps(body), key=key)
    assert resp.status_code == 200, resp.text
    sent = gw.engine.forwarded[-1].body
    assert (sent["max_tokens"], sent["n"], sent["best_of"]) == (256, 2, 3)
    assert all(type(sent[f]) is int for f in ("max_tokens", "n", "best_of"))


async def test_a_request_without_max_tokens_gets_the_cap(gw: Gateway) -> None:
    key = await tenant(gw, max_tokens=64)
    assert (await gw.chat(key, model="medical")).status_code == 200
    assert gw.engine.forwarded[-1].body["max_tokens"] == 64
    assert (await gw.chat(key, max_completion_tokens=10, model="medical")).status_code == 200
    sent = gw.engine.forwarded[-1].body
    assert sent["max_completion_tokens"] == 10
    assert "max_tokens" not in sent
    # Without caps nothing is added.
    assert (await gw.chat(model="medical")).status_code == 200
    assert "max_tokens" not in gw.engine.forwarded[-1].body


@pytest.mark.parametrize("value", [True, "many", [1], {"n": 1}, 2.5, "nan"])
async def test_capped_fields_that_are_not_whole_numbers_are_400(gw: Gateway, value: Any) -> None:
    key = await tenant(gw, max_best_of=3)
    body = {"model": "medical", "prompt": "hi", "best_of": value}
    resp = await gw.post_raw("/v1/completions", orjson.dumps(body), key=key)
    assert_error(resp, 400, "invalid_request", param="best_of")
    assert gw.engine.forwarded == []


async def test_the_stream_body_is_capped_too(gw: Gateway) -> None:
    key = await tenant(gw, max_tokens=8)
    resp = await gw.client.post(
        "/v1/chat/completions", content=stream_body(max_tokens=9), headers=auth(key)
    )
    assert_error(resp, 400, "quota_exceeded", param="max_tokens")
    resp = await gw.client.post("/v1/chat/completions", content=stream_body(), headers=auth(key))
    assert resp.status_code == 200
    assert gw.engine.forwarded[-1].body["max_tokens"] == 8


# ---- request timeout and stream duration -------------------------------------------------------


async def test_request_timeout_is_504_and_cancels_the_engine_call(make_gw: GatewayFactory) -> None:
    async with make_gw(request_timeout_s=0.2) as gw:
        key = await tenant(gw, max_concurrent=1)
        gw.engine.answers.append(Answer(gate=asyncio.Event()))  # never answers
        t0 = time.monotonic()
        resp = await gw.chat(key, model="medical")
        assert_error(resp, 504, "request_timeout", type_="server_error")
        assert 0.2 <= time.monotonic() - t0 < 2
        assert gw.state.quotas.in_flight("gamma") == 0
        assert gw.state.engines.in_flight(served(gw, "medical")) == 0
        text = await gw.metrics()
        labels = {"tenant": "gamma", "code": "request_timeout"}
        assert metric(text, "loraplex_errors_total", **labels) == 1


async def test_request_timeout_covers_waiting_for_an_adapter_load(
    make_gw: GatewayFactory,
) -> None:
    async with make_gw(request_timeout_s=0.2) as gw:
        gw.engine.restart()  # the engine forgot every adapter: medical must be loaded again
        gw.state.engines.mark_engine_lost()
        gw.engine.load_gate = asyncio.Event()
        resp = await gw.chat(model="medical")
        assert_error(resp, 504, "request_timeout")
        gw.engine.load_gate.set()
        await wait_until(lambda: gw.engine.forwarded == [] and bool(gw.engine.load_calls))


async def test_a_stream_over_its_max_duration_ends_with_stream_timeout(
    make_gw: GatewayFactory,
) -> None:
    async with make_gw(max_stream_duration_s=0.3) as gw:
        script = StreamScript(
            events=stream_chunks("m", ["a", "b"], with_usage=False), block_after=1
        )
        gw.engine.streams_script.append(script)
        t0 = time.monotonic()
        resp = await gw.client.post(
            "/v1/chat/completions", content=stream_body(), headers=auth("sk-test-acme")
        )
        elapsed = time.monotonic() - t0
        assert resp.status_code == 200
        data = sse_data(resp.text)
        assert len(data) == 3
        assert orjson.loads(data[0])["choices"][0]["delta"]["content"] == "a"
        assert_error_payload(orjson.loads(data[1]), "stream_timeout", type_="server_error")
        assert data[2] == "[DONE]"
        assert 0.3 <= elapsed < 2
        [stream] = gw.engine.streams
        assert stream.closed
        text = await gw.metrics()
        assert metric(text, "loraplex_errors_total", tenant="acme", code="stream_timeout") == 1
        assert metric(text, "loraplex_requests_total", tenant="acme", status="504") == 1


async def test_a_chatty_stream_is_cut_at_an_event_after_its_deadline(
    make_gw: GatewayFactory,
) -> None:
    """With more time left than the engine read timeout no timer is armed: the deadline is
    checked as events arrive, so a stream that keeps talking is cut there."""
    async with make_gw(max_stream_duration_s=0.3, engine={"read_timeout_s": 0.05}) as gw:
        chunks = stream_chunks("m", [str(i) for i in range(100)], with_usage=False)
        gw.engine.streams_script.append(StreamScript(events=chunks, delay_s=0.02))
        resp = await gw.client.post(
            "/v1/chat/completions", content=stream_body(), headers=auth("sk-test-acme")
        )
        data = sse_data(resp.text)
        assert 5 < len(data) < 60
        assert_error_payload(orjson.loads(data[-2]), "stream_timeout")
        assert data[-1] == "[DONE]"
        assert gw.engine.streams[0].closed


async def test_a_stream_that_ends_in_time_is_untouched(make_gw: GatewayFactory) -> None:
    async with make_gw(max_stream_duration_s=5) as gw:
        resp = await gw.client.post(
            "/v1/chat/completions", content=stream_body(), headers=auth("sk-test-acme")
        )
        data = sse_data(resp.text)
        assert data[-1] == "[DONE]"
        assert all("error" not in d for d in data)


# ---- the request-deadline sweeper itself ------------------------------------------------------


async def test_within_times_out_only_the_requests_past_their_deadline() -> None:
    async def sleep(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    t0 = time.monotonic()
    results = await asyncio.gather(
        *(within(0.1, partial(sleep, s)) for s in (0.01, 0.05, 1.0, 2.0)),
        return_exceptions=True,
    )
    assert results[:2] == [0.01, 0.05]
    assert all(isinstance(r, RequestTimeout) for r in results[2:])
    assert 0.1 <= time.monotonic() - t0 < 0.5  # cut within a tick (12.5 ms) of the deadline
    sweeper = _SWEEPERS[asyncio.get_running_loop()]
    await wait_until(lambda: sweeper._timer is None, what="the sweep timer stops when idle")


async def test_within_lets_other_cancellations_and_errors_through() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(within(60, forever))
    await started.wait()
    task.cancel()  # a client disconnect or a shutdown, not the deadline
    with pytest.raises(asyncio.CancelledError):
        await task

    async def own_timeout() -> None:
        raise TimeoutError("the work's own")

    with pytest.raises(TimeoutError, match="the work's own"):
        await within(60, own_timeout)


async def test_within_when_the_deadline_and_a_cancel_coincide_keeps_cancelling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tasks: list[asyncio.Task[None]] = []
    sweep = _Sweeper._sweep

    def sweep_then_cancel(self: _Sweeper) -> None:
        sweep(self)
        if tasks and tasks[0] in self._expired and len(tasks) == 1:
            tasks[0].cancel()  # e.g. a shutdown, in the same loop iteration as the deadline
            tasks.append(tasks[0])

    monkeypatch.setattr(_Sweeper, "_sweep", sweep_then_cancel)

    async def forever() -> None:
        await asyncio.Event().wait()

    tasks.append(asyncio.create_task(within(0.02, forever)))
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    assert len(tasks) == 2  # both cancellations did happen together


async def test_within_withdraws_a_cancellation_the_work_swallowed() -> None:
    async def stubborn() -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(5)
        return "finished anyway"

    async def request() -> tuple[str, int]:
        result = await within(0.02, stubborn)
        current = asyncio.current_task()
        assert current is not None
        await asyncio.sleep(0)  # no cancellation left pending for the rest of the request
        return result, current.cancelling()

    assert await request() == ("finished anyway", 0)


# ---- where quotas are configured -----------------------------------------------------------------


def test_tenants_file_reads_every_quota(tmp_path: Path) -> None:
    quotas = {
        "max_adapters": 0,
        "requests_per_minute": 60,
        "tokens_per_minute": 1000,
        "max_concurrent": 4,
        "max_tokens": 512,
        "max_n": 2,
        "max_best_of": 3,
    }
    spec = {"key_sha256": hash_key("k"), "adapters": [], "quotas": quotas}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"tenants": {"a": spec}}))
    [record] = read_tenants_file(path)
    assert record.quotas.as_dict() == quotas


@pytest.mark.parametrize(
    ("quotas", "message"),
    [
        ({"max_concurent": 4}, "unknown quotas"),
        ({"max_concurrent": 0}, "max_concurrent must be a whole number >= 1"),
        ({"max_tokens": "many"}, "max_tokens must be"),
        ({"max_n": True}, "max_n must be"),
        ({"max_adapters": -1}, "max_adapters must be a whole number >= 0"),
        ({"max_best_of": 1.5}, "max_best_of must be"),
    ],
)
def test_tenants_file_refuses_bad_quotas(tmp_path: Path, quotas: Any, message: str) -> None:
    spec = {"key_sha256": hash_key("k"), "adapters": [], "quotas": quotas}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"tenants": {"a": spec}}))
    with pytest.raises(ValueError, match=message):
        read_tenants_file(path)


def test_stored_quotas_ignore_unknown_keys_and_default_to_unlimited() -> None:
    assert Quotas.from_dict(None) == Quotas()
    assert Quotas.from_dict({"max_n": 2, "from_a_newer_replica": 1}) == Quotas(max_n=2)


async def test_admin_api_round_trips_the_new_quotas(gw: Gateway) -> None:
    quotas = {"max_concurrent": 3, "max_tokens": 100, "max_n": 1, "max_best_of": 2}
    await tenant(gw, **quotas)
    view = (await gw.client.get("/admin/v1/tenants/gamma", headers=ADMIN)).json()
    assert {k: view["quotas"][k] for k in quotas} == quotas
    record = gw.state.registry.snapshot.tenants["gamma"]
    assert record == TenantRecord(
        "gamma", record.key_digests, frozenset({"medical", "legal"}), None, Quotas(**quotas)
    )
    await gw.state.registry.reload()  # read back from the database, not the written record
    assert gw.state.registry.snapshot.tenants["gamma"].quotas == Quotas(**quotas)
    for field in quotas:
        resp = await gw.client.patch(
            "/admin/v1/tenants/gamma", json={"quotas": {field: 0}}, headers=ADMIN
        )
        assert_error(resp, 400, "invalid_request", param=f"quotas.{field}")
