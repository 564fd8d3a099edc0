"""The gateway's request path stays light: no torch/peft/transformers, fast import and build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "peft", "transformers", "vllm", "sklearn", "scipy", "matplotlib")

PROBE = """
import json, sys, time
t0 = time.perf_counter()
import server.app, server.main, server.pipeline, adapters.registry
from server.settings import Settings
t1 = time.perf_counter()
app = server.app.create_app(Settings())
t2 = time.perf_counter()
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[1])))
print(json.dumps({"import_s": t1 - t0, "create_s": t2 - t1, "heavy": heavy,
                  "routes": len(app.routes)}))
"""


def test_gateway_import_is_light_and_fast() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(HEAVY)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"gateway import {result['import_s'] * 1000:.0f} ms, "
        f"create_app {result['create_s'] * 1000:.0f} ms"
    )
    assert result["heavy"] == [], f"request path imports {result['heavy']}"
    assert result["routes"] > 5
    assert result["import_s"] < 2.0
    assert result["create_s"] < 1.0
