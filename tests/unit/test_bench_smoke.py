"""The overhead benchmark runs end to end (real processes, fake upstream) without errors.

Timing is not asserted here (machines are noisy); only that every target answered and the
report carries the ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_overhead_benchmark_runs_and_reports_ratios() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "loadtest.bench.overhead", "--concurrency", "2", "--seconds", "0.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "target" not in line]
    targets = {row.split("|")[1].strip(): row.split("|")[6].strip() for row in rows}
    assert set(targets) == {"direct", "passthrough-httpx", "passthrough-aiohttp", "loraplex"}
    assert all(errors == "0" for errors in targets.values()), targets
    assert "c=2: loraplex/passthrough-aiohttp RPS ratio" in out
