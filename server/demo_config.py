"""Demo configuration: tenants and adapters files derived from the prepared model's manifest.

The demo keys are public (printed in the README); real deployments write their own files with
`loraplex hash-key` digests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from server.auth import hash_key

DEMO_ADMIN_KEY = "sk-demo-admin"


def demo_tenants(adapters: list[str]) -> dict[str, dict[str, Any]]:
    """One tenant per domain adapter plus `acme`, entitled to all of them and the base."""
    tenants: dict[str, dict[str, Any]] = {
        f"{name}-team": {
            "key": f"sk-demo-{name}",
            "adapters": [name, "base"],
            "default": name,
        }
        for name in adapters
    }
    tenants["acme"] = {"key": "sk-demo-acme", "adapters": [*adapters, "base"], "default": "base"}
    return tenants


def write_demo_config(manifest_path: Path, out: Path) -> list[Path]:
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    adapters = {a["name"]: a["path"] for a in manifest["adapters"]}
    out.mkdir(parents=True, exist_ok=True)
    tenants = {
        name: {
            "key_sha256": hash_key(spec["key"]),
            "adapters": spec["adapters"],
            "default": spec["default"],
        }
        for name, spec in demo_tenants(sorted(adapters)).items()
    }
    tenants_file = out / "tenants.yaml"
    tenants_file.write_text(
        "# Demo tenants. Keys (public, demo only): "
        + ", ".join(f"{n}={s['key']}" for n, s in demo_tenants(sorted(adapters)).items())
        + "\n"
        + yaml.safe_dump({"tenants": tenants}, sort_keys=True),
        encoding="utf-8",
    )
    adapters_file = out / "adapters.yaml"
    adapters_file.write_text(yaml.safe_dump({"adapters": adapters}), encoding="utf-8")
    return [tenants_file, adapters_file]
