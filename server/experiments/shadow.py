"""Shadow traffic: a copy of a request is sent to a candidate and its answer thrown away.

The copy runs as a background task after the real request was dispatched, so it can never
slow or fail the real one; at most `max_concurrency` copies are in flight per replica (beyond
that they are dropped and counted). Copies are never streamed: the candidate's latency, outcome
and completion length land in the same per-variant series as live traffic, so the guardrails
can judge a candidate before it serves anyone.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from adapters.types import AdapterVersion

if TYPE_CHECKING:
    from server.state import GatewayState

log = logging.getLogger("loraplex.experiments")


class ShadowMirror:
    def __init__(self, max_concurrency: int) -> None:
        self.max_concurrency = max_concurrency
        self.in_flight = 0

    def mirror(
        self,
        state: GatewayState,
        experiment: str,
        variant: str,
        version: AdapterVersion | None,
        path: str,
        body: dict[str, Any],
    ) -> None:
        """Start the copy in the background, or count it as dropped when at capacity."""
        m = state.metrics
        if self.in_flight >= self.max_concurrency or not state.engines.usable_count:
            m.child(m.exp_shadow, experiment, variant, "dropped").inc()
            return
        copy = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        self.in_flight += 1
        state.background(self._run(state, experiment, variant, version, path, copy))

    async def _run(
        self,
        state: GatewayState,
        experiment: str,
        variant: str,
        version: AdapterVersion | None,
        path: str,
        body: dict[str, Any],
    ) -> None:
        m = state.metrics
        started = time.perf_counter()
        status, tokens = 599, None
        lease = None
        try:
            lease = await state.engines.acquire(version)
            body["model"] = lease.served_name
            resp = await lease.engine.post(path, orjson.dumps(body))
            status = resp.status
            if status == 200:
                usage = orjson.loads(resp.body).get("usage") or {}
                tokens = int(usage.get("completion_tokens") or 0)
        except Exception as exc:  # the copy must never surface anywhere but in metrics/logs
            log.info("shadow request failed: %s", type(exc).__name__, extra={"variant": variant})
        finally:
            self.in_flight -= 1
            if lease is not None:
                lease.release()
        outcome = "ok" if status == 200 else "error"
        m.child(m.exp_shadow, experiment, variant, outcome).inc()
        # Engine 4xx on a copy of a valid request is the candidate's failure too.
        m.observe_variant(
            experiment,
            variant,
            200 if status == 200 else 502,
            time.perf_counter() - started,
            None,
            tokens,
        )
