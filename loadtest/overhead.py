"""Latency of one request direct to the engine vs through the gateway, measured in one run.

Requests alternate between the two paths (same body, greedy, fixed length) so machine noise hits
both alike; prints medians, p90s, the added milliseconds and the ratio. Usage:

    python -m loadtest.overhead --gateway http://127.0.0.1:8080 --engine http://127.0.0.1:8100 \
        --key sk-demo-acme --model medical [-n 20] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx


def measure(
    client: httpx.Client, url: str, headers: dict[str, str], body: dict[str, object]
) -> float:
    started = time.perf_counter()
    resp = client.post(url, json=body, headers=headers)
    elapsed = time.perf_counter() - started
    resp.raise_for_status()
    return elapsed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--model", default="base")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    body: dict[str, object] = {
        "model": args.model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }
    path = "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {args.key}"}
    direct: list[float] = []
    gateway: list[float] = []
    with httpx.Client(timeout=300) as client:
        measure(client, args.engine + path, {}, body)  # warm both paths
        measure(client, args.gateway + path, auth, body)
        for i in range(args.n):
            pair = [(direct, args.engine + path, {}), (gateway, args.gateway + path, auth)]
            for sink, url, headers in pair if i % 2 == 0 else reversed(pair):
                sink.append(measure(client, url, headers, body))
    d50, g50 = statistics.median(direct), statistics.median(gateway)
    print(f"requests per path: {args.n} (model={args.model}, max_tokens={args.max_tokens})")
    print(f"direct  p50 {d50 * 1000:8.1f} ms   p90 {pct(direct, 0.9) * 1000:8.1f} ms")
    print(f"gateway p50 {g50 * 1000:8.1f} ms   p90 {pct(gateway, 0.9) * 1000:8.1f} ms")
    print(f"added p50 {(g50 - d50) * 1000:+.2f} ms   ratio gateway/direct {g50 / d50:.3f}")


if __name__ == "__main__":
    main()
