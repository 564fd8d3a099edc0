"""Fixtures: adapter dirs and config files in tmp_path, a fake engine, a running gateway."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from server.auth import hash_key
from server.settings import EngineSettings, Settings
from tests.unit.fakes import FakeEngine
from tests.unit.helpers import (
    ACME_KEY,
    ACME_OLD_KEY,
    ADMIN_KEY,
    BETA_KEY,
    NODEFAULT_KEY,
    Gateway,
    running_gateway,
)

DECLARED = ("legal", "medical", "finance", "broken")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read LORAPLEX_* env vars; the developer's shell must not leak into tests."""
    for name in list(os.environ):
        if name.startswith("LORAPLEX_"):
            monkeypatch.delenv(name)


def make_adapter_dir(root: Path, name: str, *, weights: str = "adapter_model.safetensors") -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA"}', encoding="utf-8")
    (d / weights).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return d


@dataclass(frozen=True)
class Config:
    root: Path
    tenants_file: Path
    adapters_file: Path
    adapter_dirs: dict[str, Path]

    def settings(self, **overrides: Any) -> Settings:
        engine = EngineSettings(
            **{"health_interval_s": 0.02, "retry_after_s": 3, **overrides.pop("engine", {})}
        )
        base: dict[str, Any] = {
            "tenants_file": self.tenants_file,
            "adapters_file": self.adapters_file,
            "admin_key": SecretStr(ADMIN_KEY),
            "max_body_bytes": 64 * 1024,
            "engine": engine,
        }
        base.update(overrides)
        return Settings(**base)


TENANTS: dict[str, dict[str, Any]] = {
    "acme": {
        "key_sha256": [hash_key(ACME_KEY), hash_key(ACME_OLD_KEY).upper()],
        "adapters": ["legal", "medical", "base", "extra", "broken", "ghost"],
        "default": "legal",
    },
    "beta": {"key_sha256": hash_key(BETA_KEY), "adapters": ["finance"], "default": "finance"},
    "nodefault": {"key_sha256": [hash_key(NODEFAULT_KEY)], "adapters": ["medical", "base"]},
}


@pytest.fixture
def config(tmp_path: Path) -> Config:
    adapters_root = tmp_path / "adapters"
    dirs = {n: make_adapter_dir(adapters_root, n) for n in (*DECLARED, "extra")}
    dirs["bin-only"] = make_adapter_dir(adapters_root, "bin-only", weights="adapter_model.bin")
    (adapters_root / "empty").mkdir()
    dirs["empty"] = adapters_root / "empty"
    tenants_file = tmp_path / "tenants.yaml"
    tenants_file.write_text(yaml.safe_dump({"tenants": TENANTS}), encoding="utf-8")
    adapters_file = tmp_path / "adapters.yaml"
    adapters_file.write_text(
        yaml.safe_dump({"adapters": {n: str(dirs[n]) for n in DECLARED}}), encoding="utf-8"
    )
    return Config(tmp_path, tenants_file, adapters_file, dirs)


@pytest.fixture
def engine() -> FakeEngine:
    fake = FakeEngine()
    fake.refuse("broken")
    return fake


@pytest.fixture
async def gw(config: Config, engine: FakeEngine) -> AsyncIterator[Gateway]:
    """A ready gateway (engine up, declared adapters reconciled) over the default config."""
    async with running_gateway(config.settings(), engine) as gateway:
        yield gateway
