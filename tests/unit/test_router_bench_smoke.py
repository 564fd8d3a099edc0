"""loadtest/bench/routing.py runs end to end (fake upstream, real gateway process, the default
classifier) and reports what the issue asks for. Timing is not asserted: machines are noisy;
only that every part ran and the gateway routed each prompt where the router would have."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_routing_benchmark_runs_and_reports_the_ratio() -> None:
    args = ["--requests", "20", "--rounds", "1", "--repeat", "1"]
    out = subprocess.run(
        [sys.executable, "-m", "loadtest.bench.routing", *args],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=240,
    ).stdout
    assert re.search(r"tfidf \(default\), held-out prompts\s+wall p50\s+[\d.]+ p99", out), out
    assert "cold word cache" in out
    assert re.search(r"gateway CPU per request .* ratio on/off [\d.]+", out), out
    assert re.search(r"auto on\s+p50\s+[\d.]+\s+p99", out), out
    assert re.search(r"added by the gateway .* ratio on/off [\d.]+", out), out
