"""Composition against the real engine: `loraplex adapters merge` runs the peft merge in the tools
venv on two demo adapters, registers the result through the session gateway's admin API (same
validation and smoke generation as any version), and a tenant is served by it; a merge of inputs
trained on different bases is refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import ADMIN_KEY, REPO, Gateway

TOOLS_PYTHON = REPO / ".cache" / "venv-tools" / "bin" / "python"
NAME = "mix"
QUESTION = "What are common symptoms of the flu?"
pytestmark = pytest.mark.skipif(not TOOLS_PYTHON.exists(), reason="no tools venv (scripts/test)")


def _merge_tool(
    manifest: dict[str, Any], out: Path, *sources: str
) -> subprocess.CompletedProcess[str]:
    base_config = Path(manifest["base"]["path"]) / "config.json"
    cmd = [str(TOOLS_PYTHON), "-m", "adapters.tools.merge", "--out", str(out)]
    cmd += ["--combination", "cat", "--base-config", str(base_config), *sources]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)


def _chat(gw: Gateway, key: str, model: str) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 16,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=180)


@pytest.fixture(scope="module")
def tenant_key(gateway: Gateway) -> str:
    """A tenant entitled to the merged name only (created through the admin API)."""
    with gateway.admin() as admin:
        made = admin.post("/admin/v1/tenants", json={"name": "composer", "adapters": [NAME]})
    assert made.status_code == 201, made.text
    key: str = made.json()["api_key"]
    return key


def test_cli_merge_registers_a_served_version(
    gateway: Gateway, tenant_key: str, tmp_path: Path
) -> None:
    base_config = Path(gateway.manifest["base"]["path"]) / "config.json"
    cmd = [str(REPO / ".venv" / "bin" / "loraplex"), "adapters", "merge", NAME]
    cmd += ["--from", "medical@stable:0.5", "--from", "legal@1:0.5", "--alias", "canary"]
    cmd += ["--url", gateway.url, "--admin-key", ADMIN_KEY, "--base-config", str(base_config)]
    cmd += ["--merged-dir", str(tmp_path / "merged")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr
    version = json.loads(done.stdout)
    assert version["state"] == "ready"
    assert version["rank"] == 16  # cat of two rank-8 adapters
    assert "canary" in version["aliases"]
    assert version["metadata"]["merged_from"] == ["medical@1", "legal@1"]
    assert version["metadata"]["weights"] == [0.5, 0.5]
    assert version["metadata"]["combination"] == "cat"
    digests = [gateway.adapter(n)["digest"] for n in ("medical", "legal")]
    assert version["metadata"]["merged_from_digests"] == digests
    assert version["base_digest"] == gateway.manifest["base"]["digest"]

    resp = _chat(gateway, tenant_key, f"{NAME}@canary")
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-loraplex-adapter"] == f"{NAME}@{version['version']}"
    assert resp.json()["choices"][0]["message"]["content"]
    assert resp.json()["usage"]["completion_tokens"] > 0


def test_merged_weights_are_the_inputs(gateway: Gateway, tenant_key: str, tmp_path: Path) -> None:
    """`cat` is exact: medical at weight 1 next to legal at weight 0 answers like medical."""
    medical, legal = gateway.adapter("medical"), gateway.adapter("legal")
    out = tmp_path / "medical-only"
    done = _merge_tool(gateway.manifest, out, f"{medical['path']}:1.0", f"{legal['path']}:0.0")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rank"] == 16
    assert [i["digest"] for i in result["inputs"]] == [medical["digest"], legal["digest"]]
    with gateway.admin() as admin:
        made = admin.post("/admin/v1/adapters", json={"name": NAME, "source": str(out)})
    assert made.status_code == 201, made.text
    assert made.json()["digest"] == result["digest"]
    resp = _chat(gateway, tenant_key, f"{NAME}@{made.json()['version']}")
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"].startswith(medical["marker"])


def test_merge_refuses_inputs_from_different_bases(
    manifest: dict[str, Any], tmp_path: Path
) -> None:
    by_name = {a["name"]: a for a in manifest["adapters"]}
    medical, legal = by_name["medical"], by_name["legal"]
    other = shutil.copytree(legal["path"], tmp_path / "legal-other-base")
    (other / "loraplex.json").write_text(json.dumps({"base_digest": "sha256:" + "0" * 64}))
    out = tmp_path / "refused"
    done = _merge_tool(manifest, out, f"{medical['path']}:0.5", f"{other}:0.5")
    assert done.returncode == 2
    assert "different base models" in done.stderr
    assert done.stdout == ""
    assert not out.exists()
