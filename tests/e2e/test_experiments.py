"""A/B experiments against the real engine: two real adapter versions behind one alias, sticky
per-user assignment, each answer produced by its variant's weights, feedback, shadow copies.

Guardrail rollbacks read Prometheus; they run with a real Prometheus over the fake upstream in
tests/system/test_experiments.py (a regression has to be injected, which a real model cannot
do on demand).
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.e2e.harness import KEYS, Gateway, report
from tests.e2e.test_registry import QUESTION, register
from tests.promtext import metric

NAME = "abtest"


def _client(gateway: Gateway) -> httpx.Client:
    return httpx.Client(
        base_url=gateway.url, headers={"Authorization": f"Bearer {KEYS['acme']}"}, timeout=600
    )


def _complete(client: httpx.Client, gateway: Gateway, user: str) -> httpx.Response:
    return client.post(
        "/v1/completions",
        json={
            "model": NAME,
            "prompt": gateway.completion_prompt(QUESTION),
            "max_tokens": 4,
            "temperature": 0,
        },
        headers={"X-Loraplex-User": user},
    )


def _start(admin: httpx.Client, name: str, **definition: Any) -> None:
    body = {
        "name": name,
        "target": NAME,
        "variants": [
            {"name": "control", "model": f"{NAME}@1"},
            {"name": "candidate", "model": f"{NAME}@2"},
        ],
        **definition,
    }
    resp = admin.post("/admin/v1/experiments", json=body)
    assert resp.status_code == 201, resp.text


def test_experiment_serves_each_user_its_variant_and_counts_feedback(gateway: Gateway) -> None:
    medical, legal = gateway.adapter("medical"), gateway.adapter("legal")
    marker = {f"{NAME}@1": medical["marker"], f"{NAME}@2": legal["marker"]}
    with gateway.admin() as admin, _client(gateway) as client:
        register(admin, NAME, medical["path"])
        register(admin, NAME, legal["path"])
        _start(admin, "ab-live", weights={"candidate": 0.5})
        users = [f"user-{i}" for i in range(12)]
        seen: dict[str, set[str]] = {}
        rid = ""
        for user in users * 2:
            r = _complete(client, gateway, user)
            assert r.status_code == 200, r.text
            variant = r.headers["x-loraplex-variant"]
            label = r.headers["x-loraplex-adapter"]
            assert r.headers["x-loraplex-experiment"] == "ab-live"
            assert label == (f"{NAME}@2" if variant == "candidate" else f"{NAME}@1")
            text = r.json()["choices"][0]["text"].strip()
            assert text.startswith(marker[label].split()[0]), (label, text)
            seen.setdefault(user, set()).add(variant)
            rid = r.headers["x-request-id"]
        assert all(len(v) == 1 for v in seen.values())
        assert {next(iter(v)) for v in seen.values()} == {"control", "candidate"}

        fb = client.post("/v1/feedback", json={"request_id": rid, "rating": "up", "score": 0.9})
        assert fb.status_code == 200, fb.text
        assert (
            client.post("/v1/feedback", json={"request_id": rid, "rating": "up"}).status_code == 409
        )
        text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
        ok = metric(text, "loraplex_experiment_requests_total", experiment="ab-live", outcome="ok")
        assert ok == 2 * len(users)
        assert metric(text, "loraplex_experiment_feedback_total", experiment="ab-live", rating="up")
        analysis = admin.get("/admin/v1/experiments/ab-live/analysis").json()
        assert analysis["verdicts"]["candidate"]["decision"] == "insufficient"

        promoted = admin.post(
            "/admin/v1/experiments/ab-live/promote", json={"variant": "candidate"}
        )
        assert promoted.json()["status"] == "promoted"
        r = _complete(client, gateway, "after-promotion")
        assert r.headers["x-loraplex-adapter"] == f"{NAME}@2"
        assert "x-loraplex-variant" not in r.headers
        admin.put(f"/admin/v1/adapters/{NAME}/aliases/stable", json={"version": 1})
    report("experiment e2e", users=len(users), requests=2 * len(users))


def test_shadow_copies_reach_the_candidate_and_never_change_the_answer(gateway: Gateway) -> None:
    medical = gateway.adapter("medical")
    with gateway.admin() as admin, _client(gateway) as client:
        register(admin, NAME, medical["path"])  # idempotent: the same content is reused
        register(admin, NAME, gateway.adapter("legal")["path"])
        _start(admin, "ab-shadow", shadow={"variant": "candidate", "share": 1.0})
        try:
            for i in range(4):
                r = _complete(client, gateway, f"shadow-user-{i}")
                assert r.status_code == 200
                assert r.headers["x-loraplex-variant"] == "control"
                assert (
                    r.json()["choices"][0]["text"].strip().startswith(medical["marker"].split()[0])
                )
            deadline = time.monotonic() + 120
            done = 0.0
            while time.monotonic() < deadline:
                text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
                done = metric(
                    text,
                    "loraplex_experiment_shadow_requests_total",
                    experiment="ab-shadow",
                    variant="candidate",
                    outcome="ok",
                )
                if done >= 4:
                    break
                time.sleep(0.2)
            assert done == 4
        finally:
            admin.post("/admin/v1/experiments/ab-shadow/abort")
