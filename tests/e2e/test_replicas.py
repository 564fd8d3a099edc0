"""Two gateway replicas on one PostgreSQL registry in front of the session's engine: changes
made on one are served by the other, and `kill -9` mid-registration leaves no half version."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest
import yaml

from server.auth import hash_key
from tests.e2e.harness import ADMIN_KEY, REPO, Gateway, free_port
from tests.pg import postgres_cluster

KEY = "sk-e2e-replica"
QUESTION = "What is the capital of France?"


class Replica:
    def __init__(self, env: dict[str, str], cfg: Path, name: str) -> None:
        self.env, self.cfg, self.name = env, cfg, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        with (self.cfg / f"{self.name}.log").open("ab") as log:  # the child keeps its own fd
            self.proc = subprocess.Popen(
                [str(REPO / ".venv/bin/loraplex"), "serve", "--port", str(self.port)],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, (self.cfg / f"{self.name}.log").read_text()[-2000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            assert time.monotonic() < deadline, "replica not ready"
            time.sleep(0.2)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120
        )

    def answer(self, model: str, template: str) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/completions",
            json={
                "model": model,
                "prompt": template.replace("{question}", QUESTION),
                "max_tokens": 6,
                "temperature": 0,
            },
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


@pytest.fixture
def replicas(gateway: Gateway, pg_url: str, tmp_path: Path) -> Iterator[tuple[Replica, Replica]]:
    tenants = {"tenants": {"replica": {"key_sha256": hash_key(KEY), "adapters": ["replica"]}}}
    (tmp_path / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")},
        "LORAPLEX_ADMIN_KEY": ADMIN_KEY,
        "LORAPLEX_TENANTS_FILE": str(tmp_path / "tenants.yaml"),
        "LORAPLEX_ENGINE__URL": gateway.engine_url,
        "LORAPLEX_ENGINE__MODE": "remote",
        "LORAPLEX_ENGINE__HEALTH_INTERVAL_S": "0.2",
        "LORAPLEX_REGISTRY__URL": pg_url,
        "LORAPLEX_REGISTRY__CACHE_DIR": str(tmp_path / "adapter-cache"),
        "LORAPLEX_REGISTRY__BASE_MODEL_DIR": gateway.manifest["base"]["path"],
        "LORAPLEX_REGISTRY__POLL_INTERVAL_S": "0.2",
        "LORAPLEX_REGISTRY__INTERRUPTED_AFTER_S": "0",
    }
    a, b = Replica(env, tmp_path, "a").start(), Replica(env, tmp_path, "b").start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def wait_for(check: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def test_replicas_share_the_registry_and_survive_kill_9_mid_registration(
    gateway: Gateway, replicas: tuple[Replica, Replica], pg_url: str
) -> None:
    a, b = replicas
    template = gateway.manifest["completion_prompt_template"]
    medical, legal, finance = (gateway.adapter(n) for n in ("medical", "legal", "finance"))

    with a.admin() as admin:
        assert (
            admin.post(
                "/admin/v1/adapters", json={"name": "replica", "source": medical["path"]}
            ).status_code
            == 201
        )
    # B follows A's change through the generation counter.
    wait_for(lambda: b.answer("replica", template).status_code == 200)
    assert b.answer("replica", template).json()["choices"][0]["text"].strip().startswith("MEDICAL")
    with b.admin() as admin:
        made = admin.post(
            "/admin/v1/adapters",
            json={"name": "replica", "source": legal["path"], "alias": "stable"},
        )
        assert made.status_code == 201, made.text
    wait_for(lambda: a.answer("replica", template).headers.get("x-loraplex-adapter") == "replica@2")
    assert a.answer("replica", template).json()["choices"][0]["text"].strip().startswith("LEGAL")

    # kill -9 A while v3 is stored but its smoke generation has not finished: freeze the engine
    # (SIGSTOP) so the smoke test cannot complete, wait for the row, kill A, thaw the engine.
    with gateway.admin() as admin:
        engine_pid = admin.get("/admin/v1/engine").json()["pid"]
    assert engine_pid
    outcome: dict[str, Any] = {}

    def register_v3() -> None:
        with contextlib.suppress(httpx.HTTPError), a.admin() as admin:
            outcome["resp"] = admin.post(
                "/admin/v1/adapters", json={"name": "replica", "source": finance["path"]}
            )

    os.killpg(engine_pid, signal.SIGSTOP)
    try:
        worker = threading.Thread(target=register_v3)
        worker.start()
        wait_for(lambda: asyncio.run(_state(pg_url, "replica", 3)) == "validated", 60)
        a.kill9()
    finally:
        os.killpg(engine_pid, signal.SIGCONT)
    worker.join(30)
    assert "resp" not in outcome  # the registration never answered: its gateway died

    a.start()  # same database: the interrupted version is rejected at start
    assert asyncio.run(_state(pg_url, "replica", 3)) == "rejected"
    with a.admin() as admin:
        v3 = admin.get("/admin/v1/adapters/replica/versions/3").json()
        assert v3["state"] == "rejected"
        assert "interrupted" in v3["state_reason"]
        assert a.answer("replica@3", template).status_code == 404
        assert a.answer("replica", template).headers["x-loraplex-adapter"] == "replica@2"
        again = admin.post(
            "/admin/v1/adapters", json={"name": "replica", "source": finance["path"]}
        )
        assert again.status_code == 201, again.text
        assert again.json()["version"] == 4
        assert again.json()["state"] == "ready"
    wait_for(lambda: httpx.get(f"{gateway.url}/readyz", timeout=5).status_code == 200, 120)


async def _state(pg_url: str, name: str, version: int) -> str | None:
    conn = await asyncpg.connect(pg_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        value = await conn.fetchval(
            "SELECT state FROM adapter_versions WHERE name = $1 AND version = $2", name, version
        )
        return None if value is None else str(value)
    finally:
        await conn.close()
