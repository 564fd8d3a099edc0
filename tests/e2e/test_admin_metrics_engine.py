"""Admin lifecycle, metrics and engine failure against the real engine and gateway process."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest

from tests.e2e.harness import EXTRA_ADAPTER, KEYS, Gateway
from tests.promtext import metric

QUESTION = "What is the capital of France?"


def ask(gw: Gateway, tenant: str, model: str) -> str:
    done = gw.client(tenant).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        temperature=0,
    )
    return done.choices[0].message.content or ""


def sample(gw: Gateway, name: str, **labels: str) -> float:
    return metric(httpx.get(f"{gw.url}/metrics", timeout=10).text, name, **labels)


def test_admin_load_use_unload(gateway: Gateway) -> None:
    source = gateway.adapter("finance")
    with gateway.admin() as admin:
        # entitled but not registered yet → 404 like any unknown model
        with pytest.raises(openai.NotFoundError):
            ask(gateway, "acme", EXTRA_ADAPTER)
        loaded = admin.post(
            "/admin/v1/adapters", json={"name": EXTRA_ADAPTER, "path": source["path"]}
        )
        assert loaded.status_code == 201, loaded.text
        assert loaded.json()["state"] == "loaded"
        listed = {a["name"]: a["state"] for a in admin.get("/admin/v1/adapters").json()["data"]}
        assert listed[EXTRA_ADAPTER] == "loaded"
        assert ask(gateway, "acme", EXTRA_ADAPTER).strip().startswith(source["marker"])
        assert EXTRA_ADAPTER in [m.id for m in gateway.client("acme").models.list().data]

        gone = admin.delete(f"/admin/v1/adapters/{EXTRA_ADAPTER}")
        assert gone.status_code == 200, gone.text
        assert gone.json()["state"] == "unloaded"
        with pytest.raises(openai.NotFoundError) as err:
            ask(gateway, "acme", EXTRA_ADAPTER)
        assert err.value.code == "model_not_found"
        # the engine itself no longer serves it either
        engine_models = httpx.get(f"{gateway.engine_url}/v1/models", timeout=10).json()
        assert EXTRA_ADAPTER not in {m["id"] for m in engine_models["data"]}


def test_admin_rejects_bad_adapters(gateway: Gateway) -> None:
    with gateway.admin() as admin:
        missing = admin.post("/admin/v1/adapters", json={"name": "x1", "path": "/nonexistent"})
        assert missing.status_code == 400
        assert missing.json()["error"]["code"] == "invalid_adapter"


def test_tenant_key_on_admin_is_403(gateway: Gateway) -> None:
    r = httpx.get(
        f"{gateway.url}/admin/v1/adapters",
        headers={"Authorization": f"Bearer {KEYS['acme']}"},
        timeout=10,
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "permission_denied"
    assert httpx.get(f"{gateway.url}/admin/v1/adapters", timeout=10).status_code == 401


def test_metrics_counters_move(gateway: Gateway) -> None:
    labels = {"tenant": "lawfirm", "adapter": "legal"}
    before_req = sample(gateway, "loraplex_requests_total", **labels, status="200")
    before_tok = sample(gateway, "loraplex_completion_tokens_total", **labels)
    before_ttft = sample(gateway, "loraplex_time_to_first_token_seconds_count", **labels)
    before_err = sample(gateway, "loraplex_errors_total", tenant="lawfirm", code="model_not_found")
    ask(gateway, "lawfirm", "legal")
    stream = gateway.client("lawfirm").chat.completions.create(
        model="legal",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert list(stream)
    with pytest.raises(openai.NotFoundError):
        ask(gateway, "lawfirm", "medical")
    assert sample(gateway, "loraplex_requests_total", **labels, status="200") == before_req + 2
    assert sample(gateway, "loraplex_completion_tokens_total", **labels) > before_tok
    assert (
        sample(gateway, "loraplex_time_to_first_token_seconds_count", **labels) == before_ttft + 1
    )
    assert (
        sample(gateway, "loraplex_errors_total", tenant="lawfirm", code="model_not_found")
        == before_err + 1
    )
    assert sample(gateway, "loraplex_engine_up") == 1
    assert sample(gateway, "loraplex_request_duration_seconds_count", **labels) >= before_req + 2


@pytest.mark.engine_teardown
def test_engine_crash_gives_503_then_recovers_with_adapters(gateway: Gateway) -> None:
    with gateway.admin() as admin:
        pid = admin.get("/admin/v1/engine").json()["pid"]
        assert pid
        os.killpg(pid, signal.SIGKILL)  # the whole engine process group, like an OOM kill
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as err:
            ask(gateway, "clinic", "medical")
        assert time.monotonic() - started < 5, "no hang when the engine is gone"
        assert err.value.status_code == 503
        assert err.value.response.headers.get("retry-after") == "1"
        assert err.value.code == "engine_unavailable"
        ready = httpx.get(f"{gateway.url}/readyz", timeout=5)
        assert ready.status_code == 503
        assert ready.headers.get("retry-after")

        # The gateway's supervisor restarts vLLM and re-registers the adapters.
        deadline = time.monotonic() + 600
        while httpx.get(f"{gateway.url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "engine did not come back"
            time.sleep(1)
        assert admin.get("/admin/v1/engine").json()["starts"] == 2
    marker = gateway.adapter("medical")["marker"]
    assert ask(gateway, "clinic", "medical").strip().startswith(marker)
