"""Load-test reports: one JSON document (everything, for machines) and a Markdown summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest.scenario import Scenario
from loadtest.stats import LevelSummary


def report_dict(scenario: Scenario, url: str, levels: list[LevelSummary]) -> dict[str, Any]:
    return {
        "scenario": scenario.name,
        "url": url,
        "mode": scenario.load.mode,
        "slo": {
            "ttft_ms": scenario.slo.ttft_ms,
            "e2e_ms": scenario.slo.e2e_ms,
            "itl_ms": scenario.slo.itl_ms,
        },
        "levels": [lv.as_dict() for lv in levels],
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """A table per concern; one row per load level."""
    unit = "req/s offered" if report["mode"] == "open" else "concurrency"
    slo = ", ".join(f"{k} ≤ {v:g}" for k, v in report["slo"].items() if v is not None)
    lines = [
        f"# Load test: {report['scenario']}",
        "",
        f"Target `{report['url']}`, {report['mode']} loop; SLO: {slo or 'none set'}.",
        "",
        f"| {unit} | requests | ok | RPS | output tok/s | goodput RPS | goodput % | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lv in report["levels"]:
        errors = ", ".join(f"{k}: {v}" for k, v in lv["errors"].items()) or "-"
        lines.append(
            f"| {lv['level']:g} | {lv['requests']} | {lv['ok']} | {lv['rps']:.2f} | "
            f"{lv['output_tokens_per_s']:.1f} | {lv['goodput_rps']:.2f} | "
            f"{lv['goodput_fraction'] * 100:.0f} | {errors} |"
        )
    lines += [
        "",
        f"| {unit} | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | e2e p50 | e2e p90 | e2e p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lv in report["levels"]:
        t, i, e = lv["ttft_ms"], lv["itl_ms"], lv["e2e_ms"]
        lines.append(
            f"| {lv['level']:g} | {_f(t['p50'])} | {_f(t['p99'])} | {_f(i['p50'], 2)} | "
            f"{_f(i['p99'], 2)} | {_f(e['p50'])} | {_f(e['p90'])} | {_f(e['p99'])} |"
        )
    lines += ["", "Latencies in ms; TTFT and ITL over streamed requests only."]
    return "\n".join(lines) + "\n"
