"""Stats math, goodput under an SLO, and the JSON / Markdown / PNG reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.cli import write_reports
from loadtest.driver import LevelRun, RequestResult
from loadtest.scenario import SLO, parse_scenario
from loadtest.stats import dist_ms, meets_slo, percentile, summarize


def result(
    e2e: float,
    *,
    stream: bool = False,
    ttft: float | None = None,
    gaps: list[float] | None = None,
    status: int = 200,
    error: str | None = None,
    tokens: int = 4,
) -> RequestResult:
    return RequestResult(
        "t",
        "a",
        "d",
        stream,
        0.0,
        status=status,
        error=error,
        e2e=e2e,
        ttft=ttft,
        gaps=gaps or [],
        output_tokens=tokens,
    )


def test_percentile_interpolates_and_handles_empty() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    d = dist_ms([0.001, 0.003])
    assert d["mean"] == pytest.approx(2.0)
    assert d["p50"] == pytest.approx(2.0)
    assert dist_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_slo_checks_each_bound() -> None:
    slo = SLO(ttft_ms=100, e2e_ms=1000, itl_ms=20)
    assert meets_slo(result(0.5, stream=True, ttft=0.05, gaps=[0.01, 0.02]), slo)
    assert not meets_slo(result(1.5), slo)  # e2e
    assert not meets_slo(result(0.5, stream=True, ttft=0.2), slo)  # ttft
    assert not meets_slo(result(0.5, stream=True, ttft=None), slo)  # no first token
    assert not meets_slo(result(0.5, stream=True, ttft=0.05, gaps=[0.03, 0.03]), slo)  # itl
    assert meets_slo(result(0.5, stream=False), slo)  # ttft/itl only bind streams
    assert not meets_slo(result(0.1, status=503, error="engine_unavailable"), slo)
    assert meets_slo(result(99.0), SLO())  # no bound set


def test_summary_counts_rates_errors_and_goodput() -> None:
    res = [
        result(0.1, tokens=10),
        result(0.2, tokens=10),
        result(3.0, tokens=10),  # over the e2e SLO
        result(0.1, stream=True, ttft=0.02, gaps=[0.01, 0.03], tokens=3),
        result(0.05, status=404, error="model_not_found"),
        result(0.05, status=0, error="timeout"),
    ]
    s = summarize(LevelRun("closed", 4, 2.0, res), SLO(e2e_ms=1000))
    assert (s.requests, s.ok) == (6, 4)
    assert s.rps == pytest.approx(2.0)
    assert s.output_tokens_per_s == pytest.approx(33 / 2)
    assert s.goodput_rps == pytest.approx(1.5)
    assert s.goodput_fraction == pytest.approx(3 / 6)
    assert s.errors == {"model_not_found": 1, "timeout": 1}
    assert s.ttft_ms["p50"] == pytest.approx(20.0)
    assert s.itl_ms["p50"] == pytest.approx(20.0)
    assert s.e2e_ms["p50"] == pytest.approx(150.0)
    assert s.stream_requests == 1


def test_reports_json_markdown_png(tmp_path: Path) -> None:
    scenario = parse_scenario(
        {
            "name": "unit",
            "tenants": [{"name": "t", "key": "k"}],
            "adapters": {"names": ["a"]},
            "domains": [{"name": "d", "prompts": ["x"]}],
            "load": {"mode": "open", "levels": [1, 2]},
            "slo": {"e2e_ms": 500},
        }
    )
    runs = [
        LevelRun("open", 1, 1.0, [result(0.1, stream=True, ttft=0.01, gaps=[0.01]), result(0.2)]),
        LevelRun(
            "open", 2, 1.0, [result(0.3), result(0.9, status=503, error="engine_unavailable")]
        ),
    ]
    levels, md = write_reports(scenario, "http://x", runs, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["scenario"] == "unit"
    assert report["mode"] == "open"
    assert [lv["level"] for lv in report["levels"]] == [1, 2]
    assert report["levels"][1]["errors"] == {"engine_unavailable": 1}
    assert report["slo"]["e2e_ms"] == 500
    assert (tmp_path / "report.md").read_text() == md
    assert "| req/s offered |" in md
    assert "engine_unavailable: 1" in md
    for png in ("latency_cdf.png", "throughput.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 5000
    assert len(levels) == 2
