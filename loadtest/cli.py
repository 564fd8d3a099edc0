"""`loraplex loadtest SCENARIO.yaml`: run a scenario's load levels, write JSON/Markdown/PNG.

    loraplex loadtest loadtest/scenarios/demo.yaml --url http://127.0.0.1:8080 --out report/
    loraplex loadtest s.yaml --mode open --levels 1 2 4 --requests 200 --duration 60

Any OpenAI-compatible URL works (vLLM direct, loraplex, another proxy); flags override the
scenario's `url` and `load` fields.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace
from pathlib import Path

from loadtest.driver import LevelRun, run_closed, run_open, warm_up
from loadtest.progress import ProgressBar
from loadtest.report import markdown, report_dict, write_json
from loadtest.scenario import Scenario, ScenarioError, load_scenario
from loadtest.stats import LevelSummary, summarize
from loadtest.workload import Workload


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="loraplex loadtest", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("scenario", type=Path, help="scenario YAML file")
    ap.add_argument("--url", help="base URL of the OpenAI-compatible server (overrides scenario)")
    ap.add_argument("--out", type=Path, default=Path("loadtest-report"), help="report directory")
    ap.add_argument("--mode", choices=["open", "closed"])
    ap.add_argument("--levels", type=float, nargs="+", help="rates (open) or concurrencies")
    ap.add_argument("--requests", type=int, help="max requests per level")
    ap.add_argument("--duration", type=float, help="max seconds per level")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def apply_overrides(s: Scenario, args: argparse.Namespace) -> Scenario:
    load = s.load
    if args.mode:
        load = replace(load, mode=args.mode)
    if args.levels:
        load = replace(load, levels=tuple(args.levels))
    if args.requests:
        load = replace(load, requests=args.requests)
    if args.duration:
        load = replace(load, duration_s=args.duration)
    s = replace(s, load=load)
    if args.url:
        s = replace(s, url=args.url)
    if args.seed is not None:
        s = replace(s, seed=args.seed)
    return s


async def run_levels(s: Scenario, url: str, quiet: bool = True) -> list[LevelRun]:
    """Every load level of the scenario, in order, each with its own seeded workload."""
    runs: list[LevelRun] = []
    lo = s.load
    for i, level in enumerate(lo.levels):
        wl = Workload(s, seed=s.seed + i)
        specs = iter(wl.next, None)
        await warm_up(url, specs, lo.warmup_requests, s.timeout_s)
        label = f"{'rate' if lo.mode == 'open' else 'c'}={level:g}"
        bar = ProgressBar(lo.requests, label) if not quiet else None
        if lo.mode == "open":
            run = await run_open(
                url, specs, level, lo.requests, lo.duration_s, wl.rng, s.timeout_s, bar
            )
        else:
            run = await run_closed(
                url, specs, int(level), lo.requests, lo.duration_s, s.timeout_s, bar
            )
        if bar is not None:
            bar.close()
        runs.append(run)
    return runs


def write_reports(
    s: Scenario, url: str, runs: list[LevelRun], out: Path, plots: bool = True
) -> tuple[list[LevelSummary], str]:
    out.mkdir(parents=True, exist_ok=True)
    levels = [summarize(r, s.slo) for r in runs]
    report = report_dict(s, url, levels)
    write_json(out / "report.json", report)
    md = markdown(report)
    (out / "report.md").write_text(md, encoding="utf-8")
    if plots:
        from loadtest.plots import latency_cdfs, throughput  # matplotlib only when asked

        latency_cdfs(runs, out / "latency_cdf.png")
        throughput(levels, out / "throughput.png")
    return levels, md


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        scenario = apply_overrides(load_scenario(args.scenario), args)
    except (OSError, ScenarioError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    if not scenario.url:
        print("loadtest: no target: set `url` in the scenario or pass --url", file=sys.stderr)
        return 2
    url = scenario.url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    runs = asyncio.run(run_levels(scenario, url, quiet=args.quiet))
    _, md = write_reports(scenario, url, runs, args.out, plots=not args.no_plots)
    print(md)
    print(f"reports written to {args.out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
