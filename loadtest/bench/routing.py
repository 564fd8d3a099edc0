"""Domain-routing cost: classify latency of the default classifier, and the gateway's added
latency with auto routing on vs off, as a ratio, in one run (docs/benchmarks.md, "Routing").

1. Classify: every held-out prompt (router/data/test.jsonl) `--rounds` times through the
   default TF-IDF classifier (and the keyword baseline), in process; p50/p99 per call, plus
   inputs cut at the default `max_chars`.
2. Gateway CPU (in process, `loadtest.bench.inproc`'s memory engine, no sockets): process CPU
   time per request, best of `--repeat`, naming the model vs model="auto" — steady on a busy
   machine, where wall-clock tails are not.
3. Gateway: a fake upstream, and one `loraplex serve` with the default routes, tenant entitled
   to fake `medical`/`legal`/`finance` adapters and `base`. Sequential requests (c=1) cycle
   through the held-out prompts; each round sends the same prompt three ways: straight to the
   upstream, to the gateway naming the model the router would choose (auto off: nothing is
   classified), and to the gateway with model="auto" (auto on). Added latency = gateway p50
   minus upstream p50; the ratio compares on with off.

    python -m loadtest.bench.routing [--requests 1500] [--rounds 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import orjson

from loadtest.bench.inproc import MemoryEngine, one
from loadtest.bench.procs import (
    BENCH_KEY,
    PY,
    fake_adapter_dir,
    fleet,
    free_port,
    gateway_cmd,
    gateway_config,
)
from router.domain_router import DomainRouter, build_classifier
from router.keyword import KeywordClassifier
from router.policy import DEFAULT_ROUTES, RoutesPolicy, load_routes, read_examples
from server.app import create_app
from server.gc_tuning import tune_gc
from server.settings import RouterSettings, Settings

DOMAIN_ADAPTERS = ("medical", "legal", "finance")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def time_classify(
    router: DomainRouter, texts: list[str], rounds: int, cold: bool = False
) -> tuple[list[float], list[float]]:
    """Wall and thread-CPU seconds per classify + policy decision, every text `rounds` times
    (after a warm-up). CPU time excludes the time the thread waited for a core. `cold`: the
    TF-IDF word cache is emptied before each call (every word new, as in a pasted document)."""
    for t in texts:
        router.route(t)
    blocks = getattr(router.classifier, "blocks", [])
    wall, cpu = [], []
    for _ in range(rounds):
        for t in texts:
            if cold:
                for b in blocks:
                    b.clear_caches()
            c0, w0 = time.thread_time(), time.perf_counter()
            router.route(t)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.thread_time() - c0)
    return wall, cpu


def classify_report(policy: RoutesPolicy, texts: list[str], rounds: int, artefact: Path) -> str:
    tfidf = DomainRouter(policy, build_classifier(policy, "tfidf", artefact))
    keyword = DomainRouter(policy, KeywordClassifier(policy.keywords))
    cap = RouterSettings().max_chars
    long_texts = [(" ".join(texts[i:] + texts[:i]))[:cap] for i in range(0, len(texts), 7)]
    lines = ["classify (in process, one call per request, µs):"]
    for name, router, sample, cold in (
        ("tfidf (default), held-out prompts", tfidf, texts, False),
        (f"tfidf (default), {cap}-char inputs", tfidf, long_texts, False),
        (f"tfidf, {cap} chars, cold word cache", tfidf, long_texts, True),
        ("keyword, held-out prompts", keyword, texts, False),
    ):
        wall, cpu = time_classify(router, sample, rounds, cold)
        lines.append(
            f"  {name:<36} wall p50 {percentile(wall, 50) * 1e6:7.1f} p99 "
            f"{percentile(wall, 99) * 1e6:8.1f} | cpu p50 {percentile(cpu, 50) * 1e6:7.1f} p99 "
            f"{percentile(cpu, 99) * 1e6:7.1f}   n={len(wall)}"
        )
    return "\n".join(lines)


async def inproc_report(texts: list[str], chosen: list[str], repeat: int, workdir: Path) -> str:
    """Gateway CPU per request in process: explicit model vs model="auto", same prompts."""
    adapters = {n: fake_adapter_dir(workdir, n) for n in DOMAIN_ADAPTERS}
    args, env = gateway_config(workdir / "inproc", adapters)
    settings = Settings.model_validate(
        {
            "tenants_file": args[1],
            "adapters_file": args[3],
            "registry": {
                "url": env["LORAPLEX_REGISTRY__URL"],
                "cache_dir": env["LORAPLEX_REGISTRY__CACHE_DIR"],
                "base_model_dir": env["LORAPLEX_REGISTRY__BASE_MODEL_DIR"],
                "allow_unknown_base": True,
            },
            "router": {"routes_file": DEFAULT_ROUTES, "artefact": workdir / "tfidf.npz"},
        }
    )
    app = create_app(settings, engine_factory=lambda _: MemoryEngine(16))

    def request(model: str, text: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}]})
        headers = [
            (b"authorization", f"Bearer {BENCH_KEY}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        return body, headers

    off = [request(m, t) for m, t in zip(chosen, texts, strict=True)]
    on = [request("auto", t) for t in texts]
    best: dict[str, float] = {}
    async with app.router.lifespan_context(app):
        for _ in range(200):
            if app.state.loraplex.ready:
                break
            await asyncio.sleep(0.05)
        for body, headers in off + on:  # warm up (and load the classifier)
            await one(app, body, headers)
        tune_gc()  # as `loraplex serve` does (server/gc_tuning.py)
        for _ in range(repeat):
            for name, reqs in (("auto off", off), ("auto on", on)):
                t0 = time.process_time()
                for _ in range(5):
                    for body, headers in reqs:
                        await one(app, body, headers)
                        await asyncio.sleep(0)  # one loop turn per request (inproc.run)
                per = (time.process_time() - t0) / (5 * len(reqs))
                best[name] = min(best.get(name, per), per)
    return (
        f"gateway CPU per request (in process, best of {repeat} x {5 * len(texts)}): "
        f"auto off {best['auto off'] * 1e6:.0f} µs, auto on {best['auto on'] * 1e6:.0f} µs; "
        f"ratio on/off {best['auto on'] / best['auto off']:.2f}"
    )


async def gateway_report(texts: list[str], chosen: list[str], requests: int, workdir: Path) -> str:
    adapters = {n: fake_adapter_dir(workdir, n) for n in DOMAIN_ADAPTERS}
    args, env = gateway_config(workdir / "gw", adapters)
    with fleet(workdir) as f:
        up = free_port()
        upstream = f"http://127.0.0.1:{up}"
        f.start("upstream", [PY, "-m", "loadtest.bench.fake_upstream", "--port", str(up)])
        f.ready("upstream", upstream + "/health")
        port = free_port()
        env |= {
            "LORAPLEX_ENGINE__URL": upstream,
            "LORAPLEX_ROUTER__ROUTES_FILE": str(DEFAULT_ROUTES),
            "LORAPLEX_ROUTER__ARTEFACT": str(workdir / "tfidf.npz"),
        }
        f.start("gateway", gateway_cmd(port, args), env)
        gateway = f"http://127.0.0.1:{port}"
        f.ready("gateway", gateway + "/readyz")
        lat: dict[str, list[float]] = {"upstream": [], "auto off": [], "auto on": []}
        auth = {"Authorization": f"Bearer {BENCH_KEY}"}
        async with httpx.AsyncClient(timeout=30) as client:

            async def send(url: str, model: str, text: str) -> float:
                body = {"model": model, "messages": [{"role": "user", "content": text}]}
                started = time.perf_counter()
                resp = await client.post(f"{url}/v1/chat/completions", json=body, headers=auth)
                elapsed = time.perf_counter() - started
                if resp.status_code != 200:
                    raise RuntimeError(f"{url} {model}: {resp.status_code} {resp.text[:200]}")
                if (
                    model == "auto"
                    and resp.headers["x-loraplex-adapter"].split("@")[0] != (chosen_by_text[text])
                ):
                    raise RuntimeError(f"gateway routed {text!r} elsewhere than the router")
                return elapsed

            chosen_by_text = dict(zip(texts, chosen, strict=True))
            for i in range(requests + 100):  # the first 100 rounds warm up
                text = texts[i % len(texts)]
                order = [
                    ("upstream", upstream, "base"),
                    ("auto off", gateway, chosen_by_text[text]),
                    ("auto on", gateway, "auto"),
                ]
                for name, url, model in order[i % 3 :] + order[: i % 3]:  # rotate the order
                    elapsed = await send(url, model, text)
                    if i >= 100:
                        lat[name].append(elapsed)
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    added_off = p50["auto off"] - p50["upstream"]
    added_on = p50["auto on"] - p50["upstream"]
    lines = [f"gateway, c=1, {requests} requests each (ms):"]
    for name, values in lat.items():
        lines.append(
            f"  {name:<9} p50 {p50[name] * 1e3:6.3f}   p99 {percentile(values, 99) * 1e3:6.3f}"
        )
    lines.append(
        f"  added by the gateway (p50 - upstream p50): auto off {added_off * 1e3:.3f} ms, "
        f"auto on {added_on * 1e3:.3f} ms; ratio on/off {added_on / added_off:.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=1500, help="per target (after warm-up)")
    ap.add_argument("--rounds", type=int, default=20, help="classify passes over the prompts")
    ap.add_argument("--repeat", type=int, default=5, help="in-process CPU measurement repeats")
    args = ap.parse_args(argv)
    policy = load_routes()
    texts = [e.text for e in read_examples(DEFAULT_ROUTES.parent / "test.jsonl")]
    with tempfile.TemporaryDirectory() as tmp:
        artefact = Path(tmp) / "tfidf.npz"
        print(classify_report(policy, texts, args.rounds, artefact))
        router = DomainRouter(policy, build_classifier(policy, "tfidf", artefact))
        chosen = [router.route(t).target for t in texts]
        print(json.dumps({"targets": {t: chosen.count(t) for t in sorted(set(chosen))}}))
        print(asyncio.run(inproc_report(texts, chosen, args.repeat, Path(tmp))))
        print(asyncio.run(gateway_report(texts, chosen, args.requests, Path(tmp))))


if __name__ == "__main__":
    main()
