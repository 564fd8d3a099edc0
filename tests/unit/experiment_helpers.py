"""Shared by the experiment unit tests: a second `medical` version, experiment definitions
through the admin API, audit reads, and hand-built `VariantStats` for the controller."""

from __future__ import annotations

from typing import Any

import httpx

from adapters.types import AdapterRef
from server.experiments.analysis import Histo, VariantStats
from server.telemetry.metrics import LATENCY_BUCKETS
from tests.unit.conftest import Config
from tests.unit.helpers import ADMIN_KEY, Gateway, auth, served
from tests.unit.test_registry_api import new_adapter, register

ADMIN = auth(ADMIN_KEY)
BOUNDS = (*LATENCY_BUCKETS, float("inf"))


async def add_medical_v2(gw: Gateway, config: Config) -> None:
    """`medical@2`, ready (the `stable` alias stays on version 1)."""
    resp = await register(gw, "medical", new_adapter(config, "medical", 99))
    assert resp.status_code == 201, resp.text
    assert resp.json()["label"] == "medical@2"
    gw.engine.forwarded.clear()  # the smoke generation is not test traffic


def definition(name: str = "ab", **changes: Any) -> dict[str, Any]:
    """`medical` (= medical@stable) split between version 1 (control) and 2 (candidate)."""
    body: dict[str, Any] = {
        "name": name,
        "target": "medical",
        "variants": [
            {"name": "control", "model": "medical@1"},
            {"name": "candidate", "model": "medical@2"},
        ],
        "weights": {"candidate": 0.5},
    }
    body.update(changes)
    return body


async def create(gw: Gateway, name: str = "ab", **changes: Any) -> httpx.Response:
    return await gw.client.post(
        "/admin/v1/experiments", json=definition(name, **changes), headers=ADMIN
    )


async def start(gw: Gateway, name: str = "ab", **changes: Any) -> dict[str, Any]:
    resp = await create(gw, name, **changes)
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


async def admin(gw: Gateway, method: str, path: str, body: Any = None) -> httpx.Response:
    return await gw.client.request(method, f"/admin/v1/experiments{path}", json=body, headers=ADMIN)


async def audit_actions(gw: Gateway, target: str | None = None) -> list[str]:
    """Audit actions, oldest first (only those on `target` when given)."""
    resp = await gw.client.get("/admin/v1/audit", params={"limit": 200}, headers=ADMIN)
    assert resp.status_code == 200
    entries = reversed(resp.json()["data"])
    return [e["action"] for e in entries if target is None or e["target"] == target]


def stable_version(gw: Gateway, name: str = "medical") -> int:
    found = gw.state.registry.snapshot.resolve(AdapterRef(name))
    assert found is not None
    return found.version


def served_variant(gw: Gateway, resp: httpx.Response) -> str:
    """Which medical version the engine was asked for by the last forwarded request."""
    model = gw.engine.forwarded[-1].body["model"]
    for label in ("medical@1", "medical@2"):
        if model == served(gw, label):
            return label
    raise AssertionError(f"unexpected engine model {model!r} ({resp.headers})")


def histo(count: float, bucket: int) -> Histo:
    """`count` observations, all in LATENCY_BUCKETS' bucket number `bucket`."""
    counts = [0.0] * len(BOUNDS)
    counts[bucket] = count
    return Histo(BOUNDS, tuple(counts))


def stats(requests: float, errors: float = 0.0, latency_bucket: int = 2) -> VariantStats:
    """A variant's window: `requests`, `errors` of them failed, latencies in one bucket."""
    empty = Histo.empty()
    return VariantStats(
        requests=requests,
        errors=errors,
        latency=histo(requests - errors, latency_bucket),
        ttft=empty,
        completion_tokens=empty,
        feedback_up=0.0,
        feedback_down=0.0,
        feedback_score=empty,
    )
