"""The gateway's metrics as Prometheus stores them, for checking the alert rules and the
dashboard (helm/loraplex/files) against the code rather than against a hand-kept list.

`new_metrics()` builds the real registry (GatewayMetrics and the drift monitor's collector);
`populate()` puts samples in every series the rules and the dashboard read (requests go through
the request path's own record, so labels carry the gateway's own values); `catalog()` maps each
stored series name (counter X → X_total, histogram X → X_bucket/X_sum/X_count) to its type and
label names. The PromQL helpers find metric names, label matchers and grouping labels with
regular expressions: enough for the expressions we write, not a parser.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from adapters.loader import AdapterCapacity
from server.errors import EngineUnavailable
from server.relay import RequestRecord
from server.telemetry.drift import DriftMonitor, DriftSettings
from server.telemetry.metrics import GatewayMetrics

# Labels Prometheus itself adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})

METRIC = re.compile(r"\bloraplex_[a-z0-9_]+")
RECORDED = re.compile(r"\bloraplex:[a-z0-9_:]+")
SELECTOR = re.compile(r"\b(loraplex_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


@dataclass
class Series:
    """One stored series name: its family's type and the label names seen on it."""

    family: str
    type: str
    labels: set[str] = field(default_factory=set)
    sampled: bool = False


def new_metrics() -> tuple[GatewayMetrics, DriftMonitor]:
    """A fresh registry with every collector the app registers on it."""
    metrics = GatewayMetrics()
    settings = DriftSettings(reference_size=10, window_size=10, min_window=10, evaluate_every=1)
    drift = DriftMonitor(metrics, settings, ["legal", "medical"], tenants=lambda: ["acme"])
    return metrics, drift


def populate(m: GatewayMetrics, drift: DriftMonitor) -> None:
    """One round of traffic touching every series; call it again for counters to grow."""
    # Requests go through the request path's own record, so labels hold the gateway's values
    # (status "503", stream "False", ...): an ok streamed one, a plain one, two failures.
    for stream, error in (
        (True, None),
        (False, None),
        (False, EngineUnavailable("engine down")),
        (False, AdapterCapacity("all slots pinned")),
    ):
        record = RequestRecord(m, "req", "acme", "chat", stream, adapter="legal")
        record.admit("acme")
        if stream:
            record.on_event()
            record.on_event()
        record.on_usage({"prompt_tokens": 12, "completion_tokens": 30})
        if error is not None:
            record.fail(error)
        record.finish()
    m.child(m.in_flight, "acme").inc()
    for event in ("load", "load_error", "unload", "evict", "hit", "miss"):
        m.observe_residency("legal", event, 0.4)
    m.adapters_resident.set(2)
    m.child(m.adapter_versions, "ready").set(3)
    m.engine_up.set(1)
    # Two engines behind the gateway: picks of every affinity, one failover per round.
    m.engines_up.set(2)
    for affinity in ("hit", "load", "spill", "base"):
        m.observe_pick(affinity)
    m.engine_failovers.inc()
    for url in ("http://10.0.0.1:8000", "http://10.0.0.2:8000"):
        m.engine_in_flight.labels(url).set(1)
        m.engine_queue_waiting.labels(url).set(2)
    m.observe_route("acme", "legal", "legal", 0.9, None, "tfidf", 0.001)
    m.observe_route("acme", "none", "medical", 0.2, "low_confidence", "tfidf", 0.001)

    for variant, outcome in (("control", "ok"), ("candidate", "ok"), ("candidate", "error")):
        m.child(m.exp_requests, "exp", variant, outcome).inc()
    for variant in ("control", "candidate"):
        m.child(m.exp_latency, "exp", variant).observe(0.4)
        m.child(m.exp_ttft, "exp", variant).observe(0.1)
        m.child(m.exp_completion_tokens, "exp", variant).observe(40)
        m.child(m.exp_feedback_score, "exp", variant).observe(0.7)
        m.child(m.exp_weight, "exp", variant).set(0.5)
        for rating in ("up", "down"):
            m.child(m.exp_feedback, "exp", variant, rating).inc()
    m.child(m.exp_shadow, "exp", "candidate", "ok").inc()
    m.child(m.exp_rollbacks, "exp", "error_rate").inc()
    m.child(m.exp_status, "exp", "running").set(1)
    m.child(m.exp_status, "exp", "paused").set(0)

    # A reference of ten "legal" requests, then ten quite different ones: every statistic moves.
    for i in range(20):
        late = i >= 10
        drift.observe(
            "acme",
            "medical" if late else "legal",
            0.3 if late else 0.9,
            late and i % 2 == 0,
            200 if late else 10,
            80 if late else 5,
            late and i % 3 == 0,
        )


def catalog(registry: CollectorRegistry) -> dict[str, Series]:
    """Stored series name → Series, for every family the registry exposes (with or without
    samples; label names only where there are samples)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    found: dict[str, Series] = {}
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            found[family.name + suffix] = Series(family.name, family.type)
        for sample in family.samples:
            if sample.name in found:
                found[sample.name].labels.update(sample.labels)
                found[sample.name].sampled = True
    return found


def strip_strings(promql: str) -> str:
    """The expression with every quoted string emptied (label values can hold anything)."""
    return QUOTED.sub('""', promql)


def metric_names(promql: str) -> set[str]:
    return set(METRIC.findall(strip_strings(promql)))


def recorded_names(promql: str) -> set[str]:
    return set(RECORDED.findall(strip_strings(promql)))


def matcher_labels(promql: str) -> list[tuple[str, str]]:
    """(metric, label) for each label matcher of a loraplex_* selector."""
    pairs: list[tuple[str, str]] = []
    for metric, body in SELECTOR.findall(strip_strings(promql)):
        pairs.extend((metric, label) for label in MATCHER.findall(body))
    return pairs


def grouping_labels(promql: str) -> set[str]:
    """Labels named in by / without / on / ignoring / group_* clauses."""
    labels: set[str] = set()
    for body in GROUPING.findall(strip_strings(promql)):
        labels.update(part.strip() for part in body.split(",") if part.strip())
    return labels


def label_problems(
    promql: str, known: dict[str, Series], extra_sources: Iterable[str] = ()
) -> list[str]:
    """Label names `promql` uses that its metrics do not have. `extra_sources`: further
    expressions whose metrics' labels count too (the definitions of recording rules it reads)."""
    problems: list[str] = []
    for metric, label in matcher_labels(promql):
        series = known.get(metric)
        if series is not None and label not in series.labels | TARGET_LABELS:
            problems.append(f"{metric} has no label {label!r}")
    available = set(TARGET_LABELS)
    for source in (promql, *extra_sources):
        for metric in metric_names(source):
            if metric in known:
                available |= known[metric].labels
    problems.extend(
        f"no metric of the expression has label {label!r}"
        for label in sorted(grouping_labels(promql) - available)
    )
    return problems
