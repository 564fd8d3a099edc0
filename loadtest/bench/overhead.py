"""Gateway overhead benchmark: the same workload direct to a fake upstream, through minimal
passthrough proxies (httpx and aiohttp clients), and through loraplex (auth + adapter selection
+ metrics on), in one run, at several concurrencies. Prints latency p50/p99, RPS and the ratios
that matter; absolute numbers on a shared 2-core machine mean little, ratios do.

    python -m loadtest.bench.overhead [--concurrency 1 8 32] [--seconds 5] [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import orjson

from server.auth import hash_key

KEY = "sk-bench"
BODY = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@dataclass
class Result:
    target: str
    concurrency: int
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def servers(workdir: Path) -> Iterator[dict[str, str]]:
    """Start the fake upstream, both passthroughs and the gateway; yield target URLs."""
    py = sys.executable
    up, ph, pa, gw = (free_port() for _ in range(4))
    upstream = f"http://127.0.0.1:{up}"
    adapter = workdir / "bench"
    adapter.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / f).write_text("{}")
    (workdir / "tenants.yaml").write_text(
        f"tenants:\n  bench:\n    key_sha256: {hash_key(KEY)}\n    adapters: [bench]\n"
        "    default: bench\n"
    )
    (workdir / "adapters.yaml").write_text(f"adapters:\n  bench: {adapter}\n")
    env = {**os.environ, "LORAPLEX_ENGINE__URL": upstream, "LORAPLEX_LOG_LEVEL": "warning"}
    cmds = [
        [py, "-m", "loadtest.bench.fake_upstream", "--port", str(up)],
        [
            py,
            "-m",
            "loadtest.bench.passthrough",
            "--port",
            str(ph),
            "--upstream",
            upstream,
            "--client",
            "httpx",
        ],
        [
            py,
            "-m",
            "loadtest.bench.passthrough",
            "--port",
            str(pa),
            "--upstream",
            upstream,
            "--client",
            "aiohttp",
        ],
        [
            py,
            "-m",
            "server.main",
            "serve",
            "--port",
            str(gw),
            "--tenants-file",
            str(workdir / "tenants.yaml"),
            "--adapters-file",
            str(workdir / "adapters.yaml"),
        ],
    ]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in cmds]
    try:
        wait_ready(f"{upstream}/health")
        wait_ready(f"http://127.0.0.1:{gw}/readyz")
        for port in (ph, pa):
            wait_ready(f"http://127.0.0.1:{port}/v1/models")
        yield {
            "direct": upstream,
            "passthrough-httpx": f"http://127.0.0.1:{ph}",
            "passthrough-aiohttp": f"http://127.0.0.1:{pa}",
            "loraplex": f"http://127.0.0.1:{gw}",
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


async def drive(url: str, concurrency: int, seconds: float, stream: bool) -> Result | None:
    """Closed loop: `concurrency` workers send back-to-back requests for `seconds`."""
    body = orjson.dumps({**BODY, "stream": stream})
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(until: float, record: bool) -> None:
            nonlocal errors
            while time.perf_counter() < until:
                t = time.perf_counter()
                async with session.post(
                    url + "/v1/chat/completions", data=body, headers=headers
                ) as resp:
                    await resp.read()
                    ok = resp.status == 200
                if record:
                    latencies.append(time.perf_counter() - t)
                    errors += not ok

        warm_until = time.perf_counter() + min(1.0, seconds / 4)
        await asyncio.gather(*(worker(warm_until, False) for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    if not latencies:
        return None
    ordered = sorted(latencies)
    return Result(
        "",
        concurrency,
        statistics.median(ordered) * 1000,
        ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
        len(latencies) / elapsed,
        errors,
    )


def report(results: list[Result]) -> str:
    lines = [
        "| target | c | p50 ms | p99 ms | RPS | errors | added p50 ms vs direct |",
        "|---|---|---|---|---|---|---|",
    ]
    direct = {r.concurrency: r for r in results if r.target == "direct"}
    for r in results:
        added = r.p50_ms - direct[r.concurrency].p50_ms
        lines.append(
            f"| {r.target} | {r.concurrency} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.rps:.0f} | "
            f"{r.errors} | {added:+.2f} |"
        )
    lines.append("")
    by = {(r.target, r.concurrency): r for r in results}
    for c in sorted(direct):
        lp = by[("loraplex", c)]
        for base in ("passthrough-httpx", "passthrough-aiohttp"):
            b = by[(base, c)]
            lines.append(
                f"c={c}: loraplex/{base} RPS ratio {lp.rps / b.rps:.2f}, "
                f"p50 ratio {lp.p50_ms / b.p50_ms:.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--stream", action="store_true")
    args = ap.parse_args(argv)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp, servers(Path(tmp)) as targets:
        for c in args.concurrency:
            for name, url in targets.items():
                r = asyncio.run(drive(url, c, args.seconds, args.stream))
                if r is None:
                    raise RuntimeError(f"no request completed against {name}")
                r.target = name
                results.append(r)
                print(
                    f"  {name:<20} c={c:<3} p50 {r.p50_ms:7.2f} ms  {r.rps:7.0f} RPS",
                    file=sys.stderr,
                    flush=True,
                )
    print(report(results))


if __name__ == "__main__":
    main()
