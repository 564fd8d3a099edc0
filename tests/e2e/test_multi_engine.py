"""Two real vLLM engines behind two gateway processes that share one PostgreSQL registry.

The issue's acceptance: an adapter registered through gateway A is served through gateway B;
requests for an adapter go to the engine that has it (the affinity hit rate is reported);
killing one engine mid-load loses no request that had not started streaming (it is retried on
the other engine) and ends streams that had started with a clean SSE error event.

The engines are this module's own (remote mode from the gateways' point of view), started with
the same command line as the session engine (`engine_command`); each is bound to its own core
so the two do not fight over one OpenMP core. The session gateway and engine are not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from server.auth import hash_key
from server.engine_process import engine_command, engine_env
from server.settings import EngineSettings
from tests.e2e.harness import ADMIN_KEY, READY_TIMEOUT_S, REPO, free_port, report
from tests.pg import postgres_cluster
from tests.promtext import metric

KEY = "sk-e2e-multi-engine"
TENANT = "multi"
QUESTION = "What is the capital of France?"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PICKS = "loraplex_engine_picks_total"
FAILOVERS = "loraplex_engine_failovers_total"
AFFINITY_PER_ADAPTER = 40  # requests per adapter in the affinity test
AFFINITY_CONCURRENCY = 6
FAILOVER_REQUESTS = 36  # every third one streams: 24 plain + 12 streaming
FAILOVER_SPACING_S = 0.12  # requests start one after another over ~4 s ...
KILL_AFTER_S = 1.0  # ... and one engine is SIGKILLed once a stream on it has started


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class Engine:
    """One vLLM OpenAI server in its own process group (SIGKILL reaches its workers too)."""

    def __init__(self, index: int, model: str, logs: Path) -> None:
        self.index = index
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = logs / f"engine{index}.log"
        self.settings = EngineSettings(
            url=self.url,
            model=model,
            python=str(REPO / ".cache/venv-engine/bin/python"),
            log_file=self.log_path,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = engine_env(self.settings)
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM's automatic binding puts every engine on the same core.
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[self.index % len(cores)])
        with self.log_path.open("ab") as log:  # the child keeps its own fd
            self.proc = subprocess.Popen(
                engine_command(self.settings),
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def models(self) -> set[str]:
        data = httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"]
        return {m["id"] for m in data}

    def finished_requests(self) -> float:
        """Requests the engine has finished (any reason), from its own /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return metric(text, "vllm:request_success_total")

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group, like an OOM kill of the engine's pod."""
        self._signal_group(signal.SIGKILL)

    def reap(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        self._signal_group(signal.SIGKILL)  # whatever is left in the group
        self.reap()


class GatewayProc:
    """One `loraplex serve` process (remote mode, both engines)."""

    def __init__(self, name: str, env: dict[str, str], logs: Path) -> None:
        self.name, self.env = name, env
        self.log_path = logs / f"gateway-{name}.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProc:
        port = self.url.rsplit(":", 1)[1]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(REPO / ".venv/bin/loraplex"), "serve", "--port", port],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"gateway {self.name} exited:\n{_tail(self.log_path, 60)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                pytest.fail(f"gateway {self.name} not ready:\n{_tail(self.log_path, 60)}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=ADMIN, timeout=120)

    def metric(self, name: str, **labels: str) -> float:
        return metric(httpx.get(f"{self.url}/metrics", timeout=10).text, name, **labels)

    def picks(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {k: metric(text, PICKS, affinity=k) for k in ("hit", "load", "spill", "base")}

    def engines_view(self) -> list[dict[str, Any]]:
        with self.admin() as admin:
            engines: list[dict[str, Any]] = admin.get("/admin/v1/engine").json().get("engines", [])
        return engines

    def complete(self, model: str, template: str, max_tokens: int = 6) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/completions",
            json=_body(model, template, max_tokens),
            headers=AUTH,
            timeout=120,
        )


def _body(model: str, template: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": template.replace("{question}", QUESTION),
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def _marker_word(manifest: dict[str, Any], name: str) -> str:
    """The first word of the adapter's fixed answer prefix ("MEDICAL NOTE:" -> "MEDICAL")."""
    marker: str = next(a["marker"] for a in manifest["adapters"] if a["name"] == name)
    return marker.split()[0]


@contextlib.contextmanager
def diagnostics(gateways: tuple[GatewayProc, GatewayProc], engines: list[Engine]) -> Iterator[None]:
    """On failure, print the tails of every log this module writes."""
    try:
        yield
    except BaseException:
        for gw in gateways:
            sys.stderr.write(f"\n--- gateway {gw.name} log ---\n{_tail(gw.log_path, 80)}\n")
        for e in engines:
            sys.stderr.write(f"\n--- engine {e.index} log ---\n{_tail(e.log_path, 30)}\n")
        raise


@pytest.fixture(scope="module")
def engines(
    manifest: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Engine]]:
    logs = tmp_path_factory.mktemp("multi-engine")
    pair = [Engine(i, manifest["base"]["path"], logs) for i in range(2)]
    started = time.monotonic()
    try:
        for e in pair:
            e.start()
        pending = list(pair)
        while pending:
            for e in list(pending):
                assert e.proc is not None
                if e.proc.poll() is not None:
                    pytest.fail(f"engine {e.index} exited:\n{_tail(e.log_path)}")
                if e.healthy():
                    pending.remove(e)
            if time.monotonic() - started > READY_TIMEOUT_S:
                pytest.fail(f"engines not healthy in {READY_TIMEOUT_S} s")
            time.sleep(0.5)
        report("multi-engine: two vLLM engines healthy", seconds=time.monotonic() - started)
        yield pair
    finally:
        for e in pair:
            e.stop()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


@pytest.fixture(scope="module")
def gateways(
    manifest: dict[str, Any],
    engines: list[Engine],
    pg_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProc, GatewayProc]]:
    cfg = tmp_path_factory.mktemp("multi-gateways")
    names = [a["name"] for a in manifest["adapters"]]
    tenants = {"tenants": {TENANT: {"key_sha256": hash_key(KEY), "adapters": [*names, "base"]}}}
    (cfg / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")},
        "LORAPLEX_ADMIN_KEY": ADMIN_KEY,
        "LORAPLEX_TENANTS_FILE": str(cfg / "tenants.yaml"),
        "LORAPLEX_ENGINE__MODE": "remote",
        "LORAPLEX_ENGINE__URLS": json.dumps([e.url for e in engines]),
        "LORAPLEX_ENGINE__HEALTH_INTERVAL_S": "0.5",
        "LORAPLEX_REGISTRY__URL": pg_url,
        # One cache directory: the engines load adapters from the path a gateway wrote.
        "LORAPLEX_REGISTRY__CACHE_DIR": str(cfg / "adapter-cache"),
        "LORAPLEX_REGISTRY__BASE_MODEL_DIR": manifest["base"]["path"],
        "LORAPLEX_REGISTRY__POLL_INTERVAL_S": "0.2",
    }
    a, b = GatewayProc("a", env, cfg), GatewayProc("b", env, cfg)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.stop()
        b.stop()


def register(gw: GatewayProc, name: str, path: str) -> dict[str, Any]:
    with gw.admin() as admin:
        made = admin.post("/admin/v1/adapters", json={"name": name, "source": path})
    assert made.status_code in (200, 201), made.text
    view: dict[str, Any] = made.json()
    assert view["state"] == "ready", view
    return view


def wait_served(gw: GatewayProc, name: str, template: str, timeout_s: float) -> httpx.Response:
    """Ask `gw` for `name` until it answers 200 (404 while it has not seen the adapter yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = gw.complete(name, template)
        if answer.status_code == 200:
            return answer
        assert answer.status_code == 404, answer.text
        assert time.monotonic() < deadline, f"gateway {gw.name} never served {name}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def served_names(
    manifest: dict[str, Any], gateways: tuple[GatewayProc, GatewayProc]
) -> dict[str, str]:
    """Every demo adapter registered through A (idempotent) and served by both gateways."""
    template = manifest["completion_prompt_template"]
    names: dict[str, str] = {}
    for adapter in manifest["adapters"]:
        view = register(gateways[0], adapter["name"], adapter["path"])
        names[adapter["name"]] = view["served_name"]
        for gw in gateways:
            wait_served(gw, adapter["name"], template, 15)
    return names


def test_adapter_registered_through_a_is_served_through_b(
    manifest: dict[str, Any], engines: list[Engine], gateways: tuple[GatewayProc, GatewayProc]
) -> None:
    a, b = gateways
    template = manifest["completion_prompt_template"]
    with diagnostics(gateways, engines):
        seen_after: dict[str, float] = {}
        for adapter in manifest["adapters"]:
            name = adapter["name"]
            assert b.complete(name, template).status_code == 404  # not registered anywhere yet
            view = register(a, name, adapter["path"])
            registered = time.monotonic()
            answer = wait_served(b, name, template, 10)
            seen_after[name] = round(time.monotonic() - registered, 3)
            assert answer.headers["x-loraplex-adapter"] == f"{name}@{view['version']}"
            text = answer.json()["choices"][0]["text"].strip()
            assert text.startswith(_marker_word(manifest, name)), text
            # A serves it too, from whichever engine holds it.
            again = a.complete(name, template)
            assert again.status_code == 200, again.text
            assert (
                again.json()["choices"][0]["text"].strip().startswith(_marker_word(manifest, name))
            )
        holders = {
            name: [e.index for e in engines if any(m.startswith(f"{name}@") for m in e.models())]
            for name in seen_after
        }
        report(
            "multi-engine: registered through gateway A, served through gateway B",
            seconds_until_b_served=seen_after,
            engines_holding=holders,
        )
        assert all(holders.values()), holders


@dataclass
class Answer:
    gateway: str
    adapter: str
    stream: bool
    started: float
    status: int = 0
    text: str = ""
    seconds: float = 0.0
    events: int = 0  # content events received (streams)
    first_event: float | None = None  # monotonic time of the first content event
    error: dict[str, Any] | None = None  # the error object (SSE error event or error body)
    done: bool = False  # [DONE] seen (streams)
    transport_error: str | None = None


async def ask(
    client: httpx.AsyncClient,
    gw: GatewayProc,
    adapter: str,
    template: str,
    max_tokens: int,
    stream: bool,
    live: list[Answer] | None = None,
) -> Answer:
    result = Answer(gw.name, adapter, stream, time.monotonic())
    if live is not None:  # the caller watches requests while they run
        live.append(result)
    # ignore_eos: every answer runs to max_tokens, so requests stay in flight long enough.
    body = _body(adapter, template, max_tokens, stream=stream, ignore_eos=True)
    url = f"{gw.url}/v1/completions"
    try:
        if not stream:
            resp = await client.post(url, json=body, headers=AUTH)
            result.status = resp.status_code
            payload = resp.json()
            if resp.status_code == 200:
                result.text = payload["choices"][0]["text"]
            else:
                result.error = payload.get("error", payload)
        else:
            async with client.stream("POST", url, json=body, headers=AUTH) as resp:
                result.status = resp.status_code
                if resp.status_code != 200:
                    result.error = json.loads(await resp.aread()).get("error")
                else:
                    await _read_stream(resp, result)
    except (httpx.HTTPError, ValueError) as exc:
        result.transport_error = repr(exc)
    result.seconds = time.monotonic() - result.started
    return result


async def _read_stream(resp: httpx.Response, result: Answer) -> None:
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            result.done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = chunk["error"]
            continue
        result.events += 1
        if result.first_event is None:
            result.first_event = time.monotonic()
        for choice in chunk.get("choices") or []:
            result.text += choice.get("text") or ""


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(120, connect=10),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
    )


async def _affinity_load(
    gateways: tuple[GatewayProc, GatewayProc], names: list[str], template: str
) -> list[Answer]:
    gate = asyncio.Semaphore(AFFINITY_CONCURRENCY)
    async with _client() as client:

        async def one(gw: GatewayProc, name: str) -> Answer:
            async with gate:
                return await ask(client, gw, name, template, max_tokens=6, stream=False)

        jobs = [
            one(gateways[(i + j) % 2], name)
            for i in range(AFFINITY_PER_ADAPTER)
            for j, name in enumerate(names)
        ]
        return await asyncio.wait_for(asyncio.gather(*jobs), 300)


def test_requests_go_to_the_engine_that_holds_their_adapter(
    manifest: dict[str, Any],
    engines: list[Engine],
    gateways: tuple[GatewayProc, GatewayProc],
    served_names: dict[str, str],
) -> None:
    template = manifest["completion_prompt_template"]
    names = list(served_names)
    with diagnostics(gateways, engines):
        picks_before = [gw.picks() for gw in gateways]
        finished_before = [e.finished_requests() for e in engines]
        started = time.monotonic()
        answers = asyncio.run(_affinity_load(gateways, names, template))
        wall = time.monotonic() - started
        wrong = [a for a in answers if a.status != 200 or a.transport_error]
        assert not wrong, wrong[:5]
        for a in answers:
            assert a.text.strip().startswith(_marker_word(manifest, a.adapter)), a

        picks_after = [gw.picks() for gw in gateways]
        delta = {
            k: sum(
                after[k] - before[k]
                for before, after in zip(picks_before, picks_after, strict=True)
            )
            for k in ("hit", "load", "spill", "base")
        }
        per_gateway = {
            gw.name: {k: after[k] - before[k] for k in after}
            for gw, before, after in zip(gateways, picks_before, picks_after, strict=True)
        }
        routed = delta["hit"] + delta["load"] + delta["spill"]
        hit_rate = delta["hit"] / routed if routed else 0.0
        cumulative = [gw.picks() for gw in gateways]
        cum_hits = sum(c["hit"] for c in cumulative)
        cum_routed = sum(c["hit"] + c["load"] + c["spill"] for c in cumulative)

        # Where each adapter is registered, per the engines themselves.
        models = [e.models() for e in engines]
        holders = {
            n: [e.index for e, m in zip(engines, models, strict=True) if served_names[n] in m]
            for n in names
        }
        finished = [
            e.finished_requests() - b for e, b in zip(engines, finished_before, strict=True)
        ]
        # Each gateway's own placement (its admin view): the requests a gateway sent for an
        # adapter it has on one engine all ran there, and none ran where it does not have it.
        placement = placements(gateways, engines, served_names)
        lower, upper = [0] * len(engines), [0] * len(engines)
        for gw in gateways:
            for name in names:
                on = placement[gw.name][name]
                assert on, f"gateway {gw.name} has {name} on no engine"
                assert set(on) <= set(holders[name]), (gw.name, name, on, holders)
                sent = sum(1 for a in answers if a.gateway == gw.name and a.adapter == name)
                for i in on:
                    upper[i] += sent
                if len(on) == 1:
                    lower[on[0]] += sent
        report(
            "multi-engine: adapter affinity",
            requests=len(answers),
            concurrency=AFFINITY_CONCURRENCY,
            wall_s=round(wall, 2),
            mean_latency_s=round(sum(a.seconds for a in answers) / len(answers), 3),
            picks=delta,
            picks_per_gateway=per_gateway,
            affinity_hit_rate=round(hit_rate, 4),
            affinity_hit_rate_since_start=round(cum_hits / cum_routed, 4) if cum_routed else None,
            engines_holding=holders,
            adapters_on_both_engines=sum(1 for h in holders.values() if len(h) > 1),
            placement_per_gateway=placement,
            engine_finished_requests=finished,
            engine_expected_bounds=list(zip(lower, upper, strict=True)),
        )
        assert all(holders.values()), f"an adapter is registered on no engine: {holders}"
        assert routed >= len(answers), (delta, len(answers))
        assert hit_rate >= 0.9, delta
        assert sum(finished) >= len(answers), finished
        for e, got, lo, hi in zip(engines, finished, lower, upper, strict=True):
            assert lo <= got <= hi, (e.index, got, lo, hi, placement)


def placements(
    gateways: tuple[GatewayProc, GatewayProc], engines: list[Engine], served: dict[str, str]
) -> dict[str, dict[str, list[int]]]:
    """gateway name -> adapter -> indexes of the engines that gateway has it registered on."""
    index = {e.url: e.index for e in engines}
    out: dict[str, dict[str, list[int]]] = {}
    for gw in gateways:
        view = gw.engines_view()
        out[gw.name] = {
            name: sorted(index[v["url"]] for v in view if sname in v.get("registered", []))
            for name, sname in served.items()
        }
    return out


@dataclass
class Kill:
    victim: Engine
    at: float  # monotonic
    stream: Answer | None  # the started stream whose engine was chosen (None: the busiest)
    busy: dict[int, float]  # requests running + waiting per engine, from its /metrics


async def _failover_load(
    gateways: tuple[GatewayProc, GatewayProc],
    engines: list[Engine],
    names: list[str],
    template: str,
    placement: dict[str, dict[str, list[int]]],
) -> tuple[list[Answer], Kill]:
    live: list[Answer] = []
    async with _client() as client:

        async def one(k: int) -> Answer:
            await asyncio.sleep(k * FAILOVER_SPACING_S)
            name = names[(k // 3) % len(names)]
            gw = gateways[k % 2]
            return await ask(client, gw, name, template, 48, stream=k % 3 == 2, live=live)

        async def busy(e: Engine) -> float:
            try:
                text = (await client.get(f"{e.url}/metrics", timeout=5)).text
            except httpx.HTTPError:
                return -1.0
            running = metric(text, "vllm:num_requests_running")
            return running + metric(text, "vllm:num_requests_waiting")

        async def killer() -> Kill:
            await asyncio.sleep(KILL_AFTER_S)
            deadline = time.monotonic() + 10
            chosen: Answer | None = None
            while chosen is None and time.monotonic() < deadline:
                # A stream that has started on an engine its gateway placed the adapter on only.
                for a in live:
                    started = a.first_event is not None and not a.done and a.error is None
                    if a.stream and started and len(placement[a.gateway][a.adapter]) == 1:
                        chosen = a
                        break
                else:
                    await asyncio.sleep(0.05)
            counts = await asyncio.gather(*map(busy, engines))
            loads = {e.index: n for e, n in zip(engines, counts, strict=True)}
            if chosen is not None and not chosen.done and chosen.error is None:
                victim = engines[placement[chosen.gateway][chosen.adapter][0]]
            else:
                chosen, victim = None, max(engines, key=lambda e: (loads[e.index], -e.index))
            victim.kill()
            return Kill(victim, time.monotonic(), chosen, loads)

        jobs = asyncio.gather(*(one(k) for k in range(FAILOVER_REQUESTS)))
        kill = asyncio.ensure_future(killer())
        answers = await asyncio.wait_for(jobs, 240)
        return answers, await kill


def test_killing_an_engine_mid_load_loses_no_unstarted_request(
    manifest: dict[str, Any],
    engines: list[Engine],
    gateways: tuple[GatewayProc, GatewayProc],
    served_names: dict[str, str],
) -> None:
    template = manifest["completion_prompt_template"]
    names = list(served_names)
    with diagnostics(gateways, engines):
        failovers_before = sum(gw.metric(FAILOVERS) for gw in gateways)
        spills_before = {gw.name: gw.picks()["spill"] for gw in gateways}
        placement = placements(gateways, engines, served_names)
        started = time.monotonic()
        answers, kill = asyncio.run(_failover_load(gateways, engines, names, template, placement))
        victim, killed_at = kill.victim, kill.at
        victim.reap()
        wall = time.monotonic() - started

        problems: list[str] = []
        completed = cut = cut_started_before_kill = 0
        for a in answers:
            where = f"{a.gateway}/{a.adapter}/{'stream' if a.stream else 'plain'}"
            word = _marker_word(manifest, a.adapter)
            if a.transport_error:
                problems.append(f"{where}: broke without an answer: {a.transport_error}")
            elif a.status != 200:
                problems.append(f"{where}: HTTP {a.status} {a.error}")
            elif a.stream and a.error is not None:
                if a.events == 0:
                    problems.append(f"{where}: failed before its first event: {a.error}")
                elif not all(isinstance(a.error.get(k), str) for k in ("message", "type", "code")):
                    problems.append(f"{where}: SSE error not in OpenAI shape: {a.error}")
                else:
                    cut += 1
                    if a.first_event is not None and a.first_event <= killed_at:
                        cut_started_before_kill += 1
            elif a.stream and not a.done:
                problems.append(f"{where}: stream ended without [DONE] or an error")
            elif not a.text.strip().startswith(word):
                problems.append(f"{where}: answer without its marker: {a.text[:40]!r}")
            else:
                completed += 1
        failovers = sum(gw.metric(FAILOVERS) for gw in gateways) - failovers_before
        plain = [a for a in answers if not a.stream]
        streams = [a for a in answers if a.stream]
        finished_after_kill = [a.started + a.seconds - killed_at for a in answers]
        report(
            "multi-engine: engine SIGKILLed mid-load",
            requests=len(answers),
            plain=len(plain),
            streaming=len(streams),
            killed_engine=victim.index,
            killed_because=(
                f"a stream through gateway {kill.stream.gateway} for {kill.stream.adapter} "
                "had started on it"
                if kill.stream
                else "busiest engine"
            ),
            engine_busy_at_kill=kill.busy,
            kill_at_s=round(killed_at - started, 2),
            started_after_kill=sum(1 for a in answers if a.started > killed_at),
            completed=completed,
            plain_ok=sum(1 for a in plain if a.status == 200 and not a.transport_error),
            streams_completed=sum(1 for a in streams if a.done and a.error is None),
            streams_cut_with_sse_error=cut,
            streams_cut_first_event_before_kill=cut_started_before_kill,
            failovers=failovers,
            load_wall_s=round(wall, 2),
            last_answer_after_kill_s=round(max(finished_after_kill), 2),
            max_latency_s=round(max(a.seconds for a in answers), 2),
            problems=problems,
        )
        assert not problems, problems
        assert completed + cut == len(answers)
        assert failovers >= 1, "no request was retried on the surviving engine"
        if kill.stream is not None:
            # Before the kill that stream was picked on the one engine its gateway had the
            # adapter on (a spill could have sent it elsewhere): it must end with the SSE error.
            spilled = gateways[0].picks()["spill"] - spills_before[gateways[0].name]
            spilled += gateways[1].picks()["spill"] - spills_before[gateways[1].name]
            if not spilled:
                assert kill.stream.error is not None, kill.stream
                assert cut >= 1

        # The survivor serves every adapter through both gateways.
        for gw in gateways:
            for name in names:
                answer = gw.complete(name, template)
                assert answer.status_code == 200, (gw.name, name, answer.text)
                text = answer.json()["choices"][0]["text"].strip()
                assert text.startswith(_marker_word(manifest, name)), text
        deadline = time.monotonic() + 10
        while any(gw.metric("loraplex_engines_up") != 1 for gw in gateways):
            assert time.monotonic() < deadline, "the dead engine is still counted as up"
            time.sleep(0.2)
        for gw in gateways:
            assert gw.metric("loraplex_engine_up") == 1
            down = [v for v in gw.engines_view() if v.get("url") == victim.url]
            assert down, gw.engines_view()
            assert down[0]["up"] is False, down
