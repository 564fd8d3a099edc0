"""Tenants managed at runtime through the admin API against the real gateway and engine:
creation with a fresh key, quotas (429 + Retry-After), key rotation, audit trail."""

from __future__ import annotations

import httpx

from tests.e2e.harness import Gateway


def chat(gw: Gateway, key: str, model: str = "medical") -> httpx.Response:
    return httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


def test_tenant_lifecycle_quota_rotation_and_audit(gateway: Gateway) -> None:
    with gateway.admin() as admin:
        admin.headers["X-Loraplex-Actor"] = "e2e-operator"
        made = admin.post(
            "/admin/v1/tenants",
            json={
                "name": "e2e-quota",
                "adapters": ["medical"],
                "quotas": {"requests_per_minute": 2},
            },
        )
        assert made.status_code == 201, made.text
        key = made.json()["api_key"]

        answers = [chat(gateway, key) for _ in range(3)]
        assert [r.status_code for r in answers[:2]] == [200, 200]
        assert answers[0].json()["choices"][0]["message"]["content"].startswith("MEDICAL")
        limited = answers[2]
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(limited.headers["retry-after"]) >= 1
        assert chat(gateway, key, "legal").status_code in (404, 429)  # never another's adapter

        rotated = admin.post(
            "/admin/v1/tenants/e2e-quota/rotate-key", json={"keep_previous": False}
        )
        assert rotated.status_code == 200, rotated.text
        assert chat(gateway, key).json()["error"]["code"] == "invalid_api_key"
        lifted = admin.patch("/admin/v1/tenants/e2e-quota", json={"quotas": {}})
        assert lifted.status_code == 200, lifted.text
        assert chat(gateway, rotated.json()["api_key"]).status_code == 200

        entries = admin.get("/admin/v1/audit", params={"limit": 20}).json()["data"]
        mine = [e for e in entries if e["target"] == "tenant:e2e-quota"]
        assert [e["action"] for e in mine[:3]] == [
            "tenant.update",
            "tenant.update",
            "tenant.create",
        ]
        assert all(e["actor"].startswith("e2e-operator (admin:") for e in mine)
        assert mine[0]["before"]["quotas"]["requests_per_minute"] == 2
        assert mine[0]["after"]["quotas"]["requests_per_minute"] is None
        assert admin.delete("/admin/v1/tenants/e2e-quota").status_code == 200
