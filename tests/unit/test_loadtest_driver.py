"""Drivers against an in-process fake upstream (tiny request counts; no timing asserted)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from loadtest.bench.fake_upstream import EVENTS, build_app
from loadtest.cli import main as cli_main
from loadtest.driver import run_closed, run_open
from loadtest.scenario import parse_scenario
from loadtest.workload import RequestSpec, Workload


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    runner, url = await serve(build_app())
    yield url
    await runner.cleanup()


def workload(stream_share: float) -> Workload:
    return Workload(
        parse_scenario(
            {
                "tenants": [{"name": "t", "key": "k"}],
                "adapters": {"names": ["a", "b"], "popularity": "zipf"},
                "domains": [{"name": "d", "prompts": ["hi"]}],
                "stream_share": stream_share,
            }
        )
    )


async def test_closed_loop_stream_measures_every_event(upstream: str) -> None:
    wl = workload(1.0)
    run = await run_closed(upstream, iter(wl.next, None), 3, 12, 30.0)
    assert len(run.results) == 12
    assert run.mode == "closed"
    assert run.level == 3
    for r in run.results:
        assert r.ok
        assert r.stream
        assert r.ttft is not None
        assert 0 < r.ttft <= r.e2e
        assert len(r.gaps) == EVENTS - 1
        assert r.output_tokens == 16  # from the usage chunk the driver asked for
        assert r.events == EVENTS + 1  # text events + usage chunk
        assert r.chunks >= EVENTS  # aiohttp's server writes each event as its own chunk


async def test_open_loop_non_stream_and_bounds(upstream: str) -> None:
    wl = workload(0.0)
    seen: list[bool] = []
    run = await run_open(
        upstream,
        iter(wl.next, None),
        200.0,
        10,
        30.0,
        np.random.default_rng(1),
        progress=seen.append,
    )
    assert len(run.results) == 10 == len(seen)
    assert all(seen)
    assert all(
        r.ok and not r.stream and r.ttft is None and r.output_tokens == 1 for r in run.results
    )
    starts = sorted(r.start for r in run.results)
    assert starts[-1] > starts[0]  # spread out by the arrival process
    short = await run_open(upstream, iter(wl.next, None), 5.0, 1000, 0.3, np.random.default_rng(2))
    assert len(short.results) < 10  # the duration bound ends the level


async def test_errors_are_results_with_codes() -> None:
    async def not_found(_: web.Request) -> web.Response:
        body = {
            "error": {"message": "no", "type": "invalid_request_error", "code": "model_not_found"}
        }
        return web.json_response(body, status=404)

    async def plain(_: web.Request) -> web.Response:
        return web.Response(status=502, text="bad gateway")

    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n')
        await resp.write(b'data: {"error":{"message":"boom","code":"upstream_error"}}\n\n')
        return resp  # no [DONE]

    app = web.Application()
    app.add_routes(
        [web.post("/v1/chat/completions", not_found), web.post("/v1/completions", plain)]
    )
    runner, url = await serve(app)
    stream_app = web.Application()
    stream_app.add_routes([web.post("/v1/chat/completions", cut)])
    runner2, url2 = await serve(stream_app)
    try:
        one = workload(0.0).next()
        run = await run_closed(url, itertools.repeat(one), 1, 2, 10.0)
        assert [r.error for r in run.results] == ["model_not_found"] * 2
        assert run.results[0].status == 404
        completions = RequestSpec("t", "a", "d", False, 1, "/v1/completions", {}, b"{}")
        run = await run_closed(url, itertools.repeat(completions), 1, 1, 10.0)
        assert run.results[0].error == "http_502"
        streamed = workload(1.0).next()
        run = await run_closed(url2, itertools.repeat(streamed), 1, 1, 10.0)
        assert run.results[0].error == "upstream_error"
        assert run.results[0].ttft is not None
    finally:
        await runner.cleanup()
        await runner2.cleanup()
    dead = await run_closed(url, itertools.repeat(one), 1, 1, 10.0)
    assert dead.results[0].error == "connect_error"
    assert dead.results[0].status == 0


async def test_cli_end_to_end_writes_reports(upstream: str, tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "tenants: [{name: t, key: k}]\nadapters: {names: [a]}\n"
        "domains: [{name: d, prompts: [hi]}]\nstream_share: 0.5\n"
        "load: {mode: closed, levels: [1, 2], requests: 6, warmup_requests: 1}\n"
    )
    out = tmp_path / "out"
    code = await asyncio.to_thread(
        cli_main, [str(scenario), "--url", upstream + "/v1", "--out", str(out), "--quiet"]
    )
    assert code == 0
    assert {p.name for p in out.iterdir()} == {
        "report.json",
        "report.md",
        "latency_cdf.png",
        "throughput.png",
    }
    assert cli_main([str(tmp_path / "missing.yaml")]) == 2
