"""The overhead benchmark runs end to end (real processes, fake upstream) without errors.

Timing is not asserted here (machines are noisy); only that every target answered, the report
carries the ratios, and every streamed event arrived. LiteLLM is skipped (its venv is installed
by the benchmark itself, minutes, with network)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def table(out: str, header: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.mark.parametrize("stream", [False, True])
def test_overhead_benchmark_runs_and_reports_ratios(stream: bool) -> None:
    cmd = [sys.executable, "-m", "loadtest.bench.overhead", "--concurrency", "2"]
    cmd += ["--saturation", "0", "--seconds", "0.5", "--skip", "litellm"]
    out = subprocess.run(
        [*cmd, *(["--stream"] if stream else [])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = table(out, "| target | c | p50 ms")
    assert {r[0] for r in rows} == {
        "direct",
        "passthrough-httpx",
        "passthrough-aiohttp",
        "loraplex",
        "loraplex-auto",
    }
    assert all(r[7] == "0" for r in rows), rows  # errors
    assert all(r[8] != "-" for r in rows), rows  # CPU per request measured
    assert "| loraplex / passthrough-aiohttp | 2 |" in out
    assert "| loraplex-auto / passthrough-aiohttp | saturation |" in out
    if stream:
        fidelity = table(out, "| target | c | events sent")
        assert len(fidelity) == 5
        for r in fidelity:
            assert int(r[2]) > 0
            assert r[2] == r[3], r  # every event the upstream sent was received
            if r[0] in ("direct", "loraplex", "loraplex-auto"):
                assert float(r[4]) >= 0.9  # one HTTP chunk per event


@pytest.mark.parametrize("extra", [[], ["--stream"], ["--model", "auto"]])
def test_inproc_benchmark_runs(extra: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "loadtest.bench.inproc", "-n", "20", "--repeat", "1", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "gateway CPU per" in out
    assert " best " in out
