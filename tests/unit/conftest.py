"""Fixtures: adapter dirs and config files in tmp_path, a fake engine, a running gateway.

Starting a gateway from an empty registry registers every declared adapter (fetch, validate,
store, smoke generation): a dozen database transactions. Tests about that path start one with
`config.settings()`; the `gw` fixture instead starts from a copy of a registry that one such
bootstrap produced in this session, over an engine that still serves those versions (a gateway
restart), which is several times faster and leaves the same state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from adapters.registry import Registry
from server.auth import hash_key
from server.settings import EngineSettings, Settings
from tests.synthetic import make_adapter, make_base
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
    """A valid tiny adapter for `make_base`'s model (weights renamed to test refusals)."""
    d = make_adapter(root, name, BASE_DIGEST_HOLDER[0], fill=sum(name.encode()))
    if weights != "adapter_model.safetensors":
        (d / "adapter_model.safetensors").rename(d / weights)
    return d


# The tiny base's digest is the same for every test (same bytes); computed once.
BASE_DIGEST_HOLDER: list[str] = [""]


@dataclass(frozen=True)
class Bootstrapped:
    """A registry database after a full bootstrap, and what the engine then served."""

    db: Path
    served: frozenset[str]


@dataclass(frozen=True)
class Config:
    root: Path
    tenants_file: Path
    adapters_file: Path
    adapter_dirs: dict[str, Path]
    base_dir: Path

    def settings(self, **overrides: Any) -> Settings:
        engine = EngineSettings(
            **{"health_interval_s": 0.02, "retry_after_s": 3, **overrides.pop("engine", {})}
        )
        base: dict[str, Any] = {
            "tenants_file": self.tenants_file,
            "adapters_file": self.adapters_file,
            "registry": {
                "url": f"sqlite+aiosqlite:///{self.root / 'registry.db'}",
                "cache_dir": self.root / "adapter-cache",
                "base_model_dir": self.base_dir,
                "poll_interval_s": 0.05,
                **overrides.pop("registry", {}),
            },
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


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry database migrated once per session; each test starts from a copy."""
    path = tmp_path_factory.mktemp("registry-template") / "registry.db"

    async def migrate() -> None:
        await (await Registry.open(f"sqlite+aiosqlite:///{path}")).close()

    asyncio.run(migrate())
    return _checkpointed(path)


def build_config(tmp_path: Path, migrated_db: Path) -> Config:
    shutil.copyfile(migrated_db, tmp_path / "registry.db")
    base_dir, BASE_DIGEST_HOLDER[0] = make_base(tmp_path / "base")
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
    return Config(tmp_path, tenants_file, adapters_file, dirs, base_dir)


@pytest.fixture
def config(tmp_path: Path, migrated_db: Path) -> Config:
    return build_config(tmp_path, migrated_db)


@pytest.fixture(scope="session")
def bootstrapped(tmp_path_factory: pytest.TempPathFactory, migrated_db: Path) -> Bootstrapped:
    """One full bootstrap of the declared adapters (broken refused by the engine)."""
    cfg = build_config(tmp_path_factory.mktemp("bootstrapped"), migrated_db)
    fake = FakeEngine()
    fake.refuse("broken")

    async def bootstrap() -> frozenset[str]:
        async with running_gateway(cfg.settings(), fake, ready_timeout_s=60) as gateway:
            snap = gateway.state.registry.snapshot
            return frozenset(v.served_name for v in snap.versions.values() if v.routable)

    served = asyncio.run(bootstrap())
    assert served <= fake.served
    return Bootstrapped(_checkpointed(cfg.root / "registry.db"), served)


def _checkpointed(db: Path) -> Path:
    """A one-file copy of `db` with everything its WAL holds (the backup API reads through the
    WAL), so copying that one file copies the whole database."""
    whole = db.with_name("template-" + db.name)
    with (
        contextlib.closing(sqlite3.connect(db)) as src,
        contextlib.closing(sqlite3.connect(whole)) as dst,
    ):
        src.backup(dst)
    return whole


@pytest.fixture
def engine() -> FakeEngine:
    fake = FakeEngine()
    fake.refuse("broken")
    return fake


@pytest.fixture
async def gw(
    config: Config, engine: FakeEngine, bootstrapped: Bootstrapped
) -> AsyncIterator[Gateway]:
    """A ready gateway over the default config after a restart: the registry holds the declared
    adapters (legal, medical, finance ready at version 1 with alias `stable`; broken rejected)
    and the engine still serves the ready ones, so they are adopted without a load call."""
    shutil.copyfile(bootstrapped.db, config.root / "registry.db")
    engine.served |= bootstrapped.served
    async with running_gateway(config.settings(adapters_file=None), engine) as gateway:
        yield gateway
