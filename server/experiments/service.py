"""The request path's view of experiments: the active set (rebuilt only when the registry
snapshot changes), sticky assignment, per-variant gauges, and the request-id → variant memory
that `POST /v1/feedback` resolves against."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import ValidationError

from adapters.registry import ExperimentRecord, Snapshot
from router.experiments import ExperimentBook, ExperimentSpec, LiveExperiment
from server.telemetry.metrics import EXPERIMENT_STATUSES, GatewayMetrics

log = logging.getLogger("loraplex.experiments")


@dataclass(frozen=True, slots=True)
class Served:
    """What feedback needs to know about a request served in an experiment."""

    tenant: str
    experiment: str
    variant: str
    at: float


class FeedbackMemory:
    """Bounded, time-limited map of requests served in an experiment (oldest dropped first),
    keyed by (tenant, request id): clients may choose their own `X-Request-Id`, so two tenants'
    ids can collide without mixing. Per replica: see docs/experiments.md for several replicas."""

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._served: OrderedDict[tuple[str, str], Served] = OrderedDict()
        self._rated: set[tuple[str, str]] = set()

    def remember(self, request_id: str, served: Served) -> None:
        self._served[(served.tenant, request_id)] = served
        if len(self._served) > self.max_entries:
            old, _ = self._served.popitem(last=False)
            self._rated.discard(old)

    def lookup(self, tenant: str, request_id: str, now: float | None = None) -> Served | None:
        key = (tenant, request_id)
        served = self._served.get(key)
        if served is None:
            return None
        if (now or time.time()) - served.at > self.ttl_s:
            del self._served[key]
            self._rated.discard(key)
            return None
        return served

    def rate_once(self, tenant: str, request_id: str) -> bool:
        """True the first time feedback arrives for this tenant's `request_id`."""
        key = (tenant, request_id)
        if key in self._rated:
            return False
        self._rated.add(key)
        return True


def parse_record(record: ExperimentRecord) -> LiveExperiment | None:
    try:
        spec = ExperimentSpec.model_validate(record.definition)
    except ValidationError:
        log.error("experiment %s has an invalid stored definition; ignored", record.name)
        return None
    return LiveExperiment.build(record.name, spec, record.status, record.weights)


class ExperimentService:
    """Experiments as the request path sees them; cheap when there are none."""

    def __init__(self, metrics: GatewayMetrics, memory: FeedbackMemory) -> None:
        self.metrics = metrics
        self.memory = memory
        self._book = ExperimentBook([])
        self._generation = -2
        self._gauged: set[tuple[str, str]] = set()

    def book(self, snapshot: Snapshot) -> ExperimentBook:
        if snapshot.generation != self._generation:
            self._rebuild(snapshot)
        return self._book

    def _rebuild(self, snapshot: Snapshot) -> None:
        live = [e for r in snapshot.experiments.values() if (e := parse_record(r)) is not None]
        self._book = ExperimentBook(live)
        self._generation = snapshot.generation
        self._export(snapshot)

    def _export(self, snapshot: Snapshot) -> None:
        """Weights and status gauges for every stored experiment (deleted ones drop out)."""
        m = self.metrics
        seen: set[tuple[str, str]] = set()
        for rec in snapshot.experiments.values():
            for status in EXPERIMENT_STATUSES:
                m.exp_status.labels(rec.name, status).set(1.0 if rec.status == status else 0.0)
            for variant, weight in rec.weights.items():
                m.exp_weight.labels(rec.name, variant).set(weight)
                seen.add((rec.name, variant))
        for name, variant in self._gauged - seen:
            m.exp_weight.remove(name, variant)
        for name in {n for n, _ in self._gauged} - set(snapshot.experiments):
            for status in EXPERIMENT_STATUSES:
                m.exp_status.remove(name, status)
        self._gauged = seen
