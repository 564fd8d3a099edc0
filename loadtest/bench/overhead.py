"""Gateway overhead benchmark: one workload, in one run, sent
  direct                 to a fake OpenAI upstream (fixed answers, no model),
  passthrough-httpx      through a minimal Starlette + httpx.AsyncClient proxy,
  passthrough-aiohttp    through the same proxy on an aiohttp.ClientSession,
  loraplex               through the gateway (auth, tenant entitlement, adapter selection,
                         residency lease, request ids, metrics, access log),
  loraplex-auto          the same gateway with `model="auto"`: + domain routing (TF-IDF),
  litellm                through LiteLLM's proxy (own venv, installed on first use),
at several concurrencies plus a saturation level. Prints latency p50/p99 and what each adds to
`direct`, RPS, saturation RPS, the ratios loraplex/passthrough and loraplex/LiteLLM, and for
streams the fidelity (events sent by the upstream vs received, HTTP chunks per event, added
inter-event delay p99). Absolute numbers on a shared 2-core machine mean little; ratios do.

    python -m loadtest.bench.overhead [--concurrency 1 8 32] [--saturation 64] [--seconds 5]
        [--stream] [--skip litellm] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import orjson

from loadtest.bench import litellm_proxy
from loadtest.bench.procs import (
    BENCH_KEY,
    PY,
    Fleet,
    cpu_seconds,
    fake_adapter_dir,
    fleet,
    free_port,
    gateway_cmd,
    gateway_config,
)
from loadtest.driver import LevelRun, run_closed
from loadtest.stats import percentile
from loadtest.workload import RequestSpec

TARGETS = (
    "direct",
    "passthrough-httpx",
    "passthrough-aiohttp",
    "loraplex",
    "loraplex-auto",
    "litellm",
)
GATEWAYS = ("loraplex", "loraplex-auto")
MODEL = "bench"


@dataclass
class Result:
    target: str
    concurrency: int
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int
    sent_events: int = 0  # by the upstream, during the measured window
    text_events: int = 0  # received by the client
    chunks: int = 0
    streams: int = 0
    gap_p99_ms: float = 0.0
    cpu_us: float | None = None  # CPU time of the target's process per request


def spec(stream: bool, model: str = MODEL) -> RequestSpec:
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
    }
    if stream:
        body["stream"] = True
    headers = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
    return RequestSpec(
        "bench", model, "bench", stream, 1, "/v1/chat/completions", headers, orjson.dumps(body)
    )


def start_targets(f: Fleet, workdir: Path, targets: list[str]) -> dict[str, str]:
    """Start the fake upstream and the requested targets; return their base URLs."""
    up = free_port()
    upstream = f"http://127.0.0.1:{up}"
    f.start("direct", [PY, "-m", "loadtest.bench.fake_upstream", "--port", str(up)])
    f.ready("direct", upstream + "/health")
    urls = {"direct": upstream}
    for client in ("httpx", "aiohttp"):
        name = f"passthrough-{client}"
        if name in targets:
            port = free_port()
            cmd = [PY, "-m", "loadtest.bench.passthrough", "--port", str(port)]
            f.start(name, [*cmd, "--upstream", upstream, "--client", client])
            urls[name] = f"http://127.0.0.1:{port}"
    if "loraplex" in targets or "loraplex-auto" in targets:
        port = free_port()
        args, env = gateway_config(workdir / "gw", {MODEL: fake_adapter_dir(workdir)})
        env |= {"LORAPLEX_ENGINE__URL": upstream, "LORAPLEX_LOG_LEVEL": "info"}
        f.start("loraplex", gateway_cmd(port, args), env)
        urls["loraplex"] = urls["loraplex-auto"] = f"http://127.0.0.1:{port}"
    if "litellm" in targets:
        port = free_port()
        litellm_proxy.write_config(workdir / "litellm.yaml", upstream, MODEL)
        log = f.logdir / "litellm.log"
        f.adopt("litellm", litellm_proxy.start(workdir / "litellm.yaml", port, BENCH_KEY, log))
        urls["litellm"] = f"http://127.0.0.1:{port}"
    for name, url in urls.items():
        probe = {"loraplex": "/readyz", "litellm": "/health/liveliness"}.get(name, "/v1/models")
        if name not in ("direct", "loraplex-auto"):
            f.ready(name, url + probe, timeout_s=180 if name == "litellm" else 60)
    return {t: urls[t] for t in targets}


async def measure(
    url: str,
    upstream: str,
    concurrency: int,
    seconds: float,
    stream: bool,
    model: str,
    pid: int | None = None,
) -> tuple[LevelRun, int, float | None]:
    """Warm up, reset the upstream's counters, run the closed loop; (run, events sent, CPU
    seconds the process `pid` used meanwhile)."""
    one = spec(stream, model)
    await run_closed(url, itertools.repeat(one), concurrency, 10**9, min(1.0, seconds / 4))
    async with httpx.AsyncClient() as c:
        await c.post(upstream + "/stats/reset")
        cpu0 = cpu_seconds(pid) if pid else None
        run = await run_closed(url, itertools.repeat(one), concurrency, 10**9, seconds)
        cpu1 = cpu_seconds(pid) if pid else None
        sent = int((await c.get(upstream + "/stats")).json()["events"])
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return run, sent, cpu


def to_result(name: str, run: LevelRun, sent: int, cpu_s: float | None = None) -> Result:
    ok = [r for r in run.results if r.ok]
    lat = [r.e2e for r in ok]
    streams = [r for r in run.results if r.stream]
    gaps = [g for r in streams for g in r.gaps]
    return Result(
        name,
        int(run.level),
        (percentile(lat, 50) or 0) * 1000,
        (percentile(lat, 99) or 0) * 1000,
        len(ok) / run.elapsed_s,
        len(run.results) - len(ok),
        sent_events=sent,
        text_events=sum(len(r.gaps) + (r.ttft is not None) for r in streams),
        chunks=sum(r.chunks for r in streams),
        streams=len(streams),
        gap_p99_ms=(percentile(gaps, 99) or 0) * 1000,
        cpu_us=cpu_s / len(run.results) * 1e6 if cpu_s is not None and run.results else None,
    )


def report(results: list[Result], stream: bool) -> str:
    by = {(r.target, r.concurrency): r for r in results}
    levels = sorted({r.concurrency for r in results})
    names = [t for t in TARGETS if any(r.target == t for r in results)]
    out = [
        "| target | c | p50 ms | p99 ms | added p50 ms | added p99 ms | RPS | errors "
        "| CPU us/req |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in levels:
        d = by[("direct", c)]
        for t in names:
            r = by[(t, c)]
            cpu = "-" if r.cpu_us is None else f"{r.cpu_us:.0f}"
            out.append(
                f"| {t} | {c} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.p50_ms - d.p50_ms:+.2f} | "
                f"{r.p99_ms - d.p99_ms:+.2f} | {r.rps:.0f} | {r.errors} | {cpu} |"
            )
    sat = {t: max(by[(t, c)].rps for c in levels) for t in names}
    out += ["", "| target | saturation RPS (best of c=" + ",".join(map(str, levels)) + ") |"]
    out += ["|---|---|"] + [f"| {t} | {sat[t]:.0f} |" for t in names]
    out += ["", "| ratio | c | RPS ratio | added p50 ratio | added p99 ratio |"]
    out += ["|---|---|---|---|---|"]
    for gw in (g for g in GATEWAYS if g in names):
        for base in ("passthrough-aiohttp", "passthrough-httpx", "litellm"):
            if base not in names:
                continue
            for c in levels:
                lp, b, d = by[(gw, c)], by[(base, c)], by[("direct", c)]
                out.append(
                    f"| {gw} / {base} | {c} | {lp.rps / b.rps:.2f} | "
                    f"{_ratio(lp.p50_ms - d.p50_ms, b.p50_ms - d.p50_ms)} | "
                    f"{_ratio(lp.p99_ms - d.p99_ms, b.p99_ms - d.p99_ms)} |"
                )
            out.append(f"| {gw} / {base} | saturation | {sat[gw] / sat[base]:.2f} | | |")
    if stream:
        out += [
            "",
            "| target | c | events sent | events received | HTTP chunks per event | "
            "gap p99 ms | added gap p99 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in levels:
            d = by[("direct", c)]
            for t in names:
                r = by[(t, c)]
                per = r.chunks / (r.text_events + r.streams) if r.text_events else 0
                out.append(
                    f"| {t} | {c} | {r.sent_events} | {r.text_events} | {per:.2f} | "
                    f"{r.gap_p99_ms:.3f} | {r.gap_p99_ms - d.gap_p99_ms:+.3f} |"
                )
    return "\n".join(out)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0.005 else "-"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--saturation", type=int, default=64, help="extra level; 0 to skip")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[], choices=TARGETS[1:])
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)
    targets = [t for t in TARGETS if t not in args.skip]
    levels = [*args.concurrency, *([args.saturation] if args.saturation else [])]
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp, fleet(Path(tmp)) as f:
        urls = start_targets(f, Path(tmp), targets)
        for c in levels:
            for name, url in urls.items():
                model = "auto" if name == "loraplex-auto" else MODEL
                pid = f.procs["loraplex" if name == "loraplex-auto" else name].pid
                run, sent, cpu = asyncio.run(
                    measure(url, urls["direct"], c, args.seconds, args.stream, model, pid)
                )
                if not run.results:
                    raise RuntimeError(f"no request completed against {name}")
                r = to_result(name, run, sent, cpu)
                results.append(r)
                print(
                    f"  {name:<20} c={c:<3} p50 {r.p50_ms:7.2f} ms  {r.rps:7.0f} RPS"
                    f"  errors {r.errors}",
                    file=sys.stderr,
                    flush=True,
                )
    print(report(results, args.stream))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
