"""All Prometheus metrics of the gateway, in one per-app registry (no import-time globals).

Label values come only from bounded sets: configured tenant names, registered adapter names, the
fixed endpoint list and the error codes in `server.errors` — never raw request input. Anything
not in the set is reported as "other" / "unknown" by the caller.
"""

from __future__ import annotations

import contextlib
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

M = TypeVar("M", Counter, Gauge, Histogram)

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CLASSIFY_BUCKETS = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
TOKEN_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
EXPERIMENT_STATUSES = ("running", "paused", "promoted", "aborted", "rolled_back")


class GatewayMetrics:
    """Typed handles to every metric; one instance per app."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "loraplex_requests",
            "Requests answered, by outcome.",
            ["tenant", "adapter", "endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "loraplex_errors",
            "Errors returned to clients, by stable error code.",
            ["tenant", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "loraplex_request_duration_seconds",
            "End-to-end request latency at the gateway.",
            ["tenant", "adapter", "endpoint", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Time to the first streamed token.",
            ["tenant", "adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "loraplex_inter_token_latency_seconds",
            "Gap between streamed token events.",
            ["adapter"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens",
            "Prompt tokens reported by the engine.",
            ["tenant", "adapter"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "loraplex_completion_tokens",
            "Completion tokens reported by the engine.",
            ["tenant", "adapter"],
            registry=r,
        )
        self.in_flight = Gauge(
            "loraplex_in_flight_requests",
            "Requests currently being served.",
            ["tenant"],
            registry=r,
        )
        self.adapter_ops = Counter(
            "loraplex_adapter_operations",
            "Adapter loads/unloads on the engine, by result.",
            ["adapter", "result"],
            registry=r,
        )
        self.adapter_op_seconds = Histogram(
            "loraplex_adapter_operation_seconds",
            "Latency of engine adapter load/unload calls.",
            ["result"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.adapters_resident = Gauge(
            "loraplex_adapters_resident",
            "Adapters registered on the engine.",
            registry=r,
        )
        self.adapter_events = Counter(
            "loraplex_adapter_residency_events",
            "Engine registration events: load, load_error, unload, evict, and lease hit/miss "
            "(a miss had to wait for a registration).",
            ["adapter", "event"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "loraplex_adapter_load_seconds",
            "Latency of registering an adapter version on the engine.",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.adapter_versions = Gauge(
            "loraplex_adapter_versions",
            "Adapter versions in the registry, by state.",
            ["state"],
            registry=r,
        )
        self.engine_up = Gauge(
            "loraplex_engine_up",
            "1 while at least one engine answers its health check.",
            registry=r,
        )
        # Several engines (adapters/placement.py). `engine` is an engine URL: bounded by the
        # engines configured or discovered; a departed engine's series are removed.
        self.engines_up = Gauge(
            "loraplex_engines_up",
            "Engines answering their health check.",
            registry=r,
        )
        self.engine_picks = Counter(
            "loraplex_engine_picks",
            "Engine choices: hit (an engine had the adapter registered), load (none had: "
            "registered on the least-loaded), spill (registered on a cooler engine too), base.",
            ["affinity"],
            registry=r,
        )
        self.engine_failovers = Counter(
            "loraplex_engine_failovers",
            "Requests sent again to another engine after their engine could not serve them "
            "(nothing had reached the client).",
            registry=r,
        )
        self.engine_in_flight = Gauge(
            "loraplex_engine_in_flight",
            "This gateway's requests in flight, by engine.",
            ["engine"],
            registry=r,
        )
        self.engine_queue_waiting = Gauge(
            "loraplex_engine_queue_waiting",
            "Requests waiting in the engine's scheduler (all gateways'), by engine.",
            ["engine"],
            registry=r,
        )
        # Domain router (model="auto"): domains come from the routes file, reasons from
        # router.types.FALLBACK_REASONS; "none" = out of scope.
        self.router_decisions = Counter(
            "loraplex_router_decisions",
            "Auto-routing decisions, by decided domain.",
            ["tenant", "domain"],
            registry=r,
        )
        self.router_fallbacks = Counter(
            "loraplex_router_fallbacks",
            "Auto-routed requests served by the fallback target, by reason.",
            ["tenant", "reason"],
            registry=r,
        )
        self.router_confidence = Histogram(
            "loraplex_router_confidence",
            "Classifier confidence, by the classifier's top domain (before thresholds).",
            ["domain"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.router_classify_seconds = Histogram(
            "loraplex_router_classify_seconds",
            "Time to classify one request.",
            ["classifier"],
            buckets=CLASSIFY_BUCKETS,
            registry=r,
        )

        self._experiment_metrics(r)

    def _experiment_metrics(self, r: CollectorRegistry) -> None:
        """Per-variant series the experiment controller reads back (locally or via PromQL);
        `experiment` and `variant` are admin-chosen names, so bounded."""
        ev = ["experiment", "variant"]
        self.exp_requests = Counter(
            "loraplex_experiment_requests",
            "Requests served by an experiment variant, by outcome (ok, client_error, error).",
            [*ev, "outcome"],
            registry=r,
        )
        self.exp_latency = Histogram(
            "loraplex_experiment_request_duration_seconds",
            "End-to-end latency of requests served by an experiment variant.",
            ev,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.exp_ttft = Histogram(
            "loraplex_experiment_ttft_seconds",
            "Time to first token of streamed requests served by an experiment variant.",
            ev,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.exp_completion_tokens = Histogram(
            "loraplex_experiment_completion_tokens",
            "Completion length (tokens) of requests served by an experiment variant.",
            ev,
            buckets=TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.exp_feedback = Counter(
            "loraplex_experiment_feedback",
            "User feedback on requests served by an experiment variant (rating: up, down).",
            [*ev, "rating"],
            registry=r,
        )
        self.exp_feedback_score = Histogram(
            "loraplex_experiment_feedback_score",
            "Feedback scores in [0, 1] by experiment variant.",
            ev,
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.exp_weight = Gauge(
            "loraplex_experiment_weight",
            "Current traffic share of an experiment variant (0..1).",
            ev,
            registry=r,
        )
        self.exp_shadow = Counter(
            "loraplex_experiment_shadow_requests",
            "Mirrored (shadow) requests to a candidate, by outcome (ok, error, dropped).",
            [*ev, "outcome"],
            registry=r,
        )
        self.exp_rollbacks = Counter(
            "loraplex_experiment_rollbacks",
            "Automatic rollbacks of an experiment, by the guardrail that was breached.",
            ["experiment", "guardrail"],
            registry=r,
        )
        self.exp_status = Gauge(
            "loraplex_experiment_status",
            "1 for the experiment's current status, 0 for the others.",
            ["experiment", "status"],
            registry=r,
        )

    def child(self, metric: M, *values: str) -> M:
        """`metric.labels(*values)`, memoised: labels() takes a lock and re-validates on every
        call (~4 us, several per request and one per streamed event); label values come from
        bounded sets (see above), so the memo is bounded too. Label sets are never removed."""
        key = (metric, values)
        found: M | None = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def observe_pick(self, affinity: str) -> None:
        self.child(self.engine_picks, affinity).inc()

    def forget_engine(self, url: str) -> None:
        """A departed engine's series go (discovery churns addresses in Kubernetes)."""
        for gauge in (self.engine_in_flight, self.engine_queue_waiting):
            with contextlib.suppress(KeyError):
                gauge.remove(url)

    def observe_adapter_op(self, adapter: str, result: str, seconds: float) -> None:
        self.child(self.adapter_ops, adapter, result).inc()
        self.child(self.adapter_op_seconds, result).observe(seconds)

    def observe_residency(self, adapter: str, event: str, seconds: float) -> None:
        """Residency observer: `adapter` is a registered name (bounded), never raw input."""
        self.child(self.adapter_events, adapter, event).inc()
        if event in ("load", "load_error", "unload", "evict"):
            self.observe_adapter_op(adapter, event, seconds)
        if event == "load":
            self.adapter_load_seconds.observe(seconds)

    def observe_route(
        self,
        tenant: str,
        domain: str,
        top_domain: str,
        confidence: float,
        fallback_reason: str | None,
        classifier: str,
        seconds: float | None,
    ) -> None:
        """One auto-routing decision; every label value comes from the routes file."""
        self.child(self.router_decisions, tenant, domain).inc()
        if fallback_reason is not None:
            self.child(self.router_fallbacks, tenant, fallback_reason).inc()
        if seconds is not None:
            self.child(self.router_confidence, top_domain).observe(confidence)
            self.child(self.router_classify_seconds, classifier).observe(seconds)

    def observe_variant(
        self,
        experiment: str,
        variant: str,
        status: int,
        seconds: float,
        ttft: float | None,
        completion_tokens: int | None,
    ) -> None:
        """One request served by an experiment variant (live or shadow)."""
        outcome = "ok" if status < 400 else "error" if status >= 500 else "client_error"
        self.child(self.exp_requests, experiment, variant, outcome).inc()
        if outcome == "client_error":
            return  # the client's fault says nothing about the variant's latency or length
        self.child(self.exp_latency, experiment, variant).observe(seconds)
        if ttft is not None:
            self.child(self.exp_ttft, experiment, variant).observe(ttft)
        if completion_tokens is not None and outcome == "ok":
            self.child(self.exp_completion_tokens, experiment, variant).observe(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
