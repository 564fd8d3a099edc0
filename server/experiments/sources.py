"""Where the experiment controller reads per-variant statistics over its analysis window.

- `PromQLSource`: Prometheus instant queries (`increase()` over the window, summed by variant):
  the right source with several replicas, since each replica only counts its own requests.
- `LocalSource`: this process's counters, windowed by diffing cumulative snapshots it keeps;
  for a single replica without Prometheus.

Both read the experiment families of `server.telemetry.metrics` and give non-cumulative
`Histo`s. A source that cannot answer raises `MetricsUnavailable`: the controller skips the
round, never rolls back on missing data. Variants without traffic in the window are absent.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson

from server.experiments.analysis import Histo, VariantStats
from server.telemetry.metrics import GatewayMetrics

REQUESTS = "loraplex_experiment_requests_total"
FEEDBACK = "loraplex_experiment_feedback_total"
# VariantStats field -> histogram family
HISTOGRAMS = {
    "latency": "loraplex_experiment_request_duration_seconds",
    "ttft": "loraplex_experiment_ttft_seconds",
    "completion_tokens": "loraplex_experiment_completion_tokens",
    "feedback_score": "loraplex_experiment_feedback_score",
}


class MetricsUnavailable(Exception):
    """The source could not say what happened in the window (Prometheus down, slow, or answering
    something unexpected). Not a gateway error: it never reaches a client."""


class MetricsSource(Protocol):
    async def variant_stats(self, experiment: str, window_s: float) -> dict[str, VariantStats]:
        """Each variant's traffic over the last `window_s` seconds, by variant name."""
        ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class _Raw:
    """One variant's counters as read: outcome and rating counts, and per histogram field the
    CUMULATIVE bucket counts by upper bound (Prometheus' `le`)."""

    outcomes: dict[str, float] = field(default_factory=dict)
    ratings: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)

    def minus(self, older: _Raw | None) -> _Raw:
        """Increase since `older`, clamped at 0 (a series removed and re-created restarts)."""
        if older is None:
            return self

        def sub(new: Mapping[Any, float], old: Mapping[Any, float]) -> dict[Any, float]:
            return {k: max(v - old.get(k, 0.0), 0.0) for k, v in new.items()}

        return _Raw(
            sub(self.outcomes, older.outcomes),
            sub(self.ratings, older.ratings),
            {f: sub(b, older.buckets.get(f, {})) for f, b in self.buckets.items()},
        )

    def stats(self) -> VariantStats:
        histos = {f: _histo(self.buckets.get(f, {})) for f in HISTOGRAMS}
        return VariantStats(
            requests=math.fsum(self.outcomes.values()),
            errors=self.outcomes.get("error", 0.0),
            feedback_up=self.ratings.get("up", 0.0),
            feedback_down=self.ratings.get("down", 0.0),
            **histos,
        )


def _histo(cumulative: Mapping[float, float]) -> Histo:
    """Non-cumulative `Histo` from cumulative counts by `le`. Counts are made monotonic first
    (a running maximum, as `histogram_quantile` does): `increase()` extrapolates each bucket
    series on its own, so neighbours can disagree by a little."""
    if not cumulative:
        return Histo.empty()
    items = sorted(cumulative.items())
    if items[-1][0] != math.inf:
        items.append((math.inf, items[-1][1]))
    bounds: list[float] = []
    counts: list[float] = []
    prev = 0.0
    for le, value in items:
        value = max(value, prev)
        bounds.append(le)
        counts.append(value - prev)
        prev = value
    return Histo(tuple(bounds), tuple(counts))


def promql_string(value: str) -> str:
    """`value` as a double-quoted PromQL string literal (Go escaping: backslash, quote and
    control characters escaped; other characters, UTF-8 included, stay as they are)."""
    out = ['"']
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def promql_duration(window_s: float) -> str:
    """A range duration for `[...]`: whole seconds when exact, else milliseconds."""
    if not 0 < window_s < math.inf:
        raise ValueError(f"window must be a positive number of seconds, got {window_s!r}")
    ms = max(round(window_s * 1000), 1)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def queries(experiment: str, window_s: float) -> dict[str, str]:
    """The instant queries one round needs, by what they fill: "requests" (by outcome),
    "feedback" (by rating), and one per histogram field (by le)."""
    sel = "{experiment=" + promql_string(experiment) + "}[" + promql_duration(window_s) + "]"
    out = {
        "requests": f"sum by (variant, outcome) (increase({REQUESTS}{sel}))",
        "feedback": f"sum by (variant, rating) (increase({FEEDBACK}{sel}))",
    }
    for name, family in HISTOGRAMS.items():
        out[name] = f"sum by (variant, le) (increase({family}_bucket{sel}))"
    return out


class PromQLSource:
    """Prometheus HTTP API (`GET /api/v1/query`), one instant query per family, concurrently."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        timeout_s: float = 5.0,
        *,
        owns_session: bool = False,
    ) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/api/v1/query"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._owns_session = owns_session

    async def aclose(self) -> None:
        if self._owns_session:
            await self._session.close()

    async def variant_stats(self, experiment: str, window_s: float) -> dict[str, VariantStats]:
        named = queries(experiment, window_s)
        results = await asyncio.gather(
            *(self.query(q) for q in named.values()), return_exceptions=True
        )
        raw: dict[str, _Raw] = {}
        for kind, result in zip(named, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            for labels, value in result:
                variant = labels.get("variant")
                if variant is None:
                    continue
                into = raw.setdefault(variant, _Raw())
                if kind == "requests":
                    _add(into.outcomes, labels.get("outcome", ""), value)
                elif kind == "feedback":
                    _add(into.ratings, labels.get("rating", ""), value)
                else:
                    _add(into.buckets.setdefault(kind, {}), _le(labels), value)
        return {v: r.stats() for v, r in raw.items()}

    async def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's vector as (labels, value) pairs; MetricsUnavailable on any
        failure, including a NaN or infinite value (nothing to judge a candidate on)."""
        try:
            async with self._session.get(
                self._url, params={"query": promql}, timeout=self._timeout
            ) as resp:
                status = resp.status
                body = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise MetricsUnavailable(f"prometheus query failed: {type(exc).__name__}") from exc
        try:
            doc = orjson.loads(body)
            if status != 200 or doc.get("status") != "success":
                raise MetricsUnavailable(
                    f"prometheus answered {status}: {doc.get('errorType')}: {doc.get('error')}"
                )
            data = doc["data"]
            if data["resultType"] != "vector":
                raise MetricsUnavailable(f"expected a vector, got {data['resultType']!r}")
            out = []
            for sample in data["result"]:
                labels = {str(k): str(v) for k, v in sample["metric"].items()}
                value = float(sample["value"][1])
                if not math.isfinite(value):
                    raise MetricsUnavailable(f"non-finite value {value} for {labels}")
                out.append((labels, value))
            return out
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            # orjson.JSONDecodeError is a ValueError
            raise MetricsUnavailable(f"unexpected prometheus answer ({status})") from exc


def _le(labels: Mapping[str, str]) -> float:
    """The bucket bound ("+Inf" parses); a missing or bad one is an unexpected answer."""
    try:
        le = float(labels["le"])
    except (KeyError, ValueError):
        le = math.nan
    if math.isnan(le):
        raise MetricsUnavailable(
            f"unexpected prometheus answer: bucket without a valid le {labels}"
        )
    return le


def _add(into: dict[Any, float], key: Any, value: float) -> None:
    into[key] = into.get(key, 0.0) + value


@dataclass(slots=True)
class _History:
    snapshots: deque[tuple[float, dict[str, _Raw]]] = field(default_factory=deque)
    longest_window_s: float = 0.0


class LocalSource:
    """This process's experiment counters. Each call takes a cumulative snapshot; the window is
    the difference between now and the newest snapshot at least `window_s` old (all counts
    since the process started when none is that old yet). So the window is as fine as the
    calling rhythm: the controller's round interval. Snapshots are kept for the longest window
    asked for, at most `max_snapshots` per experiment."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_snapshots: int = 2000,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._max = max_snapshots
        self._history: dict[str, _History] = {}

    async def aclose(self) -> None:
        self._history.clear()

    def forget(self, experiment: str) -> None:
        """Drop an ended experiment's snapshots."""
        self._history.pop(experiment, None)

    async def variant_stats(self, experiment: str, window_s: float) -> dict[str, VariantStats]:
        if not 0 < window_s < math.inf:
            raise ValueError(f"window must be a positive number of seconds, got {window_s!r}")
        now = self._clock()
        current = self.read(experiment)
        history = self._history.setdefault(experiment, _History())
        history.longest_window_s = max(history.longest_window_s, window_s)
        baseline: dict[str, _Raw] = {}
        for taken, snapshot in reversed(history.snapshots):
            if now - taken >= window_s:
                baseline = snapshot
                break
        snaps = history.snapshots
        snaps.append((now, current))
        # the oldest snapshot is needed while the next one is younger than the longest window
        while len(snaps) > 1 and (
            now - snaps[1][0] >= history.longest_window_s or len(snaps) > self._max
        ):
            snaps.popleft()
        return {v: raw.minus(baseline.get(v)).stats() for v, raw in current.items()}

    def read(self, experiment: str) -> dict[str, _Raw]:
        """Cumulative counters of one experiment, by variant, from the metric objects (not the
        whole registry: other collectors on it, e.g. drift's, need not run for this)."""
        m = self._metrics
        raw: dict[str, _Raw] = {}

        def samples(metric: Any, name: str) -> Iterable[tuple[dict[str, str], float]]:
            for family in metric.collect():
                for s in family.samples:
                    if s.name == name and s.labels.get("experiment") == experiment:
                        yield s.labels, s.value

        for labels, value in samples(m.exp_requests, REQUESTS):
            _add(raw.setdefault(labels["variant"], _Raw()).outcomes, labels["outcome"], value)
        for labels, value in samples(m.exp_feedback, FEEDBACK):
            _add(raw.setdefault(labels["variant"], _Raw()).ratings, labels["rating"], value)
        handles = {
            "latency": m.exp_latency,
            "ttft": m.exp_ttft,
            "completion_tokens": m.exp_completion_tokens,
            "feedback_score": m.exp_feedback_score,
        }
        for kind, family in HISTOGRAMS.items():
            for labels, value in samples(handles[kind], family + "_bucket"):
                buckets = raw.setdefault(labels["variant"], _Raw()).buckets
                _add(buckets.setdefault(kind, {}), float(labels["le"]), value)
        return raw
