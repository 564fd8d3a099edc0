"""tests/prom.py against a tiny exporter: a real Prometheus scrapes it and answers PromQL."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest

from tests.prom import prometheus_server, require_binary


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
