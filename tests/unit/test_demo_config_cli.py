"""Demo configuration from a manifest, and the `loraplex` CLI's offline commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.app import read_adapters_file as _read_adapters_file
from server.auth import hash_key, load_tenants
from server.demo_config import DEMO_ADMIN_KEY, write_demo_config
from server.errors import AuthenticationFailed
from server.main import main


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(
        json.dumps(
            {
                "model": str(tmp_path / "model"),
                "adapters": [
                    {"name": "medical", "path": str(tmp_path / "adapters/medical")},
                    {"name": "legal", "path": str(tmp_path / "adapters/legal")},
                ],
            }
        ),
        encoding="utf-8",
    )
    return path


def test_write_demo_config(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "nested"
    tenants_file, adapters_file = write_demo_config(manifest, out)
    assert tenants_file == out / "tenants.yaml"
    assert adapters_file == out / "adapters.yaml"

    assert _read_adapters_file(adapters_file) == {
        "legal": str(tmp_path / "adapters/legal"),
        "medical": str(tmp_path / "adapters/medical"),
    }
    text = tenants_file.read_text(encoding="utf-8")
    assert text.startswith("# Demo tenants. Keys (public, demo only):")
    assert "sk-demo-acme" in text.splitlines()[0]
    # Only digests in the YAML body, never the keys themselves.
    body = yaml.safe_load(text)
    assert "sk-demo" not in yaml.safe_dump(body)

    directory = load_tenants(tenants_file, (hash_key(DEMO_ADMIN_KEY),))
    assert set(directory.tenants) == {"acme", "legal-team", "medical-team"}
    acme = directory.authenticate("Bearer sk-demo-acme")
    assert acme.name == "acme"
    assert acme.adapters == frozenset({"legal", "medical", "base"})
    assert acme.default == "base"
    legal = directory.authenticate("Bearer sk-demo-legal")
    assert legal.name == "legal-team"
    assert legal.adapters == frozenset({"legal", "base"})
    assert legal.default == "legal"
    assert directory.authenticate("Bearer sk-demo-medical").default == "medical"
    directory.authenticate_admin(f"Bearer {DEMO_ADMIN_KEY}")
    with pytest.raises(AuthenticationFailed):
        directory.authenticate(f"Bearer {DEMO_ADMIN_KEY}")


def test_write_demo_config_is_idempotent(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = [p.read_bytes() for p in write_demo_config(manifest, out)]
    second = [p.read_bytes() for p in write_demo_config(manifest, out)]
    assert first == second


def test_cli_hash_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash-key", "sk-some-key"]) == 0
    assert capsys.readouterr().out == hash_key("sk-some-key") + "\n"


def test_cli_demo_config(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cfg"
    assert main(["demo", "config", "--manifest", str(manifest), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / n) for n in ("tenants.yaml", "adapters.yaml", "routes.yaml")]
    assert all(Path(p).is_file() for p in printed)


def test_cli_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: loraplex" in capsys.readouterr().err


def test_installed_console_script_hash_key() -> None:
    script = Path(sys.executable).with_name("loraplex")
    assert script.is_file(), "pip install -e . installs the loraplex console script"
    out = subprocess.run(
        [str(script), "hash-key", "sk-cli"], check=True, capture_output=True, text=True, timeout=30
    )
    assert out.stdout.strip() == hash_key("sk-cli")
    assert out.stderr == ""
