"""The real-engine benchmark's script runs end to end against any engine URL: here the fake
upstream stands in for vLLM (`--engine-url`), with a fake base model and adapters in a
manifest, so CI checks the wiring (registration on both sides, phases, table) in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loadtest.bench.procs import PY, fake_adapter_dir, fake_base_dir, fleet, free_port

REPO = Path(__file__).resolve().parents[2]


def test_engine_benchmark_against_a_fake_engine(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    adapters = [{"name": n, "path": fake_adapter_dir(tmp_path, n)} for n in ("medical", "legal")]
    manifest.write_text(
        json.dumps({"base": {"path": fake_base_dir(tmp_path)}, "adapters": adapters})
    )
    with fleet(tmp_path) as f:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        f.start("engine", [PY, "-m", "loadtest.bench.fake_upstream", "--port", str(port)])
        f.ready("engine", url + "/health")
        cmd = [sys.executable, "-m", "loadtest.bench.engine", "--engine-url", url]
        cmd += ["--manifest", str(manifest), "--scaling", "1", "2", "--requests", "3"]
        cmd += ["--rounds", "1", "--concurrency", "2", "--max-tokens", "4"]
        out = subprocess.run(
            cmd,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        ).stdout
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| phase")
    ]
    phases = {(r[0], r[1]) for r in rows}
    assert phases == {
        (p, side)
        for p in ("mixed 2 demo adapters", "1 adapter(s)", "2 adapter(s)")
        for side in ("direct", "gateway")
    }
    assert all(r[2] == "3/3" for r in rows), rows
