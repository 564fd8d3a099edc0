"""A/B experiments with real processes: a gateway (uvicorn) over the fake upstream, scraped by a
real Prometheus that the gateway's controller queries through PromQL.

The fake upstream stands in for the engine so thousands of requests take seconds and a
regression can be injected for one adapter version's served name (`POST /faults`); the same
flows against real vLLM run in tests/e2e/test_experiments.py.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from loadtest.bench.procs import (
    BENCH_KEY,
    PY,
    fake_adapter_dir,
    fleet,
    free_port,
    gateway_cmd,
    gateway_config,
)
from tests.e2e.harness import report
from tests.prom import Prometheus, prometheus_server, require_binary

ADMIN_KEY = "sk-system-admin"
INTERVAL_S = 1.0
pytestmark = pytest.mark.system


@dataclass
class Stack:
    url: str
    upstream: str
    prom: Prometheus
    admin: httpx.Client
    client: httpx.Client

    def faults(self, **spec: Any) -> None:
        httpx.post(f"{self.upstream}/faults", json=spec, timeout=10).raise_for_status()

    def experiment(self, name: str) -> dict[str, Any]:
        resp = self.admin.get(f"/admin/v1/experiments/{name}")
        resp.raise_for_status()
        out: dict[str, Any] = resp.json()
        return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_binary("prometheus")
    work = tmp_path_factory.mktemp("experiments")
    v1 = fake_adapter_dir(work / "src1", "support", rank=8)
    v2 = fake_adapter_dir(work / "src2", "support", rank=4)  # other content: version 2
    args, env = gateway_config(work / "gw", {"support": v1})
    up_port, gw_port = free_port(), free_port()
    with fleet(work) as procs:
        procs.start("upstream", [PY, "-m", "loadtest.bench.fake_upstream", "--port", str(up_port)])
        procs.ready("upstream", f"http://127.0.0.1:{up_port}/health")
        with prometheus_server([f"127.0.0.1:{gw_port}"]) as prom:
            env |= {
                "LORAPLEX_ENGINE__URL": f"http://127.0.0.1:{up_port}",
                "LORAPLEX_ADMIN_KEY": ADMIN_KEY,
                "LORAPLEX_EXPERIMENTS__PROMETHEUS_URL": prom.url,
                "LORAPLEX_EXPERIMENTS__INTERVAL_S": str(INTERVAL_S),
                "LORAPLEX_LOG_LEVEL": "warning",
            }
            procs.start("gateway", gateway_cmd(gw_port, args), env)
            url = f"http://127.0.0.1:{gw_port}"
            procs.ready("gateway", f"{url}/readyz")
            admin = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
            )
            client = httpx.Client(
                base_url=url,
                headers={"Authorization": f"Bearer {BENCH_KEY}"},
                timeout=30,
                limits=httpx.Limits(max_connections=16),
            )
            reg = admin.post("/admin/v1/adapters", json={"name": "support", "source": v2})
            assert reg.status_code == 201, reg.text
            assert reg.json()["label"] == "support@2"
            try:
                yield Stack(url, f"http://127.0.0.1:{up_port}", prom, admin, client)
            finally:
                admin.close()
                client.close()


def start(stack: Stack, name: str, **definition: Any) -> dict[str, Any]:
    body = {
        "name": name,
        "target": "support",
        "variants": [
            {"name": "control", "model": "support@1"},
            {"name": "candidate", "model": "support@2"},
        ],
        "analysis_window_s": 30,
        "guardrails": {"min_samples": 150},
        **definition,
    }
    resp = stack.admin.post("/admin/v1/experiments", json=body)
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


def end(stack: Stack, name: str) -> None:
    if stack.experiment(name)["status"] in ("running", "paused"):
        stack.admin.post(f"/admin/v1/experiments/{name}/abort").raise_for_status()


def send(stack: Stack, users: list[str]) -> list[httpx.Response]:
    def one(user: str) -> httpx.Response:
        return stack.client.post(
            "/v1/chat/completions",
            json={"model": "support", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Loraplex-User": user},
        )

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, users))


def test_sticky_assignment_and_split_over_2000_requests(stack: Stack) -> None:
    start(stack, "split", weights={"candidate": 0.3}, guardrails={"min_samples": 10_000})
    try:
        users = [f"user-{i}" for i in range(500)] * 4
        responses = send(stack, users)
        assert all(r.status_code == 200 for r in responses)
        seen: dict[str, set[str]] = {}
        for user, r in zip(users, responses, strict=True):
            assert r.headers["x-loraplex-experiment"] == "split"
            variant = r.headers["x-loraplex-variant"]
            expected_adapter = "support@2" if variant == "candidate" else "support@1"
            assert r.headers["x-loraplex-adapter"] == expected_adapter
            seen.setdefault(user, set()).add(variant)
        assert all(len(v) == 1 for v in seen.values()), "a user changed variant"
        per_user = Counter(next(iter(v)) for v in seen.values())
        share = per_user["candidate"] / 500
        assert abs(share - 0.3) < 4 * (0.3 * 0.7 / 500) ** 0.5, share
        # Prometheus saw the same split the clients did.
        counted = stack.prom.wait_for(
            'sum by (variant) (loraplex_experiment_requests_total{experiment="split"})',
            lambda res: sum(float(s["value"][1]) for s in res) >= 2000,
            timeout=30,
        )
        by_variant = {s["metric"]["variant"]: float(s["value"][1]) for s in counted}
        assert by_variant["candidate"] == 4 * per_user["candidate"]
        report("experiment split", users=500, requests=2000, candidate_share=round(share, 4))
    finally:
        end(stack, "split")


def _traffic_until(stack: Stack, name: str, done: Any, timeout_s: float) -> tuple[int, float]:
    """Send batches of requests from fresh users until `done(experiment)`; (requests, s)."""
    sent, t0, batch = 0, time.monotonic(), 0
    while time.monotonic() - t0 < timeout_s:
        users = [f"{name}-{batch}-{i}" for i in range(100)]
        send(stack, users)
        sent += len(users)
        batch += 1
        if done(stack.experiment(name)):
            return sent, time.monotonic() - t0
    raise AssertionError(f"{name}: condition not reached in {timeout_s} s ({sent} requests)")


def test_injected_regression_is_rolled_back_through_promql(stack: Stack) -> None:
    start(stack, "regress", weights={"candidate": 0.5})
    stack.faults(prefix="support@2-", error_rate=0.3)
    try:
        sent, seconds = _traffic_until(
            stack, "regress", lambda e: e["status"] == "rolled_back", timeout_s=120
        )
    finally:
        stack.faults()
    exp = stack.experiment("regress")
    assert exp["weights"] == {"control": 1.0, "candidate": 0.0}
    assert "error_rate" in exp["reason"]
    # Control untouched: `stable` still means version 1, and everyone is served by it.
    assert {r.headers["x-loraplex-adapter"] for r in send(stack, ["after-1", "after-2"])} == {
        "support@1"
    }
    audit = stack.admin.get("/admin/v1/audit", params={"limit": 20}).json()["data"]
    actions = [(e["action"], e["target"]) for e in audit]
    assert ("experiment.rollback", "experiment:regress") in actions
    assert ("experiment.analysis", "experiment:regress") in actions
    rollbacks = stack.prom.wait_for(
        'loraplex_experiment_rollbacks_total{experiment="regress"}', timeout=30
    )
    assert rollbacks[0]["metric"]["guardrail"] == "error_rate"
    report("experiment rollback", requests_until_rollback=sent, seconds=round(seconds, 1))


def test_slow_candidate_is_rolled_back_and_a_healthy_one_is_not(stack: Stack) -> None:
    start(stack, "slow", weights={"candidate": 0.5})
    stack.faults(prefix="support@2-", delay_ms=60)
    try:
        sent, seconds = _traffic_until(
            stack, "slow", lambda e: e["status"] == "rolled_back", timeout_s=120
        )
    finally:
        stack.faults()
    assert "latency" in stack.experiment("slow")["reason"]
    report("experiment rollback (latency)", requests_until_rollback=sent, seconds=round(seconds, 1))

    # Healthy candidate: the controller judges it every round and must leave it running.
    start(stack, "healthy", weights={"candidate": 0.5})
    try:
        t0, sent, rounds = time.monotonic(), 0, 0
        while time.monotonic() - t0 < 25:
            send(stack, [f"healthy-{sent + i}" for i in range(100)])
            sent += 100
        analysis = stack.admin.get("/admin/v1/experiments/healthy/analysis").json()
        assert analysis["verdicts"]["candidate"]["decision"] == "healthy", analysis
        rounds = int((time.monotonic() - t0) / INTERVAL_S)
        assert stack.experiment("healthy")["status"] == "running"
        report("experiment healthy", requests=sent, controller_rounds=rounds, rollbacks=0)
    finally:
        end(stack, "healthy")
