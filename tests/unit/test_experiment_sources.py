"""server.experiments.sources: PromQLSource against a tiny aiohttp server answering canned
Prometheus JSON (the shape of the HTTP API's instant-query answers), LocalSource against a
GatewayMetrics whose experiment series the test fills."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from server.experiments.analysis import Histo
from server.experiments.sources import (
    LocalSource,
    MetricsSource,
    MetricsUnavailable,
    PromQLSource,
    promql_duration,
    promql_string,
    queries,
)
from server.telemetry.metrics import LATENCY_BUCKETS, SCORE_BUCKETS, GatewayMetrics
from tests.servers import free_port

INF = math.inf
TS = 1435781451.781


def vector(*samples: tuple[dict[str, str], str]) -> dict[str, Any]:
    """An instant query's success answer, as Prometheus sends it."""
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [{"metric": labels, "value": [TS, value]} for labels, value in samples],
        },
    }


def buckets(variant: str, *pairs: tuple[str, str]) -> list[tuple[dict[str, str], str]]:
    return [({"variant": variant, "le": le}, v) for le, v in pairs]


@dataclass
class FakePrometheus:
    """Answers /api/v1/query by the family the query names; records the queries."""

    port: int = 0
    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)
    delay_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, family: str, body: Any, status: int = 200) -> None:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        self.answers[family] = (status, raw)

    async def handle(self, request: web.Request) -> web.Response:
        query = request.query["query"]
        self.seen.append(query)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        for family, (status, body) in self.answers.items():
            if f"({family}{{" in query:
                return web.Response(status=status, body=body, content_type="application/json")
        return web.Response(body=orjson.dumps(vector()), content_type="application/json")


@pytest.fixture
async def prom() -> AsyncIterator[FakePrometheus]:
    fake = FakePrometheus()
    app = web.Application()
    app.router.add_get("/api/v1/query", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.port = runner.addresses[0][1]
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# -- PromQL text ----------------------------------------------------------------------------------


def test_promql_string_escapes_like_go() -> None:
    assert promql_string("checkout-v2") == '"checkout-v2"'
    assert promql_string('a"b\\c') == '"a\\"b\\\\c"'
    assert promql_string("x\ny\tz\r\x00\x7f") == '"x\\ny\\tz\\r\\x00\\x7f"'
    assert promql_string("ünï") == '"ünï"'


def test_promql_duration() -> None:
    assert promql_duration(300) == "300s"
    assert promql_duration(1.5) == "1500ms"
    assert promql_duration(0.0001) == "1ms"
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="positive"):
            promql_duration(bad)


def test_queries() -> None:
    q = queries('ab"c', 600)
    assert q["requests"] == (
        "sum by (variant, outcome) (increase("
        'loraplex_experiment_requests_total{experiment="ab\\"c"}[600s]))'
    )
    assert q["feedback"] == (
        "sum by (variant, rating) (increase("
        'loraplex_experiment_feedback_total{experiment="ab\\"c"}[600s]))'
    )
    assert q["latency"] == (
        "sum by (variant, le) (increase("
        'loraplex_experiment_request_duration_seconds_bucket{experiment="ab\\"c"}[600s]))'
    )
    assert set(q) == {
        "requests",
        "feedback",
        "latency",
        "ttft",
        "completion_tokens",
        "feedback_score",
    }


# -- PromQLSource ---------------------------------------------------------------------------------


def fill_round(prom: FakePrometheus) -> None:
    prom.answer(
        "loraplex_experiment_requests_total",
        vector(
            ({"variant": "control", "outcome": "ok"}, "190"),
            ({"variant": "control", "outcome": "error"}, "10"),
            ({"variant": "control", "outcome": "client_error"}, "5"),
            ({"variant": "cand", "outcome": "ok"}, "180.5"),
            ({"variant": "cand", "outcome": "error"}, "19.5"),
        ),
    )
    prom.answer(
        "loraplex_experiment_request_duration_seconds_bucket",
        vector(
            # cumulative, in no particular order, "+Inf" as Prometheus writes it
            *buckets("control", ("+Inf", "205"), ("0.5", "100"), ("0.1", "20"), ("1.0", "200")),
            *buckets("cand", ("0.1", "0"), ("0.5", "50"), ("1.0", "150"), ("+Inf", "200")),
        ),
    )
    prom.answer(
        "loraplex_experiment_feedback_total",
        vector(
            ({"variant": "control", "rating": "up"}, "40"),
            ({"variant": "control", "rating": "down"}, "10"),
            ({"variant": "cand", "rating": "down"}, "3"),
        ),
    )
    prom.answer(
        "loraplex_experiment_feedback_score_bucket",
        vector(*buckets("cand", ("0.5", "1"), ("1.0", "4"), ("+Inf", "4"))),
    )


async def test_promql_round(prom: FakePrometheus, session: aiohttp.ClientSession) -> None:
    fill_round(prom)
    source: MetricsSource = PromQLSource(session, prom.url + "/", timeout_s=2.0)
    stats = await source.variant_stats("exp-1", 300)
    assert set(stats) == {"control", "cand"}
    control, cand = stats["control"], stats["cand"]
    assert (control.requests, control.errors) == (205.0, 10.0)
    assert (cand.requests, cand.errors) == (200.0, 19.5)
    assert control.latency == Histo((0.1, 0.5, 1.0, INF), (20.0, 80.0, 100.0, 5.0))
    assert cand.latency == Histo((0.1, 0.5, 1.0, INF), (0.0, 50.0, 100.0, 50.0))
    assert control.ttft == Histo.empty()  # no streams: no series
    assert (control.feedback_up, control.feedback_down) == (40.0, 10.0)
    assert (cand.feedback_up, cand.feedback_down) == (0.0, 3.0)
    assert control.feedback_score == Histo.empty()
    assert cand.feedback_score == Histo((0.5, 1.0, INF), (1.0, 3.0, 0.0))
    assert sorted(prom.seen) == sorted(queries("exp-1", 300).values())
    await source.aclose()
    assert not session.closed  # not ours


async def test_promql_buckets_made_monotonic(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    # increase() extrapolates each bucket series on its own: neighbours may disagree a little
    prom.answer(
        "loraplex_experiment_request_duration_seconds_bucket",
        vector(*buckets("a", ("0.1", "10.2"), ("0.5", "10.1"), ("1.0", "30"))),  # no +Inf
    )
    stats = await PromQLSource(session, prom.url).variant_stats("e", 60)
    assert stats["a"].latency == Histo((0.1, 0.5, 1.0, INF), (10.2, 0.0, 19.8, 0.0))
    assert stats["a"].requests == 0  # no request counter series in the window


async def test_promql_no_traffic(prom: FakePrometheus, session: aiohttp.ClientSession) -> None:
    assert await PromQLSource(session, prom.url).variant_stats("idle", 60) == {}


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (503, {"status": "error", "errorType": "unavailable", "error": "down"}, "503"),
        (422, {"status": "error", "errorType": "execution", "error": "oops"}, "execution"),
        (200, {"status": "error", "errorType": "timeout", "error": "slow"}, "timeout"),
        (200, b"<html>proxy error</html>", "unexpected"),
        (200, {"status": "success", "data": {"resultType": "matrix", "result": []}}, "vector"),
        (200, vector(({"variant": "a", "outcome": "ok"}, "NaN")), "non-finite"),
        (200, vector(({"variant": "a", "outcome": "ok"}, "many")), "unexpected"),
        (200, {"status": "success", "data": {"resultType": "vector"}}, "unexpected"),
        (200, {"status": "success", "data": {"resultType": "vector", "result": [{}]}}, "unexp"),
    ],
)
async def test_promql_failures_are_metrics_unavailable(
    prom: FakePrometheus,
    session: aiohttp.ClientSession,
    status: int,
    body: Any,
    message: str,
) -> None:
    fill_round(prom)
    prom.answer("loraplex_experiment_requests_total", body, status)
    with pytest.raises(MetricsUnavailable, match=message):
        await PromQLSource(session, prom.url).variant_stats("e", 60)


async def test_promql_bad_le_is_metrics_unavailable(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    prom.answer(
        "loraplex_experiment_ttft_seconds_bucket",
        vector(({"variant": "a"}, "3")),  # no le label
    )
    with pytest.raises(MetricsUnavailable, match="unexpected"):
        await PromQLSource(session, prom.url).variant_stats("e", 60)


async def test_promql_unreachable_and_slow(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(MetricsUnavailable, match="ClientConnectorError"):
        await PromQLSource(session, f"http://127.0.0.1:{free_port()}").variant_stats("e", 60)
    prom.delay_s = 1.0
    with pytest.raises(MetricsUnavailable, match="Timeout"):
        await PromQLSource(session, prom.url, timeout_s=0.1).variant_stats("e", 60)


async def test_promql_owns_session_when_told() -> None:
    own = aiohttp.ClientSession()
    await PromQLSource(own, "http://127.0.0.1:9", owns_session=True).aclose()
    assert own.closed


# -- LocalSource ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def traffic(
    m: GatewayMetrics, exp: str, variant: str, ok: int, errors: int, seconds: float
) -> None:
    m.exp_requests.labels(exp, variant, "ok").inc(ok)
    m.exp_requests.labels(exp, variant, "error").inc(errors)
    m.exp_requests.labels(exp, variant, "client_error").inc(0)
    for _ in range(ok + errors):
        m.exp_latency.labels(exp, variant).observe(seconds)


async def test_local_windows_by_snapshots() -> None:
    m = GatewayMetrics()
    clock = Clock()
    source = LocalSource(m, clock=clock)
    traffic(m, "exp", "control", 90, 10, 0.3)
    traffic(m, "other", "control", 5, 5, 9.0)  # another experiment: never counted

    first = await source.variant_stats("exp", 60)  # no snapshot yet: since the start
    assert set(first) == {"control"}
    assert (first["control"].requests, first["control"].errors) == (100.0, 10.0)

    clock.now += 30
    traffic(m, "exp", "control", 50, 0, 0.3)
    traffic(m, "exp", "cand", 20, 5, 2.0)
    second = await source.variant_stats("exp", 60)  # nothing 60 s old yet: since the start
    assert second["control"].requests == 150
    assert (second["cand"].requests, second["cand"].errors) == (25.0, 5.0)

    clock.now += 31  # the first snapshot is now 61 s old
    traffic(m, "exp", "cand", 10, 0, 2.0)
    third = await source.variant_stats("exp", 60)
    assert (third["control"].requests, third["control"].errors) == (50.0, 0.0)
    assert (third["cand"].requests, third["cand"].errors) == (35.0, 5.0)
    latency = third["cand"].latency
    assert latency.bounds == (*LATENCY_BUCKETS, INF)
    assert latency.total == 35
    assert latency.counts[LATENCY_BUCKETS.index(2.5)] == 35  # 2.0 s falls in (1.0, 2.5]
    assert third["control"].latency.counts[LATENCY_BUCKETS.index(0.5)] == 50
    assert third["control"].ttft == Histo.empty()

    clock.now += 10  # newest snapshot at least 60 s old is still the first
    assert (await source.variant_stats("exp", 60))["cand"].requests == 35
    clock.now += 25  # now the second (taken 66 s before)
    assert (await source.variant_stats("exp", 60))["cand"].requests == 10


async def test_local_feedback_and_scores() -> None:
    m = GatewayMetrics()
    clock = Clock()
    source = LocalSource(m, clock=clock)
    m.exp_feedback.labels("exp", "cand", "up").inc(3)
    m.exp_feedback.labels("exp", "cand", "down").inc(2)
    for score in (0.05, 0.55, 0.95, 1.0):
        m.exp_feedback_score.labels("exp", "cand").observe(score)
    m.exp_completion_tokens.labels("exp", "cand").observe(100)
    m.exp_ttft.labels("exp", "cand").observe(0.2)
    stats = (await source.variant_stats("exp", 60))["cand"]
    assert (stats.requests, stats.feedback_up, stats.feedback_down) == (0.0, 3.0, 2.0)
    assert stats.feedback_score.bounds == (*SCORE_BUCKETS, INF)
    assert stats.feedback_score.counts == (1.0, 0, 0, 0, 0, 1.0, 0, 0, 0, 2.0, 0)
    assert stats.completion_tokens.total == 1
    assert stats.completion_tokens.quantile(0.5) > 64
    assert stats.ttft.total == 1


async def test_local_snapshots_are_bounded_and_forgettable() -> None:
    m = GatewayMetrics()
    clock = Clock()
    source = LocalSource(m, clock=clock, max_snapshots=50)
    for i in range(200):
        clock.now += 10
        traffic(m, "exp", "a", 1, 0, 0.1)
        stats = await source.variant_stats("exp", 100)
        if i >= 10:
            assert stats["a"].requests == 10  # exactly the last 100 s
    assert len(source._history["exp"].snapshots) == 11
    for _ in range(100):
        clock.now += 1
        await source.variant_stats("exp", 5000)  # a longer window keeps more...
    assert len(source._history["exp"].snapshots) == 50  # ...up to the cap
    source.forget("exp")
    assert "exp" not in source._history
    with pytest.raises(ValueError, match="positive"):
        await source.variant_stats("exp", 0)
    await source.aclose()


async def test_local_series_restarting_is_not_negative() -> None:
    m = GatewayMetrics()
    clock = Clock()
    source = LocalSource(m, clock=clock)
    traffic(m, "exp", "a", 10, 0, 0.1)
    await source.variant_stats("exp", 1)
    m.exp_requests.remove("exp", "a", "ok")
    m.exp_latency.remove("exp", "a")
    clock.now += 2
    traffic(m, "exp", "a", 3, 0, 0.1)
    stats = (await source.variant_stats("exp", 1))["a"]
    assert stats.requests == 0  # 3 - 10 clamped: the window lost, never negative
    assert stats.latency.total == 0
