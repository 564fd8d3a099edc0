"""A/B of gateway source trees on this machine: the same workload through a loraplex gateway
started from each tree (e.g. a copy of the repository without one change), plus the aiohttp
passthrough as the yardstick, against one fake upstream. Trees take turns level by level and
round by round, so the machine's background load hits them alike; the medians over the rounds
and each tree's ratio to the first tree and to the passthrough are printed.

    python -m loadtest.bench.ab --tree before=/tmp/copy --tree after=. [--model auto]
        [--concurrency 1 64] [--seconds 4] [--rounds 3] [--stream]

Per level: p50 latency added to the upstream's (measured in the same round), RPS, and the
gateway's CPU per request (from /proc). A tree is a directory holding `server/` etc.: the
gateway runs `python -m server.main serve` with that directory as its working directory.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from loadtest.bench.overhead import MODEL, measure, to_result
from loadtest.bench.procs import (
    PY,
    fake_adapter_dir,
    fleet,
    free_port,
    gateway_cmd,
    gateway_config,
)

BASELINE = "passthrough-aiohttp"


def parse_tree(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not (Path(path) / "server").is_dir():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR with DIR/server: {text!r}")
    return name, Path(path).resolve()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tree", type=parse_tree, action="append", required=True)
    ap.add_argument("--model", default=MODEL, help='"auto": through domain routing')
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stream", action="store_true")
    args = ap.parse_args(argv)
    trees: dict[str, Path] = dict(args.tree)
    names = ["direct", BASELINE, *trees]
    rows: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, fleet(Path(tmp)) as f:
        up = free_port()
        upstream = f"http://127.0.0.1:{up}"
        f.start("direct", [PY, "-m", "loadtest.bench.fake_upstream", "--port", str(up)])
        f.ready("direct", upstream + "/health")
        urls = {"direct": upstream}
        port = free_port()
        cmd = [PY, "-m", "loadtest.bench.passthrough", "--port", str(port)]
        f.start(BASELINE, [*cmd, "--upstream", upstream, "--client", "aiohttp"])
        urls[BASELINE] = f"http://127.0.0.1:{port}"
        f.ready(BASELINE, urls[BASELINE] + "/v1/models")
        for name, tree in trees.items():
            port = free_port()
            cfg, env = gateway_config(Path(tmp) / name, {MODEL: fake_adapter_dir(Path(tmp))})
            env |= {"LORAPLEX_ENGINE__URL": upstream, "LORAPLEX_LOG_LEVEL": "info"}
            f.start(name, gateway_cmd(port, cfg), env, cwd=tree)
            urls[name] = f"http://127.0.0.1:{port}"
            f.ready(name, urls[name] + "/readyz")
        for rnd in range(args.rounds):
            for c in args.concurrency:
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                for name in order:
                    model = args.model if name in trees else MODEL
                    run, sent, cpu = asyncio.run(
                        measure(
                            urls[name],
                            upstream,
                            c,
                            args.seconds,
                            args.stream,
                            model,
                            f.procs[name].pid,
                        )
                    )
                    if not run.results or any(not r.ok for r in run.results):
                        bad = [r.error or r.status for r in run.results if not r.ok][:3]
                        raise RuntimeError(f"{name}: failed requests {bad}")
                    r = to_result(name, run, sent, cpu)
                    rows.setdefault((name, c), []).append((r.p50_ms, r.rps, r.cpu_us or 0.0))
                    print(
                        f"  round {rnd + 1} c={c:<3} {name:<20} p50 {r.p50_ms:6.2f} ms "
                        f"{r.rps:7.0f} RPS {r.cpu_us or 0:6.0f} us/req",
                        file=sys.stderr,
                        flush=True,
                    )
    print(report(rows, names, list(trees), args.concurrency, args.rounds))


def report(
    rows: dict[tuple[str, int], list[tuple[float, float, float]]],
    names: list[str],
    trees: list[str],
    levels: list[int],
    rounds: int,
) -> str:
    """Medians over rounds; added p50 is per round (target minus direct), then the median."""
    out = [
        f"medians of {rounds} rounds",
        "",
        "| target | c | added p50 ms | RPS | CPU us/req | added p50 / passthrough | "
        f"RPS / passthrough | RPS / {trees[0]} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in levels:
        direct = rows[("direct", c)]
        base = rows[(BASELINE, c)]
        first = rows[(trees[0], c)]
        for name in names[1:]:
            mine = rows[(name, c)]
            added = [m[0] - d[0] for m, d in zip(mine, direct, strict=True)]
            vs_base = [
                (m[0] - d[0]) / (b[0] - d[0]) if b[0] - d[0] > 0.005 else float("nan")
                for m, b, d in zip(mine, base, direct, strict=True)
            ]
            rps_base = [m[1] / b[1] for m, b in zip(mine, base, strict=True)]
            rps_first = [m[1] / f[1] for m, f in zip(mine, first, strict=True)]
            out.append(
                f"| {name} | {c} | {statistics.median(added):+.3f} | "
                f"{statistics.median(m[1] for m in mine):.0f} | "
                f"{statistics.median(m[2] for m in mine):.0f} | "
                f"{statistics.median(vs_base):.2f} | {statistics.median(rps_base):.2f} | "
                f"{statistics.median(rps_first):.2f} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    main()
