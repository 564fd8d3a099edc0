"""Soak run: a gateway over the fake upstream at a fixed share of its saturation throughput for
a long while, checking that nothing accumulates (memory, file descriptors, asyncio tasks).

`python -m loadtest.soak --minutes 20 --load 0.8` starts the fake upstream and a gateway (this
source tree) and finds the saturation rate: the highest open-loop arrival rate of the soak's
own mix that is still served in full (nothing shed, no 5xx, p99 under 0.5 s; doubled, then
bisected). It then sends that mix at `load` times that rate for `minutes`: answers and
streams, plus the paths that must clean up after themselves — unknown models (404), wrong
keys (401), and clients that hang up in the middle of a stream. The gateway's own resources
are read before (after a warm-up) and after (once the load stopped and in-flight work drained)
from `GET /admin/v1/runtime` (asyncio tasks, engine connections) and /proc (RSS, open fds),
and sampled every `--sample-s` seconds in between. Targets: RSS growth < 5 %, no more fds or
tasks after than before. Prints a JSON report (also written to `--out`), exits 1 when a target
is missed. Not part of CI: one run takes `minutes` plus about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from loadtest.bench.procs import (
    BENCH_KEY,
    PY,
    fake_adapter_dir,
    fleet,
    free_port,
    gateway_cmd,
    gateway_config,
)
from loadtest.stats import percentile

MAX_RSS_GROWTH = 0.05
CHAT = {"model": "soak", "messages": [{"role": "user", "content": "hello there"}]}


@dataclass
class Tally:
    """What the load generator saw; latencies of good answers in a bounded reservoir."""

    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    seen: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(7))  # noqa: S311

    def latency(self, seconds: float, keep: int = 20_000) -> None:
        self.seen += 1
        if len(self.latencies) < keep:
            self.latencies.append(seconds)
        elif (i := self.rng.randrange(self.seen)) < keep:
            self.latencies[i] = seconds


async def one_request(session: aiohttp.ClientSession, url: str, kind: str, tally: Tally) -> None:
    """One request of the mix; `kind`: ok, stream, not_found, bad_key, hang_up."""
    body: dict[str, Any] = dict(CHAT)
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    if kind in ("stream", "hang_up"):
        body["stream"] = True
    if kind == "not_found":
        body["model"] = "no-such-adapter"
    if kind == "bad_key":
        headers["Authorization"] = "Bearer sk-not-a-key"
    started = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            if kind == "hang_up":
                await r.content.readany()  # the first bytes, then the client goes away
                r.close()
                tally.outcomes["hang_up"] += 1
                return
            await r.read()
            tally.outcomes[f"{kind}:{r.status}"] += 1
            if r.status == 200:
                tally.latency(time.perf_counter() - started)
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.outcomes[f"{kind}:{type(exc).__name__}"] += 1


def pick(rng: random.Random) -> str:
    x = rng.random()
    if x < 0.45:
        return "ok"
    if x < 0.90:
        return "stream"
    if x < 0.95:
        return "not_found"
    if x < 0.98:
        return "bad_key"
    return "hang_up"


@dataclass
class Probe:
    rate: float
    achieved: float
    shed: int
    failed: int  # 5xx answers and transport errors
    p99_ms: float | None

    @property
    def sustainable(self) -> bool:
        return (
            self.shed == 0
            and self.failed == 0
            and self.achieved >= 0.95 * self.rate
            and self.p99_ms is not None
            and self.p99_ms < 500
        )


async def probe(url: str, rate: float, seconds: float, max_in_flight: int) -> Probe:
    tally, elapsed = await open_loop(url, rate, seconds, _noop, 3600, max_in_flight)
    failed = sum(
        n
        for outcome, n in tally.outcomes.items()
        if outcome != "shed" and not outcome.endswith(("200", "401", "404", "hang_up"))
    )
    sent = sum(n for outcome, n in tally.outcomes.items() if outcome != "shed")
    return Probe(
        rate,
        round(sent / elapsed, 1),
        tally.outcomes["shed"],
        failed,
        _ms(percentile(tally.latencies, 99)),
    )


async def saturation(
    url: str, step_s: float, max_in_flight: int
) -> tuple[float, list[dict[str, Any]]]:
    """The highest sustainable open-loop rate: doubled from 50/s, then bisected 3 times."""
    probes: list[Probe] = []

    async def run(rate: float) -> bool:
        probes.append(await probe(url, rate, step_s, max_in_flight))
        await asyncio.sleep(2)  # let a failed probe's backlog drain
        return probes[-1].sustainable

    good, bad, rate = 0.0, 0.0, 50.0
    while rate <= 20_000:
        if not await run(rate):
            bad = rate
            break
        good, rate = rate, rate * 2
    if bad:
        for _ in range(3):
            mid = (good + bad) / 2
            if await run(mid):
                good = mid
            else:
                bad = mid
    return good, [p.__dict__ for p in probes]


async def open_loop(
    url: str, rate: float, seconds: float, sample: Any, sample_s: float, max_in_flight: int
) -> tuple[Tally, float]:
    """Arrivals at `rate` per second (evenly spaced) for `seconds`; `sample()` every
    `sample_s`. Arrivals over `max_in_flight` are not sent and counted as `shed`."""
    tally = Tally()
    rng = random.Random(11)  # noqa: S311 - a traffic mix, not a secret
    in_flight: set[asyncio.Task[None]] = set()
    async with _session(max_in_flight) as session:
        t0 = time.monotonic()
        next_sample = t0 + sample_s
        sent = 0
        while (now := time.monotonic()) < t0 + seconds:
            due = int((now - t0) * rate) - sent
            for _ in range(due):
                sent += 1
                if len(in_flight) >= max_in_flight:
                    tally.outcomes["shed"] += 1
                    continue
                task = asyncio.create_task(one_request(session, url, pick(rng), tally))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if now >= next_sample:
                next_sample += sample_s
                await sample()
            await asyncio.sleep(0.002)
        if in_flight:
            await asyncio.wait(in_flight)
        elapsed = time.monotonic() - t0
    return tally, elapsed


def _session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit),
        timeout=aiohttp.ClientTimeout(total=60),
    )


def runtime(url: str, admin_key: str, pid: int) -> dict[str, Any]:
    """The gateway's resources: its runtime endpoint (asyncio tasks) and /proc (RSS, fds)."""
    out: dict[str, Any] = {"at": round(time.time(), 1)}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        resp = httpx.get(
            f"{url}/admin/v1/runtime",
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=10,
        )
        if resp.status_code == 200:
            data = resp.json()
            out["tasks"] = data.get("tasks")
            out["engine_connections"] = data.get("engine_connections")
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    out["rss_mib"] = round(rss_kib / 1024, 1)
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed while listing
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            kinds[target.split(":", 1)[0] if ":" in target else "file"] += 1
    out["open_fds"] = sum(kinds.values())
    out["fd_kinds"] = dict(sorted(kinds.items()))
    return out


def verdict(before: dict[str, Any], after: dict[str, Any], answered: int) -> dict[str, Any]:
    """The targets; a soak that got no answers proves nothing and fails (`load_ok`)."""
    growth = (after["rss_mib"] - before["rss_mib"]) / before["rss_mib"]
    checks = {
        "answered": answered,
        "load_ok": answered > 0,
        "rss_growth": round(growth, 4),
        "rss_ok": growth < MAX_RSS_GROWTH,
        "fds_ok": after["open_fds"] <= before["open_fds"],
    }
    if before.get("tasks") is not None and after.get("tasks") is not None:
        checks["tasks_ok"] = after["tasks"] <= before["tasks"]
    else:
        checks["tasks_ok"] = None  # the gateway has no runtime endpoint: not measured
    checks["ok"] = all(v is not False for k, v in checks.items() if k.endswith("_ok"))
    return checks


async def soak(args: argparse.Namespace, url: str, admin_key: str, pid: int) -> dict[str, Any]:
    timeline: list[dict[str, Any]] = []

    async def sample() -> None:
        timeline.append(await asyncio.to_thread(runtime, url, admin_key, pid))

    best, steps = await saturation(url, args.step_s, args.max_in_flight)
    if best <= 0:
        raise SoakError(f"the gateway did not serve the mix in full even at 50/s: {steps[-1]}")
    rate = best * args.load
    # Warm-up at the soak's rate: allocator pools, caches and connection pools reach their
    # working size before the "before" reading.
    await open_loop(url, rate, args.warmup_s, _noop, 3600, args.max_in_flight)
    await asyncio.sleep(args.settle_s)
    before = await asyncio.to_thread(runtime, url, admin_key, pid)
    tally, elapsed = await open_loop(
        url, rate, args.minutes * 60, sample, args.sample_s, args.max_in_flight
    )
    await asyncio.sleep(args.settle_s)  # in-flight work drains, idle connections close
    after = await asyncio.to_thread(runtime, url, admin_key, pid)
    answered = sum(n for outcome, n in tally.outcomes.items() if outcome.endswith(":200"))
    waited = args.settle_s
    # Sockets the clients just closed can take the server a moment to notice: a leak is what
    # is still there after --drain-s more seconds.
    while waited < args.settle_s + args.drain_s and not verdict(before, after, answered)["ok"]:
        await asyncio.sleep(2)
        waited += 2
        after = await asyncio.to_thread(runtime, url, admin_key, pid)
    after["after_s"] = waited
    lat = tally.latencies
    return {
        "minutes": args.minutes,
        "load": args.load,
        "saturation_rps": round(best, 1),
        "saturation_probes": steps,
        "target_rps": round(rate, 1),
        "achieved_rps": round(sum(tally.outcomes.values()) / elapsed, 1),
        "outcomes": dict(sorted(tally.outcomes.items())),
        "latency_ms": {
            "p50": _ms(percentile(lat, 50)),
            "p99": _ms(percentile(lat, 99)),
        },
        "before": before,
        "after": after,
        "timeline": timeline,
        "verdict": verdict(before, after, answered),
    }


class SoakError(RuntimeError):
    """The soak could not run as planned (nothing it measured would mean anything)."""


async def _noop() -> None:
    return None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--load", type=float, default=0.8, help="share of the saturation rate")
    ap.add_argument("--step-s", type=float, default=6.0, help="per saturation probe")
    ap.add_argument("--warmup-s", type=float, default=20.0)
    # Longer than the engine pool's keep-alive (4 s): idle connections are closed by then.
    ap.add_argument("--settle-s", type=float, default=10.0)
    ap.add_argument("--drain-s", type=float, default=30.0, help="longest extra wait for after")
    ap.add_argument("--sample-s", type=float, default=30.0)
    ap.add_argument("--max-in-flight", type=int, default=512)
    ap.add_argument("--workdir", type=Path, default=Path(".cache/soak"))
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)

    # Absolute: the gateway refuses relative adapter sources.
    work = args.workdir.resolve() / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    admin_key = "sk-soak-admin-" + secrets.token_hex(8)
    adapter = fake_adapter_dir(work / "src", "soak")
    gw_args, env = gateway_config(work / "gw", {"soak": adapter})
    env.pop("LORAPLEX_ROUTER__ROUTES_FILE")  # no auto routing in this mix
    up_port, gw_port = free_port(), free_port()
    env |= {
        "LORAPLEX_ENGINE__URL": f"http://127.0.0.1:{up_port}",
        "LORAPLEX_ADMIN_KEY": admin_key,
        "LORAPLEX_LOG_LEVEL": "warning",
    }
    url = f"http://127.0.0.1:{gw_port}"
    with fleet(work) as procs:
        procs.start("upstream", [PY, "-m", "loadtest.bench.fake_upstream", "--port", str(up_port)])
        procs.ready("upstream", f"http://127.0.0.1:{up_port}/health")
        procs.start("gateway", gateway_cmd(gw_port, gw_args), env)
        procs.ready("gateway", f"{url}/readyz")
        pid = procs.procs["gateway"].pid
        try:
            report = asyncio.run(soak(args, url, admin_key, pid))
        except SoakError as exc:
            print(f"soak: {exc} (logs: {work})", file=sys.stderr)
            return 1
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if report["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
