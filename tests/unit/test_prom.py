"""tests/prom.py against a tiny exporter: a real Prometheus scrapes it and answers PromQL."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tests.prom import Backfill, prometheus_server, require_binary


@contextlib.contextmanager
def exporter(registry: CollectorRegistry) -> Iterator[str]:
    """Serve `registry` at /metrics on a free port; yields host:port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_scrapes_a_target_and_answers_queries() -> None:
    require_binary("prometheus")
    registry = CollectorRegistry()
    hits = Counter("loraplex_demo_hits", "Demo counter.", ["kind"], registry=registry)
    hits.labels("a").inc(3)
    with exporter(registry) as target, prometheus_server([f"http://{target}"]) as prom:
        result = prom.wait_for('loraplex_demo_hits_total{kind="a"}')
        assert result[0]["metric"]["job"] == "loraplex"
        assert result[0]["metric"]["instance"] == target
        assert float(result[0]["value"][1]) == 3.0
        assert prom.value(f'up{{instance="{target}"}}') == 1.0
        assert [t["health"] for t in prom.targets()] == ["up"]
        hits.labels("a").inc(2)
        prom.wait_for("sum(loraplex_demo_hits_total)", lambda r: r[0]["value"][1] == "5")
        assert prom.value("scalar(vector(2))") == 2.0
        assert prom.value("absent_metric_xyz") is None
        assert prom.firing() == set()


def test_backfilled_samples_answer_at_their_time() -> None:
    require_binary("promtool")
    registry = CollectorRegistry()
    hits = Counter("loraplex_demo_hits", 'Demo "counter".', ["kind"], registry=registry)
    latency = Histogram("loraplex_demo_seconds", "Demo.", buckets=(0.1, 1.0), registry=registry)
    t0 = float(int(time.time()) - 3600)
    backfill = Backfill()
    hits.labels('a"b').inc(1)
    latency.observe(0.05)
    backfill.snapshot(registry.collect(), t0)
    hits.labels('a"b').inc(60)
    latency.observe(0.5)
    backfill.snapshot(registry.collect(), t0 + 60)
    with prometheus_server(backfill=backfill) as prom:
        at = t0 + 60
        assert prom.value('loraplex_demo_hits_total{kind="a\\"b"}', at=at) == 61.0
        rate = prom.value("sum(rate(loraplex_demo_hits_total[5m]))", at=at)
        assert rate is not None
        assert rate > 0
        assert prom.value('loraplex_demo_seconds_bucket{le="1.0"}', at=at) == 2.0
        assert prom.value("loraplex_demo_seconds_count", at=at) == 2.0
        assert prom.query("loraplex_demo_hits_total", at=t0 - 600) == []
