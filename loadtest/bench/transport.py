"""Upstream transport benchmark: the same Starlette passthrough on httpx.AsyncClient and on
aiohttp.ClientSession, each with the library's default pool limits and with a large pool, in
one run against the fake upstream. Picks the gateway's upstream client by measurement
(docs/decisions.md).

    python -m loadtest.bench.transport [--concurrency 1 8 32 64] [--seconds 5] [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from loadtest.bench.overhead import MODEL, Result, measure, to_result
from loadtest.bench.procs import PY, fleet, free_port

# (label, client, --pool): 0 = the library's defaults (httpx: 100 connections of which 20 kept
# alive; aiohttp: 100 connections, all kept alive).
VARIANTS = (
    ("httpx default pool (100/20 keep-alive)", "httpx", 0),
    ("httpx pool 512", "httpx", 512),
    ("aiohttp default pool (100)", "aiohttp", 0),
    ("aiohttp pool 512", "aiohttp", 512),
)


def report(results: list[Result]) -> str:
    direct = {r.concurrency: r for r in results if r.target == "direct"}
    out = [
        "| upstream client | c | p50 ms | p99 ms | added p50 ms | added p99 ms | RPS | errors "
        "| CPU us/req |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d = direct[r.concurrency]
        out.append(
            f"| {r.target} | {r.concurrency} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
            f"{r.p50_ms - d.p50_ms:+.2f} | {r.p99_ms - d.p99_ms:+.2f} | {r.rps:.0f} | {r.errors} "
            f"| {'-' if r.cpu_us is None else f'{r.cpu_us:.0f}'} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--stream", action="store_true")
    args = ap.parse_args(argv)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp, fleet(Path(tmp)) as f:
        up = free_port()
        upstream = f"http://127.0.0.1:{up}"
        f.start("direct", [PY, "-m", "loadtest.bench.fake_upstream", "--port", str(up)])
        f.ready("direct", upstream + "/health")
        urls = {"direct": upstream}
        keys: dict[str, str] = {}
        for i, (label, client, pool) in enumerate(VARIANTS):
            port = free_port()
            cmd = [PY, "-m", "loadtest.bench.passthrough", "--port", str(port)]
            cmd += ["--upstream", upstream, "--client", client, "--pool", str(pool)]
            f.start(f"v{i}", cmd)
            f.ready(f"v{i}", f"http://127.0.0.1:{port}/v1/models")
            urls[label] = f"http://127.0.0.1:{port}"
            keys[label] = f"v{i}"
        for c in args.concurrency:
            for name, url in urls.items():
                pid = f.procs["direct" if name == "direct" else keys[name]].pid
                run, sent, cpu = asyncio.run(
                    measure(url, upstream, c, args.seconds, args.stream, MODEL, pid)
                )
                r = to_result(name, run, sent, cpu)
                results.append(r)
                print(f"  {name:<40} c={c:<3} {r.rps:7.0f} RPS", file=sys.stderr, flush=True)
    print(report(results))


if __name__ == "__main__":
    main()
