"""LiteLLM's proxy as a comparison target, installed into its own venv on first use.

LiteLLM pins many packages of its own, so it never enters the gateway's venv:
`.cache/venv-litellm` is created from the package registry (pinned version, stamp file so it is
installed once). 1.106.0: later 1.106.x patches need a certifi release the registry lacks here,
and 1.107.0 was a compromised release.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".cache" / "venv-litellm"
REQUIREMENT = "litellm[proxy]==1.106.0"


def ensure_venv(venv: Path = VENV) -> Path:
    """Create the venv and install LiteLLM unless the stamp says it is there; its CLI path."""
    stamp = venv / ".loraplex-stamp"
    cli = venv / "bin" / "litellm"
    if stamp.exists() and stamp.read_text() == REQUIREMENT and cli.exists():
        return cli
    print(f"[litellm] installing {REQUIREMENT} into {venv} (a few minutes)", file=sys.stderr)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", REQUIREMENT], check=True
    )
    stamp.write_text(REQUIREMENT)
    return cli


def write_config(path: Path, upstream: str, model: str) -> None:
    """One OpenAI-compatible deployment pointing at `upstream`; no DB, no callbacks."""
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": upstream + "/v1",
                    "api_key": "unused",
                },
            }
        ],
        "litellm_settings": {"telemetry": False, "drop_params": True, "set_verbose": False},
        "general_settings": {"disable_spend_logs": True},
    }
    path.write_text(yaml.safe_dump(config))


def start(config: Path, port: int, master_key: str, log: Path) -> subprocess.Popen[bytes]:
    """Start `litellm --config FILE --port N` (one worker) with the master key in its env."""
    cli = ensure_venv()
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": master_key,
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "DISABLE_SCHEMA_UPDATE": "true",
    }
    env.pop("DATABASE_URL", None)
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(cli), "--config", str(config), "--port", str(port), "--num_workers", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
