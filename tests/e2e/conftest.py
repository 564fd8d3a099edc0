"""Session fixtures: the demo model (built offline, cached), one real gateway process that
supervises one real vLLM engine, and OpenAI SDK clients per tenant.

Starting vLLM costs ~40 s on 2 cores, so everything shares one session; tests that stop the
engine are marked `engine_teardown` and run last.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from server.auth import hash_key
from tests.e2e.harness import (
    ADMIN_KEY,
    E2E_CAPS,
    EXTRA_ADAPTER,
    KEYS,
    READY_TIMEOUT_S,
    REGISTRATION_BUDGET,
    REGISTRY_TEST_NAMES,
    REPO,
    Gateway,
    free_port,
)
from tests.servers import moto_s3


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Engine-stopping tests go last; everything here is an e2e test."""
    for item in items:
        item.add_marker(pytest.mark.e2e)
    items.sort(key=lambda i: i.get_closest_marker("engine_teardown") is not None)


@pytest.fixture(scope="session")
def manifest() -> dict[str, Any]:
    """Build (or reuse) the quantized demo model and adapters; the same path as the demo.
    `LORAPLEX_E2E_MANIFEST` points at an existing build instead (debugging only)."""
    given = os.environ.get("LORAPLEX_E2E_MANIFEST")
    if given:
        prebuilt: dict[str, Any] = json.loads(Path(given).read_text())
        return prebuilt
    out = subprocess.run(
        [str(REPO / ".venv/bin/loraplex"), "demo", "prepare"],
        cwd=REPO,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    data: dict[str, Any] = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    return data


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API (moto_server) the session gateway may fetch adapters from."""
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def gateway(
    manifest: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str
) -> Iterator[Gateway]:
    cfg = tmp_path_factory.mktemp("gateway")
    names = [a["name"] for a in manifest["adapters"]]
    tenants = {
        "clinic": {"adapters": ["medical", "base"], "default": "medical"},
        "lawfirm": {"adapters": ["legal"], "default": "legal"},
        "acme": {
            "adapters": [*names, "base", EXTRA_ADAPTER, *REGISTRY_TEST_NAMES],
            "default": "base",
        },
    }
    for name, spec in tenants.items():
        spec["key_sha256"] = hash_key(KEYS[name])
    (cfg / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    adapters = {a["name"]: a["path"] for a in manifest["adapters"]}
    (cfg / "adapters.yaml").write_text(yaml.safe_dump({"adapters": adapters}))

    port, engine_port = free_port(), free_port()
    log_path, engine_log = cfg / "gateway.log", cfg / "vllm.log"
    env = {
        **os.environ,
        "LORAPLEX_ADMIN_KEY": ADMIN_KEY,
        "LORAPLEX_ENGINE__URL": f"http://127.0.0.1:{engine_port}",
        "LORAPLEX_ENGINE__PYTHON": str(REPO / ".cache/venv-engine/bin/python"),
        "LORAPLEX_ENGINE__LOG_FILE": str(engine_log),
        "LORAPLEX_ENGINE__HEALTH_INTERVAL_S": "0.5",
        "LORAPLEX_ENGINE__RESTART_BACKOFF_S": "3",
        # 200 concurrent requests on 2 busy cores can queue in vLLM for minutes.
        "LORAPLEX_ENGINE__READ_TIMEOUT_S": "900",
        "LORAPLEX_ENGINE__REQUEST_TIMEOUT_S": "900",
        "LORAPLEX_ENGINE__CONNECT_TIMEOUT_S": "30",
        # Fewer registrations than the registry tests use: eviction happens for real.
        "LORAPLEX_REGISTRY__URL": f"sqlite+aiosqlite:///{cfg / 'registry.db'}",
        "LORAPLEX_REGISTRY__CACHE_DIR": str(cfg / "adapter-cache"),
        "LORAPLEX_REGISTRY__BUDGET": str(REGISTRATION_BUDGET),
        "LORAPLEX_REGISTRY__S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "LORAPLEX_REGISTRY__MAX_ADAPTER_BYTES": str(E2E_CAPS.max_adapter_bytes),
        "LORAPLEX_REGISTRY__MAX_EXTRACTED_BYTES": str(E2E_CAPS.max_extracted_bytes),
        "LORAPLEX_REGISTRY__MAX_ARCHIVE_BYTES": str(E2E_CAPS.max_archive_bytes),
        # model="auto": the default routes; the classifier is fitted at start and saved here.
        "LORAPLEX_ROUTER__ROUTES_FILE": str(REPO / "router/data/routes.yaml"),
        "LORAPLEX_ROUTER__ARTEFACT": str(cfg / "router-tfidf.npz"),
    }
    cmd = [
        str(REPO / ".venv/bin/loraplex"),
        "serve",
        "--port",
        str(port),
        "--engine-mode",
        "local",
        "--engine-model",
        manifest["base"]["path"],
        "--tenants-file",
        str(cfg / "tenants.yaml"),
        "--adapters-file",
        str(cfg / "adapters.yaml"),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gateway exited ({proc.returncode}):\n{_tail(log_path)}")
            if time.monotonic() - started > READY_TIMEOUT_S:
                pytest.fail(f"not ready in {READY_TIMEOUT_S}s:\n{_tail(engine_log)}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        sys.stderr.write(f"\n[e2e] gateway + vLLM ready in {time.monotonic() - started:.1f} s\n")
        handle = Gateway(url, f"http://127.0.0.1:{engine_port}", manifest, log_path, engine_log)
        yield handle
        handle.close()
    finally:
        engine_pid = _engine_pid(url)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if engine_pid:  # the gateway stops its engine; this only catches a failed shutdown
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(engine_pid, signal.SIGKILL)


def _engine_pid(url: str) -> int | None:
    try:
        info = httpx.get(
            f"{url}/admin/v1/engine", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5
        ).json()
    except (httpx.HTTPError, ValueError):
        return None
    pid = info.get("pid")
    return int(pid) if pid else None
