"""Demo configuration: tenants and adapters files derived from the prepared model's manifest.

The demo keys are public (printed in the README); real deployments write their own files with
`loraplex hash-key` digests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from router.policy import DEFAULT_ROUTES
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


def write_demo_routes(out: Path) -> Path:
    """The default routes (router/data/routes.yaml) for the demo, where tenant `acme` is routed
    automatically: its requests that name no model go through the domain router."""
    routes = yaml.safe_load(DEFAULT_ROUTES.read_text(encoding="utf-8"))
    routes["examples_files"] = [str(DEFAULT_ROUTES.parent / f) for f in routes["examples_files"]]
    routes["tenants"] = {"acme": {"auto": True}}
    path = out / "routes.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Demo routes: the default routes file plus tenant overrides (docs/router.md).\n"
        + yaml.safe_dump(routes, sort_keys=False),
        encoding="utf-8",
    )
    return path
