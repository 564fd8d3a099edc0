"""How drift is shown: the loraplex_drift_* gauges (computed at scrape time from the monitor's
last evaluation) and the JSON view of one tenant for the admin API.

A custom collector rather than Gauge objects: a scrape first lets the monitor re-evaluate
windows that aged without traffic, and a tenant removed from the configuration simply stops
being reported (no label sets left behind).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.telemetry.drift_window import Counts, TenantWindows

if TYPE_CHECKING:
    from server.telemetry.drift import DriftMonitor

# name → (help, labels); exposed as loraplex_drift_<name>.
TW = ["tenant", "window"]
GAUGES: dict[str, tuple[str, list[str]]] = {
    "domain_psi": ("PSI of the auto-routed domain mix, current vs reference.", ["tenant"]),
    "domain_js": ("Jensen-Shannon divergence (bits) of the domain mix.", ["tenant"]),
    "confidence_mean": ("Mean router confidence of auto-routed requests.", TW),
    "low_confidence_share": ("Share of auto-routed requests under the low threshold.", TW),
    "length_psi": ("PSI of token-length log2 bins, current vs reference.", ["tenant", "kind"]),
    "length_ks": ("Binned KS distance of token lengths.", ["tenant", "kind"]),
    "fallback_rate": ("Share of auto-routed requests served by the fallback.", TW),
    "error_rate": ("Share of requests answered with a 5xx.", TW),
    "window_requests": ("Requests in the window (reference: collected so far).", TW),
    "alarm": ("1 while a drift statistic is past its threshold.", ["tenant", "statistic"]),
}


class _Families:
    def __init__(self) -> None:
        self.families = {
            name: GaugeMetricFamily(f"loraplex_drift_{name}", doc, labels=labels)
            for name, (doc, labels) in GAUGES.items()
        }

    def add(self, name: str, labels: list[str], value: float | None) -> None:
        if value is not None:
            self.families[name].add_metric(labels, value)

    def tenant(self, t: TenantWindows) -> None:
        name, ref, cur, c = t.name, t.reference, t.current, t.comparison
        self.add("window_requests", [name, "current"], cur.requests)
        collected = t.collecting.requests if t.collecting is not None else 0
        self.add("window_requests", [name, "reference"], ref.requests if ref else collected)
        for window, counts in (("reference", ref), ("current", cur)):
            if counts is not None:
                labels = [name, window]
                self.add("confidence_mean", labels, counts.confidence_mean())
                self.add("low_confidence_share", labels, counts.low_confidence_share())
                self.add("fallback_rate", labels, counts.fallback_rate())
                self.add("error_rate", labels, counts.error_rate())
        if c is not None:
            self.add("domain_psi", [name], c.domain_psi)
            self.add("domain_js", [name], c.domain_js)
            for kind in ("prompt", "completion"):
                self.add("length_psi", [name, kind], c.length_psi[kind])
                self.add("length_ks", [name, kind], c.length_ks[kind])
        for stat, on in t.alarms.items():
            self.add("alarm", [name, stat], 1.0 if on else 0.0)


class DriftCollector(Collector):
    """Registered on the app's registry by the monitor."""

    def __init__(self, monitor: DriftMonitor) -> None:
        self._monitor = monitor

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(_Families().families.values())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        m = self._monitor
        m.refresh()
        f = _Families()
        for name in m.tenants():
            t = m.windows(name)
            if t is not None:
                f.tenant(t)
        return iter(f.families.values())


def report(t: TenantWindows) -> dict[str, Any]:
    """Everything the gauges show for one tenant, and the windows' bins, as JSON."""
    ref, cur, c = t.reference, t.current, t.comparison
    return {
        "tenant": t.name,
        "reference": {
            "id": t.ref_id,
            "source": t.ref_source,
            "set_at": t.ref_set_at,
            "requests": ref.requests if ref is not None else 0,
            "collecting": t.collecting.requests if t.collecting is not None else None,
        },
        "windows": {"reference": _view(ref), "current": _view(cur)},
        "statistics": {
            "domain_psi": c.domain_psi if c else None,
            "domain_js": c.domain_js if c else None,
            "length_psi": c.length_psi if c else None,
            "length_ks": c.length_ks if c else None,
            "levels": {k: v.level for k, v in c.checks.items()} if c else {},
        },
        "alarms": dict(t.alarms),
    }


def _view(c: Counts | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {
        "requests": c.requests,
        "routed": c.routed,
        "sized": c.sized,
        "domains": {d: n for d, n in sorted(c.domains.items()) if n},
        "confidence_mean": c.confidence_mean(),
        "low_confidence_share": c.low_confidence_share(),
        "fallback_rate": c.fallback_rate(),
        "error_rate": c.error_rate(),
        "prompt_length_bins": list(c.prompt),
        "completion_length_bins": list(c.completion),
    }
