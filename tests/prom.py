"""A throwaway Prometheus server for tests (Debian's `prometheus` package; scripts/setup installs
it). It scrapes the given targets every second and evaluates the given rule files, so a test can
check what a real Prometheus sees of the gateway: series names and labels after a scrape,
`increase()`/`histogram_quantile()` over them, and alerts that fire from the chart's rules
(helm/loraplex/files/alerts.yml).
The first scrape lands about 5 s after start (Prometheus hands new targets to its scrape loops
on a fixed 5 s tick, not configurable in 2.42), then every `scrape_interval`. Tests that need
known data at once load it instead: `Backfill` records registry snapshots at chosen timestamps,
`promtool tsdb create-blocks-from openmetrics` turns them into blocks before the server starts,
and `query(..., at=t)` reads them back (no scrape, no waiting).

    with prometheus_server(["127.0.0.1:8000"], rule_files=[ALERTS]) as prom:
        prom.wait_for('loraplex_requests_total{status="200"}')
        assert prom.query("sum(loraplex_engine_up)")[0]["value"][1] == "1"
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client.metrics_core import Metric

from tests.servers import free_port

Sample = dict[str, Any]
"""One element of an instant query's `data.result`: {"metric": {...}, "value": [ts, "str"]}."""


def prometheus_binary(name: str = "prometheus") -> str:
    """Path of `prometheus` or `promtool`; a clear error when the package is missing."""
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: run scripts/setup (installs Debian's prometheus)")
    return found


def require_binary(name: str = "prometheus") -> str:
    """For tests: the binary's path; without it, fail under CI (CI=true: scripts/setup ran, so
    a missing tool is a broken setup) and skip elsewhere, saying how to get it."""
    found = shutil.which(name)
    if found is not None:
        return found
    reason = f"{name} not installed: run scripts/setup (installs Debian's prometheus)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


def _target(target: str) -> str:
    """`host:port` for a static_config; a base URL (http://host:port) is accepted too."""
    if "://" not in target:
        return target
    parts = urlsplit(target)
    if parts.scheme != "http" or parts.path not in ("", "/"):
        raise ValueError(f"target {target!r}: give http://host:port; set metrics_path apart")
    return parts.netloc


class Backfill:
    """Samples at chosen timestamps, as OpenMetrics text for `promtool tsdb create-blocks-from`.

    `snapshot(registry.collect(), at)` records every sample of the families at `at` (Unix
    seconds); snapshot twice, some seconds apart, for `rate()`/`increase()` to have two points.
    Timestamps must be within the server's retention (15 days) and before its start.
    """

    def __init__(self) -> None:
        # family name → (type, help, {(sample name, sorted labels) → ["value at", ...]})
        self._families: dict[
            str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], list[str]]]
        ] = {}

    def snapshot(
        self, families: Iterable[Metric], at: float, labels: Mapping[str, str] | None = None
    ) -> None:
        """`labels`: added to every sample, as a scrape adds job and instance."""
        extra = dict(labels or {})
        for family in families:
            typ = family.type if family.type in ("counter", "gauge", "histogram") else "unknown"
            _, _, series = self._families.setdefault(family.name, (typ, family.documentation, {}))
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted({**sample.labels, **extra}.items())))
                series.setdefault(key, []).append(f"{sample.value!r} {at:.3f}")

    def text(self) -> str:
        lines: list[str] = []
        for name, (typ, doc, series) in self._families.items():
            lines.append(f"# HELP {name} {_escape(doc)}")
            lines.append(f"# TYPE {name} {typ}")
            for (sample, labels), points in series.items():
                selector = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                head = f"{sample}{{{selector}}}" if selector else sample
                lines.extend(f"{head} {point}" for point in points)
        lines.append("# EOF")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class Prometheus:
    """A running server: its base URL and a few calls of the HTTP API (v1)."""

    url: str
    root: Path
    client: httpx.Client

    def _get(self, path: str, **params: str) -> Any:
        response = self.client.get(f"{self.url}{path}", params=params)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {response.status_code} {body}")
        return body["data"]

    def query(self, promql: str, *, at: float | None = None) -> list[Sample]:
        """Instant query (now, or at Unix time `at`); the result vector (a scalar result comes
        back as one sample)."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[Sample] = data["result"]
        return result

    def value(self, promql: str, *, at: float | None = None) -> float | None:
        """The single sample's value of an instant query, or None when the result is empty."""
        result = self.query(promql, at=at)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{promql} returned {len(result)} series: {result}")
        return float(result[0]["value"][1])

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[Sample]], bool] = bool,
        *,
        timeout: float = 20.0,
    ) -> list[Sample]:
        """Poll `promql` until `predicate(result)` holds (default: non-empty); its result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{promql}: still {result} after {timeout} s")
            time.sleep(0.2)

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their `health` ("up" / "down" / "unknown")."""
        active: list[dict[str, Any]] = self._get("/api/v1/targets")["activeTargets"]
        return active

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts: {"labels", "annotations", "state", ...}."""
        alerts: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return alerts

    def firing(self) -> set[str]:
        """Names of the alerts in state "firing"."""
        return {a["labels"]["alertname"] for a in self.alerts() if a["state"] == "firing"}


def _wait_ready(proc: subprocess.Popen[bytes], client: httpx.Client, url: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if client.get(f"{url}/-/ready").status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"prometheus not ready after 30 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def prometheus_server(
    targets: Sequence[str] = (),
    *,
    rule_files: Sequence[Path] = (),
    job: str = "loraplex",
    metrics_path: str = "/metrics",
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    extra_scrape_configs: Sequence[dict[str, Any]] = (),
    backfill: Backfill | None = None,
) -> Iterator[Prometheus]:
    """Start Prometheus on a free port in a temp dir, scraping `targets` (host:port) as `job`
    and holding `backfill`'s samples; yield it once /-/ready answers; stop it and delete its
    data afterwards (also on failure)."""
    scrape_configs: list[dict[str, Any]] = []
    if targets:
        scrape_configs.append(
            {
                "job_name": job,
                "metrics_path": metrics_path,
                "static_configs": [{"targets": [_target(t) for t in targets]}],
            }
        )
    scrape_configs.extend(extra_scrape_configs)
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": scrape_configs,
    }
    root = Path(tempfile.mkdtemp(prefix="loraplex-prom-"))
    try:
        (root / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        if backfill is not None:
            _create_blocks(backfill, root)
        with _running(root) as prom:
            yield prom
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _create_blocks(backfill: Backfill, root: Path) -> None:
    source = root / "backfill.om"
    source.write_text(backfill.text())
    blocks = [str(source), str(root / "data")]
    done = subprocess.run(
        [prometheus_binary("promtool"), "tsdb", "create-blocks-from", "openmetrics", *blocks],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"promtool create-blocks-from: {done.stdout}{done.stderr}")


@contextlib.contextmanager
def _running(root: Path) -> Iterator[Prometheus]:
    """The server on root/prometheus.yml and root/data; terminated on the way out."""
    port = free_port()
    log = root / "prometheus.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as log_file, httpx.Client(timeout=5.0) as client:
        proc = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
        try:
            _wait_ready(proc, client, url, log)
            yield Prometheus(url=url, root=root, client=client)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
