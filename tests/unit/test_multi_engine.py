"""Several engines behind one gateway: adapter affinity through the API, failover before
anything reached the client, the watcher per engine, DNS discovery, settings."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from pydantic import ValidationError

import server.engine_watch as engine_watch
from adapters.placement import EngineMember
from server.app import create_app
from server.engine_watch import resolve_engine_urls
from server.errors import EngineUnavailable, UpstreamTimeout
from server.settings import EngineSettings, Settings
from server.upstream import EngineClient, EngineLoad
from tests.unit.conftest import Bootstrapped, Config
from tests.unit.fakes import Answer, FakeEngine, StreamScript, stream_chunks
from tests.unit.helpers import (
    ACME_KEY,
    ADMIN_KEY,
    Gateway,
    assert_error,
    assert_error_payload,
    auth,
    metric,
    served,
    sse_data,
    version,
    wait_until,
)

ADMIN = auth(ADMIN_KEY)
A, B = "http://127.0.0.1:8101", "http://127.0.0.1:8102"


class Engine(FakeEngine):
    """A fake engine whose health probe can be held: the watcher's round waits on it, so
    whatever the request path set on the engine stays until the gate opens."""

    def __init__(self) -> None:
        super().__init__()
        self.probe_gate: asyncio.Event | None = None
        self.probes_held = 0

    async def health(self) -> bool:
        if self.probe_gate is not None and not self.probe_gate.is_set():
            self.probes_held += 1
            await self.probe_gate.wait()
        return await super().health()


@dataclass
class Engines:
    """A running gateway and its fake engines by URL."""

    gw: Gateway
    fakes: dict[str, Engine]

    def __getitem__(self, url: str) -> Engine:
        return self.fakes[url]

    def member(self, url: str) -> EngineMember:
        [m] = [m for m in self.gw.state.engines if m.url == url]
        return m

    def other(self, url: str) -> str:
        [rest] = [u for u in self.fakes if u != url and u in {m.url for m in self.gw.state.engines}]
        return rest

    def models(self, url: str) -> list[str]:
        """The served names the engine was asked to generate with, in order."""
        return [str(f.body["model"]) for f in self.fakes[url].forwarded]

    def loaded(self, url: str) -> list[str]:
        return [name for name, _ in self.fakes[url].load_calls]

    async def place(self, model: str, url: str) -> None:
        """Register `model`'s version on the engine at `url` (as the watcher's reconcile does)."""
        await self.member(url).residency.ensure(version(self.gw, model))

    async def all_ready(self) -> None:
        await wait_until(
            lambda: all(m.up and m.reconciled and not m.suspect for m in self.gw.state.engines),
            what="every engine up and reconciled",
        )

    async def hold_probes(self, url: str) -> asyncio.Event:
        """Hold the watcher inside its next probe of `url`; set the event to let it go."""
        gate = self.fakes[url].probe_gate = asyncio.Event()
        held = self.fakes[url].probes_held
        await wait_until(lambda: self.fakes[url].probes_held > held, what="the watcher held")
        return gate


@contextlib.asynccontextmanager
async def running_engines(
    settings: Settings, fakes: dict[str, Engine], *, wait_ready: bool = True
) -> AsyncIterator[Engines]:
    """Like helpers.running_gateway, with one fake per engine URL (made on first use, which
    is how DNS discovery meets new engines)."""

    def factory(s: Settings) -> EngineClient:
        return fakes.setdefault(s.engine.url, Engine())

    app = create_app(settings, engine_factory=factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = next(iter(fakes.values()), None) or Engine()
            engines = Engines(Gateway(app, first, client, settings), fakes)
            if wait_ready:
                await engines.gw.wait_ready(timeout_s=10.0)
                await engines.all_ready()
                for fake in fakes.values():
                    fake.forwarded.clear()
            yield engines


@pytest.fixture
async def two(config: Config, bootstrapped: Bootstrapped) -> AsyncIterator[Engines]:
    """Two engines after a gateway restart over the bootstrapped registry (legal, medical,
    finance ready): neither engine serves anything yet, so adapters are placed on demand."""
    shutil.copyfile(bootstrapped.db, config.root / "registry.db")
    settings = config.settings(adapters_file=None, engine={"urls": [A, B]})
    async with running_engines(settings, {A: Engine(), B: Engine()}) as engines:
        assert engines.gw.state.engines.registered_names() == []
        yield engines


async def stream(gw: Gateway, **body: Any) -> httpx.Response:
    payload: dict[str, Any] = {"stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with asyncio.timeout(5):
        return await gw.client.post(
            "/v1/chat/completions", json={**payload, **body}, headers=auth(ACME_KEY)
        )


def contents(data: list[str]) -> list[str]:
    """The text deltas of a chat stream's chunks (the [DONE] marker left out)."""
    return [
        c["choices"][0]["delta"]["content"]
        for c in (orjson.loads(d) for d in data if d != "[DONE]")
        if c.get("choices")
    ]


def failovers(gw: Gateway) -> float:
    return gw.gauge("loraplex_engine_failovers_total")


# -- affinity through the gateway ------------------------------------------------------------


async def test_one_adapter_stays_on_one_engine_and_adapters_spread(two: Engines) -> None:
    gw = two.gw
    assert (await gw.chat(model="legal")).status_code == 200
    [x] = [u for u in (A, B) if two.models(u)]
    y = two.other(x)
    # Nothing else registered: the second adapter goes to the engine with fewer adapters.
    assert (await gw.chat(model="medical")).status_code == 200
    assert two.models(y) == [served(gw, "medical")]
    for _ in range(4):
        resp = await gw.chat(model="legal")
        assert resp.status_code == 200
        assert resp.headers["x-loraplex-adapter"] == "legal@1"
        assert resp.json()["model"] == served(gw, "legal")
    assert two.models(x) == [served(gw, "legal")] * 5
    assert two.models(y) == [served(gw, "medical")]
    assert two.loaded(x) == [served(gw, "legal")]  # registered once, on one engine
    assert two.loaded(y) == [served(gw, "medical")]

    resp = await gw.client.get("/admin/v1/engine", headers=ADMIN)
    assert resp.status_code == 200
    body = resp.json()
    assert body["up"] is True
    assert body["ready"] is True
    views = {e["url"]: e for e in body["engines"]}
    assert [e["url"] for e in body["engines"]] == [A, B]
    assert views[x]["registered"] == [served(gw, "legal")]
    assert views[y]["registered"] == [served(gw, "medical")]
    assert views[x]["picks"] == {"load": 1, "hit": 4}
    assert views[y]["picks"] == {"load": 1}
    for view in views.values():
        assert view["up"] is True
        assert view["ready"] is True
        assert view["suspect"] is False
        assert view["in_flight"] == 0
        assert view["restarts_seen"] == 0

    resp = await gw.client.get("/admin/v1/residency", headers=ADMIN)
    assert resp.status_code == 200
    residency = resp.json()
    assert residency["registered"] == 2
    assert sorted((s["engine"], s["adapter"]) for s in residency["slots"]) == sorted(
        [(x, "legal@1"), (y, "medical@1")]
    )

    resp = await gw.client.get("/admin/v1/adapters/legal/versions/1", headers=ADMIN)
    assert resp.json()["registered_on"] == [x]
    assert resp.json()["registered_on_engine"] is True

    metrics = await gw.metrics()
    assert metric(metrics, "loraplex_engine_picks_total", affinity="hit") == 4
    assert metric(metrics, "loraplex_engine_picks_total", affinity="load") == 2
    assert metric(metrics, "loraplex_engine_picks_total", affinity="spill") == 0
    assert metric(metrics, "loraplex_engine_failovers_total") == 0
    await gw.wait_gauge("loraplex_engines_up", 2)
    assert gw.gauge("loraplex_engine_in_flight", engine=x) == 0


async def test_hit_counter_grows_with_affinity(two: Engines) -> None:
    gw = two.gw
    await two.place("legal", B)
    before = gw.gauge("loraplex_engine_picks_total", affinity="hit")
    for _ in range(3):
        assert (await gw.chat(model="legal")).status_code == 200
    assert gw.gauge("loraplex_engine_picks_total", affinity="hit") - before == 3
    assert two.models(B) == [served(gw, "legal")] * 3
    assert two.models(A) == []


async def test_queue_depth_steers_new_adapters_and_base_requests(two: Engines) -> None:
    gw = two.gw
    two[A].queue = EngineLoad(waiting=40.0, running=8.0)
    await wait_until(lambda: two.member(A).waiting == 40.0, what="A's queue scraped")
    await gw.wait_gauge("loraplex_engine_queue_waiting", 40.0, engine=A)
    assert (await gw.chat(model="base")).status_code == 200
    assert (await gw.chat(model="medical")).status_code == 200
    assert two.models(B) == ["base", served(gw, "medical")]
    assert two.models(A) == []
    assert gw.gauge("loraplex_engine_picks_total", affinity="base") == 1
    resp = await gw.client.get("/admin/v1/engine", headers=ADMIN)
    view = next(e for e in resp.json()["engines"] if e["url"] == A)
    assert (view["queue_waiting"], view["queue_running"]) == (40.0, 8.0)


async def test_hot_adapter_spills_to_the_cooler_engine(
    config: Config, bootstrapped: Bootstrapped
) -> None:
    shutil.copyfile(bootstrapped.db, config.root / "registry.db")
    settings = config.settings(adapters_file=None, engine={"urls": [A, B], "spill_threshold": 4})
    async with running_engines(settings, {A: Engine(), B: Engine()}) as two:
        gw = two.gw
        await two.place("legal", A)
        two[A].queue = EngineLoad(waiting=3.0, running=0.0)
        await wait_until(lambda: two.member(A).waiting == 3.0, what="A's queue scraped")
        assert (await gw.chat(model="legal")).status_code == 200
        assert two.models(A) == [served(gw, "legal")]  # 3 more than B: below the threshold
        two[A].queue = EngineLoad(waiting=4.0, running=0.0)
        await wait_until(lambda: two.member(A).waiting == 4.0, what="A's queue scraped")
        assert (await gw.chat(model="legal")).status_code == 200
        assert two.models(B) == [served(gw, "legal")]
        assert two.loaded(B) == [served(gw, "legal")]
        assert gw.gauge("loraplex_engine_picks_total", affinity="spill") == 1
        assert sorted(
            m.url for m in gw.state.engines if m.residency.is_registered(served(gw, "legal"))
        ) == [A, B]


# -- failover, non-streaming ------------------------------------------------------------------


async def test_lost_engine_moves_the_request_and_is_skipped_until_a_good_probe(
    two: Engines,
) -> None:
    gw = two.gw
    await two.place("legal", A)
    two[A].answers.append(Answer(raise_exc=EngineUnavailable("connection reset")))
    gate = await two.hold_probes(A)  # the watcher cannot clear the mark meanwhile
    resp = await gw.chat(model="legal")
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == served(gw, "legal")
    assert resp.headers["x-loraplex-adapter"] == "legal@1"
    assert two.models(A) == [served(gw, "legal")]  # tried there first
    assert two.models(B) == [served(gw, "legal")]
    assert two.loaded(B) == [served(gw, "legal")]  # registered on B to take it
    assert failovers(gw) == 1
    assert two.member(A).suspect
    resp = await gw.client.get("/admin/v1/engine", headers=ADMIN)
    assert {e["url"]: e["suspect"] for e in resp.json()["engines"]} == {A: True, B: False}
    # Skipped, though it holds the adapter and is as idle as B.
    for model in ("legal", "medical", "base"):
        assert (await gw.chat(model=model)).status_code == 200
    assert len(two.models(A)) == 1
    assert two.models(B)[1:] == [served(gw, "legal"), served(gw, "medical"), "base"]
    assert failovers(gw) == 1
    assert two.member(A).in_flight == two.member(B).in_flight == 0

    gate.set()  # a good probe clears the mark
    await wait_until(lambda: not two.member(A).suspect, what="A cleared")
    assert gw.state.engines.usable_count == 2
    two[B].queue = EngineLoad(waiting=5.0, running=0.0)
    await wait_until(lambda: two.member(B).waiting == 5.0, what="B's queue scraped")
    assert (await gw.chat(model="legal")).status_code == 200
    assert two.models(A) == [served(gw, "legal")] * 2


async def test_engine_503_moves_the_request(two: Engines) -> None:
    gw = two.gw
    await two.place("legal", A)
    two[A].answers.append(Answer(503, b'{"error":{"message":"overloaded"}}'))
    resp = await gw.chat(model="legal")
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "hello"
    assert two.models(A) == two.models(B) == [served(gw, "legal")]
    assert failovers(gw) == 1


async def test_engine_4xx_is_not_moved(two: Engines) -> None:
    """Only a lost engine or a 503 moves a request: a refusal is the answer."""
    gw = two.gw
    await two.place("legal", A)
    two[A].answers.append(Answer(400, b'{"object":"error","message":"too long","code":400}'))
    assert_error(await gw.chat(model="legal"), 400, "invalid_request")
    assert two.models(B) == []
    assert failovers(gw) == 0
    assert not two.member(A).suspect


async def test_both_engines_failing_is_a_clean_503(two: Engines) -> None:
    gw = two.gw
    for url in (A, B):
        two[url].answers.append(Answer(raise_exc=EngineUnavailable("connection refused")))
    resp = await gw.chat(model="legal")
    err = assert_error(resp, 503, "engine_unavailable")
    assert "127.0.0.1" not in err["message"]
    assert "retry-after" in resp.headers
    assert len(two.models(A)) + len(two.models(B)) == 2  # one try on each
    assert failovers(gw) == 1  # moved once, never more
    for url in (A, B):
        two[url].answers.append(Answer(503, b"{}"))
    assert_error(await gw.chat(model="base"), 503, "engine_unavailable")
    assert two.member(A).in_flight == two.member(B).in_flight == 0


async def test_no_other_usable_engine_means_no_failover(two: Engines) -> None:
    gw = two.gw
    await two.place("legal", A)
    two[B].healthy = False
    await wait_until(lambda: not two.member(B).up, what="B down")
    two[A].answers.append(Answer(raise_exc=EngineUnavailable("connection reset")))
    assert_error(await gw.chat(model="legal"), 503, "engine_unavailable")
    assert failovers(gw) == 0
    assert two.models(B) == []


# -- failover, streaming ----------------------------------------------------------------------

EARLY_FAILURES = {
    "reset-before-first-event": lambda: StreamScript(
        events=[b'{"choices":[]}', b"[DONE]"],
        fail_after=0,
        raise_mid=EngineUnavailable("connection reset"),
    ),
    "refused-on-open": lambda: StreamScript(raise_on_open=EngineUnavailable("refused")),
    "status-503": lambda: StreamScript(status=503, error_body=b'{"error":"overloaded"}'),
}


@pytest.mark.parametrize("failure", sorted(EARLY_FAILURES))
async def test_stream_lost_before_its_first_event_moves_to_another_engine(
    two: Engines, failure: str
) -> None:
    gw = two.gw
    await two.place("legal", A)
    two[A].streams_script.append(EARLY_FAILURES[failure]())
    resp = await stream(gw, model="legal")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-loraplex-adapter"] == "legal@1"
    data = sse_data(resp.text)
    assert contents(data) == ["Hel", "lo", "!"]  # B's whole answer
    assert data[-1] == "[DONE]"
    assert all("error" not in orjson.loads(d) for d in data[:-1])
    assert two.models(A) == two.models(B) == [served(gw, "legal")]
    assert two[B].streams[0].closed
    assert failovers(gw) == 1
    assert two.member(A).in_flight == two.member(B).in_flight == 0
    assert gw.state.engines.in_flight(served(gw, "legal")) == 0


@pytest.mark.parametrize(
    "exc",
    [EngineUnavailable("connection reset"), UpstreamTimeout("slow first token")],
    ids=["failover", "timeout"],
)
async def test_stream_failed_before_its_first_event_is_closed(two: Engines, exc: Exception) -> None:
    """Whether the request moves or fails, the broken engine stream is closed (a real one
    would otherwise keep its pooled connection)."""
    gw = two.gw
    await two.place("legal", A)
    two[A].streams_script.append(
        StreamScript(events=[b'{"choices":[]}', b"[DONE]"], fail_after=0, raise_mid=exc)
    )
    resp = await stream(gw, model="legal")
    assert resp.status_code == (200 if isinstance(exc, EngineUnavailable) else 504)
    assert two[A].streams[0].closed
    assert all(s.closed for s in two[B].streams)


async def test_stream_timeout_before_first_event_is_a_clean_error(two: Engines) -> None:
    """Not a lost engine: not moved; reported before the stream starts (a JSON error)."""
    gw = two.gw
    await two.place("legal", A)
    two[A].streams_script.append(
        StreamScript(events=[b"{}"], fail_after=0, raise_mid=UpstreamTimeout("slow"))
    )
    resp = await stream(gw, model="legal")
    assert_error(resp, 504, "upstream_timeout")
    assert two.models(B) == []
    assert failovers(gw) == 0
    assert two.member(A).in_flight == 0


async def test_stream_failing_after_its_first_event_ends_with_an_error_event(
    two: Engines,
) -> None:
    gw = two.gw
    await two.place("legal", A)
    events = stream_chunks(served(gw, "legal"), ["a", "b", "c"], with_usage=False)
    two[A].streams_script.append(
        StreamScript(events=events, fail_after=1, raise_mid=EngineUnavailable("engine died"))
    )
    resp = await stream(gw, model="legal")
    assert resp.status_code == 200
    data = sse_data(resp.text)
    assert data[0] == events[0].decode()
    assert len(data) == 3
    assert_error_payload(orjson.loads(data[1]), "engine_unavailable")
    assert data[2] == "[DONE]"
    assert two.models(B) == []  # committed to A from its first event on
    assert failovers(gw) == 0
    assert two[A].streams[0].closed
    assert two.member(A).in_flight == 0


async def test_stream_on_both_engines_failing_is_a_clean_503(two: Engines) -> None:
    gw = two.gw
    two[A].streams_script.append(StreamScript(raise_on_open=EngineUnavailable("refused")))
    two[B].streams_script.append(StreamScript(raise_on_open=EngineUnavailable("refused")))
    err = assert_error(await stream(gw, model="legal"), 503, "engine_unavailable")
    assert err["message"]
    await two.all_ready()  # the failed engine was cleared by its next good probe
    for url in (A, B):
        two[url].streams_script.append(
            StreamScript(events=[b"{}"], fail_after=0, raise_mid=EngineUnavailable("reset"))
        )
    assert_error(await stream(gw, model="medical"), 503, "engine_unavailable")
    assert failovers(gw) == 2
    assert two.member(A).in_flight == two.member(B).in_flight == 0


async def test_stream_that_ends_at_once_is_reported_as_an_early_end(two: Engines) -> None:
    gw = two.gw
    await two.place("legal", A)
    two[A].streams_script.append(StreamScript(events=[]))
    resp = await stream(gw, model="legal")
    assert resp.status_code == 200
    data = sse_data(resp.text)
    assert_error_payload(orjson.loads(data[0]), "upstream_error")
    assert data[1:] == ["[DONE]"]
    assert failovers(gw) == 0


# -- one engine: behaviour unchanged -----------------------------------------------------------


async def test_single_engine_post_failure_is_503_without_failover(gw: Gateway) -> None:
    assert len(gw.state.engines) == 1
    gw.engine.answers.append(Answer(raise_exc=EngineUnavailable("connection reset")))
    assert_error(await gw.chat(), 503, "engine_unavailable")
    gw.engine.answers.append(Answer(503, b"{}"))
    assert_error(await gw.chat(), 503, "engine_unavailable")
    assert len(gw.engine.forwarded) == 2  # one try each
    assert failovers(gw) == 0
    [member] = gw.state.engines
    assert not member.suspect
    assert (await gw.chat()).status_code == 200


async def test_single_engine_stream_is_not_prefetched(gw: Gateway) -> None:
    """A failure before the first event is an SSE error in a 200 stream, as before."""
    gw.engine.streams_script.append(
        StreamScript(events=[b"{}"], fail_after=0, raise_mid=EngineUnavailable("reset"))
    )
    resp = await stream(gw)
    assert resp.status_code == 200
    data = sse_data(resp.text)
    assert_error_payload(orjson.loads(data[0]), "engine_unavailable")
    assert data[1:] == ["[DONE]"]
    assert failovers(gw) == 0
    assert gw.engine.streams[0].closed


# -- the watcher per engine ------------------------------------------------------------------


async def test_engine_down_elsewhere_on_demand_and_reconciled_on_return(two: Engines) -> None:
    gw = two.gw
    await two.place("legal", A)
    await two.place("medical", B)
    two[A].healthy = False
    two[A].restart()
    await wait_until(lambda: not two.member(A).up, what="A marked down")
    await gw.wait_gauge("loraplex_engines_up", 1)
    assert gw.gauge("loraplex_engine_up") == 1  # one engine still answers
    assert two.member(A).restarts_seen == 1
    assert two.member(A).residency.registered_names() == []
    assert gw.state.engine_status.restarts_seen == 1
    assert (await gw.client.get("/readyz")).status_code == 200  # B is enough

    resp = await gw.chat(model="legal")
    assert resp.status_code == 200
    assert two.models(B) == [served(gw, "legal")]
    assert served(gw, "legal") in two.loaded(B)
    assert gw.gauge("loraplex_engine_picks_total", affinity="load") == 1
    body = (await gw.client.get("/admin/v1/engine", headers=ADMIN)).json()
    view = {e["url"]: e for e in body["engines"]}
    assert view[A]["up"] is False
    assert view[A]["ready"] is False
    assert view[A]["restarts_seen"] == 1
    assert view[A]["registered"] == []
    assert body["up"] is True

    loads_before = len(two.loaded(A))
    two[A].healthy = True
    await wait_until(
        lambda: two.member(A).up and two.member(A).reconciled, what="A back and reconciled"
    )
    assert two.loaded(A)[loads_before:] == [served(gw, "legal")]  # what it had, again
    assert two.member(A).residency.is_registered(served(gw, "legal"))
    await gw.wait_gauge("loraplex_engines_up", 2)


async def test_all_engines_down(two: Engines) -> None:
    gw = two.gw
    for url in (A, B):
        two[url].healthy = False
    await wait_until(lambda: not gw.state.engines.up, what="both down")
    await gw.wait_gauge("loraplex_engines_up", 0)
    await gw.wait_gauge("loraplex_engine_up", 0)
    resp = await gw.chat(model="legal")
    assert_error(resp, 503, "engine_unavailable")
    assert resp.headers["retry-after"] == "3"
    assert_error(await gw.client.get("/readyz"), 503, "engine_unavailable")
    assert failovers(gw) == 0


async def test_pinned_version_is_registered_on_every_engine(two: Engines) -> None:
    gw = two.gw
    legal = served(gw, "legal")
    resp = await gw.client.post("/admin/v1/adapters/legal/versions/1/pin", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert resp.json()["pinned"] is True
    assert sorted(resp.json()["registered_on"]) == [A, B]
    assert two.loaded(A) == two.loaded(B) == [legal]
    assert all(s.pinned for _, s in gw.state.engines.slots() if s.version.served_name == legal)

    # Pinned while B is away: B gets it when it comes back.
    resp = await gw.client.post("/admin/v1/adapters/medical/versions/1/pin", headers=ADMIN)
    assert resp.status_code == 200
    two[B].healthy = False
    two[B].restart()
    await wait_until(lambda: not two.member(B).up, what="B down")
    resp = await gw.client.post("/admin/v1/adapters/finance/versions/1/pin", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert resp.json()["registered_on"] == [A]
    two[B].healthy = True
    await wait_until(
        lambda: two.member(B).up and two.member(B).reconciled, what="B back and reconciled"
    )
    expected = {legal, served(gw, "medical"), served(gw, "finance")}
    assert set(two.member(B).residency.registered_names()) == expected
    assert set(two.member(A).residency.registered_names()) == expected


# -- discovery --------------------------------------------------------------------------------

D1, D2, D3 = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"


class Resolver:
    """Stands in for server.engine_watch.resolve_engine_urls: answers `answer` (raises it
    when it is an exception) and counts the look-ups."""

    def __init__(self, answer: set[str]) -> None:
        self.answer: set[str] | BaseException = answer
        self.asked: list[str] = []
        self.gate: asyncio.Event | None = None  # answer only once set

    async def __call__(self, engine: EngineSettings, name: str) -> set[str]:
        self.asked.append(name)
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(self.answer, BaseException):
            raise self.answer
        return set(self.answer)


def discovery_settings(
    config: Config, bootstrapped: Bootstrapped, monkeypatch: pytest.MonkeyPatch, dns: Resolver
) -> Settings:
    shutil.copyfile(bootstrapped.db, config.root / "registry.db")
    monkeypatch.setattr(engine_watch, "resolve_engine_urls", dns)
    return config.settings(
        adapters_file=None,
        engine={
            "url": "http://engines.test:8000",
            "discovery_dns": "engines.test",
            "discovery_interval_s": 0.01,
        },
    )


async def test_discovery_adds_and_removes_engines(
    config: Config, bootstrapped: Bootstrapped, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns = Resolver({D1, D2})
    fakes: dict[str, Engine] = {}
    settings = discovery_settings(config, bootstrapped, monkeypatch, dns)
    async with running_engines(settings, fakes) as two:
        gw = two.gw
        pool = gw.state.engines
        assert sorted(m.url for m in pool) == [D1, D2]
        assert dns.asked[0] == "engines.test"
        await two.place("legal", D2)
        fakes[D2].queue = EngineLoad(waiting=2.0, running=1.0)
        await gw.wait_gauge("loraplex_engine_queue_waiting", 2.0, engine=D2)
        await gw.wait_gauge("loraplex_engines_up", 2)

        dns.answer = {D1}  # D2 left
        await wait_until(lambda: len(pool) == 1, what="D2 removed")
        assert [m.url for m in pool] == [D1]
        registry = gw.state.metrics.registry
        await gw.wait_gauge("loraplex_engines_up", 1)
        for name in ("loraplex_engine_in_flight", "loraplex_engine_queue_waiting"):
            assert registry.get_sample_value(name, {"engine": D2}) is None
            assert registry.get_sample_value(name, {"engine": D1}) is not None
        assert D2 not in await gw.metrics()
        assert not pool.is_registered(served(gw, "legal"))
        assert (await gw.chat(model="legal")).status_code == 200
        assert two.models(D1) == [served(gw, "legal")]
        assert two.models(D2) == []

        dns.answer = {D1, D3}  # D3 joined
        await wait_until(
            lambda: any(m.url == D3 and m.up and m.reconciled for m in pool), what="D3 ready"
        )
        await gw.wait_gauge("loraplex_engines_up", 2)
        body = (await gw.client.get("/admin/v1/engine", headers=ADMIN)).json()
        assert sorted(e["url"] for e in body["engines"]) == [D1, D3]
        assert (await gw.chat(model="medical")).status_code == 200
        assert two.models(D3) == [served(gw, "medical")]  # fewer adapters than D1


@pytest.mark.parametrize(
    "failure",
    [OSError("temporary failure in name resolution"), set()],
    ids=["dns-error", "no-address"],
)
async def test_discovery_failure_keeps_the_engines_and_the_watcher(
    config: Config,
    bootstrapped: Bootstrapped,
    monkeypatch: pytest.MonkeyPatch,
    failure: set[str] | BaseException,
) -> None:
    dns = Resolver({D1})
    fakes: dict[str, Engine] = {}
    settings = discovery_settings(config, bootstrapped, monkeypatch, dns)
    async with running_engines(settings, fakes) as two:
        pool = two.gw.state.engines
        [watcher] = [t for t in asyncio.all_tasks() if t.get_name() == "engine-watcher"]
        dns.answer = failure  # keep the engines we have: DNS may be back next round
        calls = len(dns.asked)
        await wait_until(
            lambda: watcher.done() or len(dns.asked) >= calls + 3, what="discovery rounds"
        )
        assert not watcher.done(), watcher.exception()
        assert [m.url for m in pool] == [D1]
        probes = fakes[D1].health_calls
        await wait_until(lambda: fakes[D1].health_calls > probes + 2, what="probes go on")
        dns.answer = {D1, D2}
        await wait_until(lambda: len(pool) == 2, what="D2 joined")


async def test_discovery_starts_with_no_engine_until_resolved(
    config: Config, bootstrapped: Bootstrapped, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns = Resolver({D1})
    dns.gate = asyncio.Event()  # the first look-up is still under way
    settings = discovery_settings(config, bootstrapped, monkeypatch, dns)
    async with running_engines(settings, {}, wait_ready=False) as two:
        gw = two.gw
        await wait_until(lambda: len(dns.asked) == 1, what="the first look-up")
        assert len(gw.state.engines) == 0
        assert_error(await gw.client.get("/readyz"), 503, "engine_unavailable")
        assert_error(await gw.chat(model="legal"), 503, "engine_unavailable")
        dns.gate.set()
        await gw.wait_ready(200)
        assert [m.url for m in gw.state.engines] == [D1]
        assert (await gw.chat(model="legal")).status_code == 200
        assert two.models(D1)[-1] == served(gw, "legal")


async def test_resolve_engine_urls_uses_scheme_and_port_of_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, int]] = []

    async def getaddrinfo(host: str, port: int, **kw: Any) -> list[Any]:
        calls.append((host, port))
        assert kw["type"] == socket.SOCK_STREAM
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port)),  # duplicate
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::2", port, 0, 0)),
        ]

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    engine = EngineSettings(url="http://engines.svc:8100/", discovery_dns="engines.svc")
    urls = await resolve_engine_urls(engine, "engines.svc")
    assert urls == {"http://10.0.0.1:8100", "http://[fd00::2]:8100"}
    assert calls == [("engines.svc", 8100)]
    engine = EngineSettings(url="https://engines.svc", discovery_dns="engines.svc")
    assert await resolve_engine_urls(engine, "other.svc") == {
        "https://10.0.0.1:443",
        "https://[fd00::2]:443",
    }
    assert calls[-1] == ("other.svc", 443)


# -- settings ---------------------------------------------------------------------------------


def test_settings_accept_urls_and_normalise_them() -> None:
    engine = EngineSettings(urls=[A + "/", B])
    assert engine.urls == [A, B]
    assert engine.engine_urls == [A, B]
    assert EngineSettings().engine_urls == [EngineSettings().url]
    assert EngineSettings(discovery_dns="engines.svc").spill_threshold == 16


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"urls": [A, B], "discovery_dns": "engines.svc"}, "not both"),
        ({"mode": "local", "urls": [A, B]}, "local"),
        ({"mode": "local", "discovery_dns": "engines.svc"}, "local"),
        ({"urls": [A, B, A]}, "distinct"),
        ({"urls": [A, A + "/"]}, "distinct"),
        ({"urls": [A, "ftp://engine:21"]}, "http"),
        ({"spill_threshold": 0}, "spill_threshold"),
        ({"discovery_interval_s": 0}, "discovery_interval_s"),
    ],
    ids=[
        "urls-and-dns",
        "local-with-urls",
        "local-with-dns",
        "duplicate",
        "duplicate-after-slash",
        "bad-scheme",
        "spill-zero",
        "interval-zero",
    ],
)
def test_settings_reject(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EngineSettings(**fields)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, config: Config) -> None:
    monkeypatch.setenv("LORAPLEX_ENGINE__URLS", f'["{A}", "{B}"]')
    monkeypatch.setenv("LORAPLEX_ENGINE__SPILL_THRESHOLD", "3")
    settings = Settings(tenants_file=config.tenants_file)
    assert settings.engine.urls == [A, B]
    assert settings.engine.spill_threshold == 3
