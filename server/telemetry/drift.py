"""Traffic drift per tenant: a reference window against a rolling current window, as gauges.

Why: the router and the adapters were built for some mix of requests; when a tenant's traffic
moves away from it (more medical questions, longer prompts, a classifier that is less sure, more
fallbacks or errors) the operator should hear it before the users do, and get a retrain signal.

- Reference: the tenant's first `reference_size` observed requests, or the current window copied
  by an operator (`set_reference`), or one loaded from the registry (`load_reference`). `reset`
  starts collecting a new first-N reference.
- Current window: the last `window_size` requests (optionally also no older than
  `window_max_age_s`), kept as a ring buffer plus counters, so `observe` is O(1).
- Statistics, recomputed after `evaluate_every` requests of a tenant or `evaluate_interval_s`,
  and at a scrape / admin read when requests arrived since (gauges are never staler than the
  scrape; an aging window updates without traffic), not per request: PSI and
  Jensen-Shannon divergence of the domain mix, mean router confidence and the share under
  `low_confidence_threshold`, PSI and binned KS of prompt and completion lengths (fixed log2
  bins), fallback rate and error rate.
- Alarms (0/1 per statistic) with hysteresis: raised when a statistic reaches its threshold
  (rates: an absolute increase that is also significant, one-sided z >= `min_z`), cleared only
  when it falls under `clear_ratio` x the threshold, so a value hovering at the line does not flap.
  No statistic is judged on fewer than `min_window` requests on either side.

What is observed: every authenticated generation request, in `RequestRecord.finish`. Domain,
confidence and fallback statistics are over the auto-routed requests only (the others carry no
routing decision and are left out of them, not counted as a domain); an auto-routed request
that no domain claimed counts in the "none" domain. Lengths are over requests whose usage the
engine reported; errors are answers with status >= 500. docs/drift.md has the details.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

from pydantic import BaseModel, Field, model_validator

from server.telemetry.drift_export import DriftCollector
from server.telemetry.drift_window import (
    MICRO,
    NONE_DOMAIN,
    OTHER_DOMAIN,
    STATISTICS,
    Counts,
    Limits,
    Observation,
    ReferencePayload,
    ReferenceSource,
    TenantWindows,
    compare,
    length_bin,
    payload_dict,
)
from server.telemetry.metrics import GatewayMetrics

MAX_DOMAINS = 64  # without a configured domain list: distinct names kept, the rest are "other"
log = logging.getLogger("loraplex.drift")


class DriftThresholds(BaseModel):
    """When a statistic raises its alarm (absolute changes unless said otherwise)."""

    domain_psi: float = Field(0.25, gt=0, description="PSI of the domain mix (retrain rule)")
    confidence_drop: float = Field(0.10, gt=0, description="drop of the mean router confidence")
    low_confidence_increase: float = Field(
        0.10, gt=0, description="rise of the share under low_confidence_threshold"
    )
    length_psi: float = Field(0.25, gt=0, description="PSI of prompt / completion length bins")
    fallback_rate_increase: float = Field(0.10, gt=0)
    error_rate_increase: float = Field(0.05, gt=0)
    min_z: float = Field(3.0, ge=0, description="one-sided z a rate increase also needs")
    clear_ratio: float = Field(
        0.8, gt=0, le=1, description="an alarm clears under this fraction of its threshold"
    )


class DriftSettings(BaseModel):
    """Drift monitor (`LORAPLEX_DRIFT__*`); docs/drift.md."""

    enabled: bool = True
    reference_size: int = Field(1000, ge=10, description="first N requests form the reference")
    window_size: int = Field(500, ge=10, description="rolling current window, in requests")
    window_max_age_s: float | None = Field(None, gt=0, description="also drop older requests")
    min_window: int = Field(200, ge=1, description="no statistic on fewer requests than this")
    evaluate_every: int = Field(50, ge=1, description="re-evaluate after this many requests")
    evaluate_interval_s: float = Field(15.0, gt=0, description="... or this many seconds")
    low_confidence_threshold: float = Field(0.4, ge=0, le=1)
    thresholds: DriftThresholds = Field(default_factory=DriftThresholds)

    @model_validator(mode="after")
    def _windows(self) -> DriftSettings:
        if self.min_window > min(self.window_size, self.reference_size):
            raise ValueError("min_window must not exceed window_size nor reference_size")
        return self

    def limits(self) -> Limits:
        t = self.thresholds
        return Limits(
            self.min_window,
            t.domain_psi,
            t.confidence_drop,
            t.low_confidence_increase,
            t.length_psi,
            t.fallback_rate_increase,
            t.error_rate_increase,
            t.min_z,
        )


class WindowTooSmall(ValueError):
    """`set_reference` on a current window with fewer than `min_window` requests."""


class DriftMonitor:
    """Per-tenant drift windows and statistics, exported on `metrics.registry`.

    `domains`: the routes file's domain names (others count as "other"); `tenants`: the
    configured tenant names (state of tenants no longer there is dropped at scrape time, so the
    tenant label stays bounded); `on_reference(tenant, payload)`: called when a first-N
    reference completes (the app persists it). Single event loop, no locking.
    """

    def __init__(
        self,
        metrics: GatewayMetrics,
        settings: DriftSettings,
        domains: Collection[str] | None = None,
        *,
        tenants: Callable[[], Collection[str]] | None = None,
        on_reference: Callable[[str, dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._limits = settings.limits()
        self._domains = None if domains is None else frozenset(domains) | {NONE_DOMAIN}
        self._seen: set[str] = {NONE_DOMAIN}
        self._known = tenants
        self._on_reference = on_reference
        self._clock = clock
        self._wall = wall_clock
        self._tenants: dict[str, TenantWindows] = {}
        metrics.registry.register(DriftCollector(self))

    # -- the request path ------------------------------------------------------------------

    def observe(
        self,
        tenant: str,
        domain: str | None,
        confidence: float | None,
        fallback: bool,
        prompt_tokens: int,
        completion_tokens: int,
        error: bool,
    ) -> None:
        """One finished request. `confidence` None: not auto-routed (no routing statistics);
        `domain` None with a confidence: auto-routed, no domain claimed it ("none")."""
        s = self.settings
        if not s.enabled:
            return
        now = self._clock()
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = TenantWindows(tenant)
        sized = prompt_tokens > 0
        o: Observation = (
            now,
            None if confidence is None else self._domain(domain),
            0 if confidence is None else min(max(round(confidence * MICRO), 0), MICRO),
            int(confidence is not None and confidence < s.low_confidence_threshold),
            int(fallback and confidence is not None),
            length_bin(prompt_tokens) if sized else -1,
            length_bin(max(completion_tokens, 0)) if sized else 0,
            int(error),
        )
        window = t.window
        if len(window) >= s.window_size:
            t.current.add(window.popleft(), -1)
        if s.window_max_age_s is not None:
            self._expire(t, now)
        window.append(o)
        t.current.add(o, 1)
        if t.collecting is not None:
            t.collecting.add(o, 1)
            if t.collecting.requests >= s.reference_size:
                self._adopt(t, t.collecting, "first_n", uuid.uuid4().hex, self._wall())
                if self._on_reference is not None:
                    self._on_reference(tenant, self._payload(t))
        t.pending += 1
        if t.pending >= s.evaluate_every or now - t.evaluated_at >= s.evaluate_interval_s:
            self._evaluate(t, now)

    def _domain(self, name: str | None) -> str:
        if name is None:
            return NONE_DOMAIN
        if self._domains is not None:
            return name if name in self._domains else OTHER_DOMAIN
        if name not in self._seen:
            if len(self._seen) >= MAX_DOMAINS:
                return OTHER_DOMAIN
            self._seen.add(name)
        return name

    def _expire(self, t: TenantWindows, now: float) -> None:
        max_age = self.settings.window_max_age_s
        if max_age is not None:
            cutoff = now - max_age
            while t.window and t.window[0][0] < cutoff:
                t.current.add(t.window.popleft(), -1)

    # -- evaluation --------------------------------------------------------------------------

    def _evaluate(self, t: TenantWindows, now: float) -> None:
        t.pending = 0
        t.evaluated_at = now
        self._expire(t, now)
        ref = t.reference
        t.comparison = None if ref is None else compare(ref, t.current, self._limits)
        checks = t.comparison.checks if t.comparison is not None else {}
        clear = self.settings.thresholds.clear_ratio
        for stat in STATISTICS:
            check = checks.get(stat)
            was = t.alarms[stat]
            if check is None or check.level is None:
                now_on = False  # too few requests to claim anything
            elif check.breach:
                now_on = True
            else:
                now_on = was and check.level >= clear
            if now_on != was:
                level = None if check is None else check.level
                log.warning(
                    "drift alarm raised" if now_on else "drift alarm cleared",
                    extra={"tenant": t.name, "statistic": stat, "level": level},
                )
            t.alarms[stat] = now_on

    def refresh(self) -> None:
        """Re-evaluate tenants not evaluated for `evaluate_interval_s` (an aging window changes
        without traffic) and drop tenants no longer configured. Called at scrape / admin read."""
        now = self._clock()
        known = self._known() if self._known is not None else None
        for name, t in list(self._tenants.items()):
            if known is not None and name not in known:
                del self._tenants[name]
            elif t.pending or now - t.evaluated_at >= self.settings.evaluate_interval_s:
                self._evaluate(t, now)

    # -- references ----------------------------------------------------------------------------

    def _adopt(
        self, t: TenantWindows, counts: Counts, source: ReferenceSource, ref_id: str, set_at: float
    ) -> None:
        t.reference, t.collecting = counts, None
        t.ref_id, t.ref_source, t.ref_set_at = ref_id, source, set_at
        t.clear_alarms()
        t.pending = max(t.pending, 1)  # evaluated at the next observe or refresh
        t.evaluated_at = float("-inf")

    def _payload(self, t: TenantWindows) -> dict[str, Any]:
        assert t.reference is not None
        assert t.ref_id is not None
        assert t.ref_source is not None
        return payload_dict(
            ReferencePayload.of(
                t.reference,
                id=t.ref_id,
                source=t.ref_source,
                set_at=t.ref_set_at or 0.0,
                threshold=self.settings.low_confidence_threshold,
            )
        )

    def current_payload(self, tenant: str) -> dict[str, Any]:
        """The current window as a reference payload (to persist, then `load_reference`)."""
        t = self._tenants.get(tenant)
        have = 0 if t is None else t.current.requests
        if t is None or have < self.settings.min_window:
            raise WindowTooSmall(
                f"the current window holds {have} requests; at least "
                f"{self.settings.min_window} are needed for a reference"
            )
        payload = ReferencePayload.of(
            t.current,
            id=uuid.uuid4().hex,
            source="window",
            set_at=self._wall(),
            threshold=self.settings.low_confidence_threshold,
        )
        return payload_dict(payload)

    def set_reference(self, tenant: str) -> dict[str, Any]:
        """The current window becomes the reference (in memory); returns its payload."""
        payload = self.current_payload(tenant)
        self.load_reference(tenant, payload, persisted=False)
        return payload

    def reset(self, tenant: str) -> None:
        """Forget the reference: the tenant's next `reference_size` requests form a new one."""
        t = self._tenants.get(tenant)
        if t is None:
            return
        t.reference, t.collecting = None, Counts()
        t.ref_id = t.ref_source = t.ref_set_at = t.persisted_id = None
        t.clear_alarms()
        t.comparison = None

    def load_reference(
        self, tenant: str, payload: Mapping[str, Any], *, persisted: bool = True
    ) -> None:
        """Adopt a reference payload, by default one the registry holds (raises
        pydantic.ValidationError, a ValueError, when it is malformed)."""
        p = ReferencePayload.model_validate(payload)
        if p.low_confidence_threshold != self.settings.low_confidence_threshold:
            log.warning(
                "drift reference was taken with another low_confidence_threshold",
                extra={"tenant": tenant, "threshold": p.low_confidence_threshold},
            )
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = TenantWindows(tenant)
        self._adopt(t, p.counts(), p.source, p.id, p.set_at)
        t.persisted_id = p.id if persisted else None

    def reference_payload(self, tenant: str) -> dict[str, Any] | None:
        t = self._tenants.get(tenant)
        return None if t is None or t.reference is None else self._payload(t)

    def mark_persisted(self, tenant: str, ref_id: str | None) -> None:
        t = self._tenants.get(tenant)
        if t is not None:
            t.persisted_id = ref_id

    def sync_references(self, stored: Mapping[str, Mapping[str, Any]]) -> None:
        """Follow the registry (other replicas): adopt references stored with another id, and
        reset a tenant whose persisted reference was removed there."""
        for tenant, payload in stored.items():
            t = self._tenants.get(tenant)
            if t is None or payload.get("id") != t.ref_id:
                try:
                    self.load_reference(tenant, payload)
                except ValueError:
                    log.exception("stored drift reference refused", extra={"tenant": tenant})
        for name, t in self._tenants.items():
            if t.persisted_id is not None and name not in stored:
                self.reset(name)

    # -- reading -------------------------------------------------------------------------------

    def tenants(self) -> list[str]:
        return sorted(self._tenants)

    def windows(self, tenant: str) -> TenantWindows | None:
        """A tenant's windows (read-only use: the admin view and the gauges)."""
        return self._tenants.get(tenant)
