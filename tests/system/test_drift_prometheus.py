"""Drift seen by a real Prometheus: a gateway process (uvicorn, the default routes and TF-IDF
router) over the fake upstream gets 5 000 auto-routed requests drawn from a fixed domain mix of
the router's held-out prompts, then a mix with three times the medical share; Prometheus, scraping
every second, must see loraplex_drift_alarm{statistic="domain_psi"} stay 0 through the
stationary phase and turn 1 within 500 shifted requests.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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
from router.policy import DEFAULT_ROUTES
from tests.e2e.harness import report
from tests.prom import Prometheus, prometheus_server, require_binary

pytestmark = pytest.mark.system
ALARM = 'loraplex_drift_alarm{tenant="bench",statistic="domain_psi"}'
STATIONARY = 5000
SHIFT_LIMIT = 500
STEP = 25  # shifted requests between two Prometheus reads
# Labels of router/data/test.jsonl (out_of_scope: prompts no domain should claim).
MIX = {"medical": 0.2, "legal": 0.2, "finance": 0.15, "code": 0.15, "general": 0.2}
MIX["out_of_scope"] = 0.1
SHIFTED = {label: (0.6 if label == "medical" else p * 0.5) for label, p in MIX.items()}


@dataclass
class Stack:
    prom: Prometheus
    client: httpx.Client
    prompts: dict[str, list[str]]
    rng: random.Random

    def send(self, mix: dict[str, float], n: int) -> None:
        labels = self.rng.choices(list(mix), list(mix.values()), k=n)
        texts = [self.rng.choice(self.prompts[label]) for label in labels]

        def one(text: str) -> int:
            body = {"model": "auto", "messages": [{"role": "user", "content": text}]}
            return self.client.post("/v1/chat/completions", json=body).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, texts))
        assert statuses == [200] * n

    def scraped_after(self, t: float) -> None:
        """Wait for a scrape that started after Unix time `t` (it saw every request before)."""
        self.prom.wait_for(
            f"timestamp({ALARM})",
            lambda res: bool(res) and float(res[0]["value"][1]) > t,
            timeout=20,
        )


def held_out_prompts() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (DEFAULT_ROUTES.parent / "test.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.setdefault(row["label"], []).append(row["text"])
    assert set(MIX) <= set(out)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_binary("prometheus")
    work = tmp_path_factory.mktemp("drift")
    adapters = {n: fake_adapter_dir(work / "src", n) for n in ("medical", "legal", "finance")}
    args, env = gateway_config(work / "gw", adapters)
    up_port, gw_port = free_port(), free_port()
    env |= {
        "LORAPLEX_ROUTER__ROUTES_FILE": str(DEFAULT_ROUTES),  # the demo's domains
        "LORAPLEX_ROUTER__ARTEFACT": str(work / "tfidf.npz"),
        "LORAPLEX_ENGINE__URL": f"http://127.0.0.1:{up_port}",
        "LORAPLEX_LOG_LEVEL": "warning",
    }
    with fleet(work) as procs:
        procs.start("upstream", [PY, "-m", "loadtest.bench.fake_upstream", "--port", str(up_port)])
        procs.ready("upstream", f"http://127.0.0.1:{up_port}/health")
        with prometheus_server([f"127.0.0.1:{gw_port}"]) as prom:
            procs.start("gateway", gateway_cmd(gw_port, args), env)
            url = f"http://127.0.0.1:{gw_port}"
            procs.ready("gateway", f"{url}/readyz")
            client = httpx.Client(
                base_url=url,
                headers={"Authorization": f"Bearer {BENCH_KEY}"},
                timeout=30,
                limits=httpx.Limits(max_connections=16),
            )
            with client:
                seed = random.Random(20261123)  # noqa: S311 - a reproducible traffic mix
                yield Stack(prom, client, held_out_prompts(), seed)


def test_stationary_traffic_no_alarm_then_a_domain_shift_is_flagged(stack: Stack) -> None:
    prom = stack.prom
    started = time.time()
    t0 = time.monotonic()
    for _ in range(STATIONARY // 500):
        stack.send(MIX, 500)
    rps = STATIONARY / (time.monotonic() - t0)
    stationary_end = time.time()
    stack.scraped_after(stationary_end)
    span = f"{int(time.time() - started) + 2}s"
    seen = prom.value(f"count_over_time({ALARM}[{span}])")
    assert seen is not None
    assert seen >= 5, "Prometheus scraped the alarm too few times to judge the phase"
    assert prom.value(f"max_over_time({ALARM}[{span}])") == 0
    assert prom.value(f'max(max_over_time(loraplex_drift_alarm{{tenant="bench"}}[{span}]))') == 0
    reference = prom.value('loraplex_drift_window_requests{tenant="bench",window="reference"}')
    assert reference == 1000  # the first N requests
    psi_max = prom.value(f'max_over_time(loraplex_drift_domain_psi{{tenant="bench"}}[{span}])')
    assert psi_max is not None
    assert psi_max < 0.25

    shifted = 0
    while shifted < SHIFT_LIMIT:
        stack.send(SHIFTED, STEP)
        shifted += STEP
        sent_at = time.time()
        stack.scraped_after(sent_at)
        if prom.value(ALARM) == 1:
            break
    else:
        psi = prom.value('loraplex_drift_domain_psi{tenant="bench"}')
        raise AssertionError(f"no domain_psi alarm after {shifted} shifted requests (PSI {psi})")
    psi = prom.value('loraplex_drift_domain_psi{tenant="bench"}')
    assert psi is not None
    assert psi >= 0.25
    report(
        "drift through Prometheus",
        stationary_requests=STATIONARY,
        stationary_alarms=0,
        stationary_max_domain_psi=round(psi_max, 4),
        shifted_requests_until_alarm=shifted,
        resolution=STEP,
        domain_psi_at_alarm=round(psi, 4),
        requests_per_s=round(rps),
    )
