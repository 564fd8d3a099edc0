"""What the drift monitor keeps per window: bin counters that add and remove one request in O(1),
their JSON form (a reference window is persisted in the registry), and the comparison of two
windows (the statistics of `server.telemetry.stats` over these counters).

Every quantity is an integer count — confidence is summed in millionths — so adding a request
and later removing it leaves the counters exactly where they were, however long the gateway runs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.telemetry import stats

# Token counts in log2 bins: 0, 1, 2-3, 4-7, ..., 2^14-2^15-1, and 2^15 or more.
LENGTH_BINS = 17
LENGTH_SCHEME: Literal["log2-17"] = "log2-17"
MICRO = 1_000_000
NONE_DOMAIN = "none"  # auto-routed, but no domain was confident enough (out of scope)
OTHER_DOMAIN = "other"  # a domain outside the configured list
ReferenceSource = Literal["first_n", "window", "imported"]
# The alarm statistics (label values of loraplex_drift_alarm).
STATISTICS = (
    "domain_psi",
    "confidence",
    "prompt_length",
    "completion_length",
    "fallback_rate",
    "error_rate",
)


def length_bin(tokens: int) -> int:
    """The log2 bin of a token count >= 0 (fixed bins: comparable across windows and restarts)."""
    b = tokens.bit_length()
    return b if b < LENGTH_BINS else LENGTH_BINS - 1


# One request as the windows see it (a plain tuple: built on the request path):
# (at, domain, confidence_micro, low, fallback, prompt_bin, completion_bin, error).
# `domain` is None when the request was not auto-routed (then confidence_micro, low and fallback
# are 0); prompt_bin is -1 when the engine reported no usage (errors before or at the engine).
Observation = tuple[float, str | None, int, int, int, int, int, int]


class Counts:
    """Counters of one window; `add(obs, +1)` / `add(obs, -1)` keep them exact."""

    __slots__ = (
        "completion",
        "confidence_micro",
        "domains",
        "errors",
        "fallbacks",
        "low_confidence",
        "prompt",
        "requests",
        "routed",
        "sized",
    )

    def __init__(self) -> None:
        self.requests = 0  # every observed request
        self.routed = 0  # auto-routed ones: domain, confidence and fallback are over these
        self.domains: dict[str, int] = {}
        self.confidence_micro = 0
        self.low_confidence = 0
        self.fallbacks = 0
        self.errors = 0
        self.sized = 0  # requests whose usage the engine reported: lengths are over these
        self.prompt = [0] * LENGTH_BINS
        self.completion = [0] * LENGTH_BINS

    def add(self, o: Observation, k: int) -> None:
        _, domain, confidence, low, fallback, prompt_bin, completion_bin, error = o
        self.requests += k
        if error:
            self.errors += k
        if domain is not None:
            self.routed += k
            self.domains[domain] = self.domains.get(domain, 0) + k
            self.confidence_micro += k * confidence
            self.low_confidence += k * low
            self.fallbacks += k * fallback
        if prompt_bin >= 0:
            self.sized += k
            self.prompt[prompt_bin] += k
            self.completion[completion_bin] += k

    def copy(self) -> Counts:
        c = Counts()
        for name in self.__slots__:
            value = getattr(self, name)
            setattr(c, name, value.copy() if isinstance(value, dict | list) else value)
        return c

    def confidence_mean(self) -> float | None:
        return self.confidence_micro / MICRO / self.routed if self.routed else None

    def low_confidence_share(self) -> float | None:
        return self.low_confidence / self.routed if self.routed else None

    def fallback_rate(self) -> float | None:
        return self.fallbacks / self.routed if self.routed else None

    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


class ReferencePayload(BaseModel):
    """A reference window as JSON (what `registry.put_drift_reference` stores)."""

    model_config = ConfigDict(extra="ignore")
    version: Literal[1] = 1
    id: str = Field(min_length=1, max_length=64)
    source: ReferenceSource
    set_at: float
    length_bins: Literal["log2-17"] = LENGTH_SCHEME
    low_confidence_threshold: float = Field(ge=0, le=1)
    requests: int = Field(ge=0)
    routed: int = Field(ge=0)
    domains: dict[str, int] = Field(max_length=256)
    confidence_micro: int = Field(ge=0)
    low_confidence: int = Field(ge=0)
    fallbacks: int = Field(ge=0)
    errors: int = Field(ge=0)
    sized: int = Field(ge=0)
    prompt: list[int] = Field(min_length=LENGTH_BINS, max_length=LENGTH_BINS)
    completion: list[int] = Field(min_length=LENGTH_BINS, max_length=LENGTH_BINS)

    @model_validator(mode="after")
    def _consistent(self) -> ReferencePayload:
        counts = [*self.domains.values(), *self.prompt, *self.completion]
        if any(c < 0 for c in counts):
            raise ValueError("counts must be >= 0")
        if sum(self.domains.values()) != self.routed or self.routed > self.requests:
            raise ValueError("domain counts must add up to the routed requests")
        if sum(self.prompt) != self.sized or sum(self.completion) != self.sized:
            raise ValueError("length bins must add up to the sized requests")
        if max(self.low_confidence, self.fallbacks) > self.routed or self.errors > self.requests:
            raise ValueError("event counts exceed their totals")
        if self.sized > self.requests or self.confidence_micro > self.routed * MICRO:
            raise ValueError("counts exceed their totals")
        return self

    def counts(self) -> Counts:
        c = Counts()
        c.requests, c.routed, c.domains = self.requests, self.routed, dict(self.domains)
        c.confidence_micro, c.low_confidence = self.confidence_micro, self.low_confidence
        c.fallbacks, c.errors, c.sized = self.fallbacks, self.errors, self.sized
        c.prompt, c.completion = list(self.prompt), list(self.completion)
        return c

    @classmethod
    def of(
        cls, c: Counts, *, id: str, source: ReferenceSource, set_at: float, threshold: float
    ) -> ReferencePayload:
        return cls(
            id=id,
            source=source,
            set_at=set_at,
            low_confidence_threshold=threshold,
            requests=c.requests,
            routed=c.routed,
            domains={d: n for d, n in c.domains.items() if n},
            confidence_micro=c.confidence_micro,
            low_confidence=c.low_confidence,
            fallbacks=c.fallbacks,
            errors=c.errors,
            sized=c.sized,
            prompt=list(c.prompt),
            completion=list(c.completion),
        )


@dataclass(frozen=True, slots=True)
class Limits:
    """The alarm thresholds the comparison needs (from `DriftThresholds`)."""

    min_window: int
    domain_psi: float
    confidence_drop: float
    low_confidence_increase: float
    length_psi: float
    fallback_increase: float
    error_increase: float
    min_z: float


@dataclass(frozen=True, slots=True)
class Check:
    """One alarm statistic: `level` is value / limit (1 = at the threshold; None = too few
    requests to say), `breach` whether this evaluation would raise the alarm."""

    level: float | None
    breach: bool


INSUFFICIENT = Check(None, False)


@dataclass(frozen=True, slots=True)
class Comparison:
    """The statistics of a current window against a reference (None: too few requests)."""

    domain_psi: float | None
    domain_js: float | None
    length_psi: dict[str, float | None]
    length_ks: dict[str, float | None]
    checks: dict[str, Check]


def compare(ref: Counts, cur: Counts, lim: Limits) -> Comparison:
    n = lim.min_window
    routed = ref.routed >= n and cur.routed >= n
    domain_psi = domain_js = None
    checks: dict[str, Check] = {}
    if routed:
        names = sorted(set(ref.domains) | set(cur.domains))
        r = [float(ref.domains.get(d, 0)) for d in names]
        c = [float(cur.domains.get(d, 0)) for d in names]
        domain_psi, domain_js = stats.psi(r, c), stats.js_divergence(r, c)
        checks["domain_psi"] = _level(domain_psi / lim.domain_psi)
        drop = (ref.confidence_micro / ref.routed - cur.confidence_micro / cur.routed) / MICRO
        checks["confidence"] = _worst(
            _level(drop / lim.confidence_drop),
            _rate(
                ref.low_confidence,
                ref.routed,
                cur.low_confidence,
                cur.routed,
                lim.low_confidence_increase,
                lim.min_z,
            ),
        )
        checks["fallback_rate"] = _rate(
            ref.fallbacks, ref.routed, cur.fallbacks, cur.routed, lim.fallback_increase, lim.min_z
        )
    length_psi: dict[str, float | None] = {"prompt": None, "completion": None}
    length_ks: dict[str, float | None] = {"prompt": None, "completion": None}
    for kind, r_bins, c_bins in (
        ("prompt", ref.prompt, cur.prompt),
        ("completion", ref.completion, cur.completion),
    ):
        if ref.sized >= n and cur.sized >= n:
            rf, cf = [float(x) for x in r_bins], [float(x) for x in c_bins]
            value = length_psi[kind] = stats.psi(rf, cf)
            length_ks[kind] = stats.ks_binned(rf, cf).statistic
            checks[f"{kind}_length"] = _level(value / lim.length_psi)
    if ref.requests >= n and cur.requests >= n:
        checks["error_rate"] = _rate(
            ref.errors, ref.requests, cur.errors, cur.requests, lim.error_increase, lim.min_z
        )
    return Comparison(domain_psi, domain_js, length_psi, length_ks, checks)


def _level(level: float) -> Check:
    return Check(level, level >= 1.0)


def _rate(
    ref_events: int, ref_n: int, cur_events: int, cur_n: int, margin: float, z: float
) -> Check:
    """An increase of a rate: past `margin` (absolute) AND significant (one-sided pooled z)."""
    level = (cur_events / cur_n - ref_events / ref_n) / margin
    significant = stats.two_proportion_z(ref_events, ref_n, cur_events, cur_n).statistic >= z
    return Check(level, level >= 1.0 and significant)


def _worst(*checks: Check) -> Check:
    levels = [c.level for c in checks if c.level is not None]
    return Check(max(levels) if levels else None, any(c.breach for c in checks))


def payload_dict(p: ReferencePayload) -> dict[str, Any]:
    return p.model_dump(mode="json")


def _no_alarms() -> dict[str, bool]:
    return dict.fromkeys(STATISTICS, False)


@dataclass(slots=True)
class TenantWindows:
    """One tenant's state: the current window (ring buffer + counters), the reference (or the
    first-N reference being collected), the last comparison and the alarms."""

    name: str
    window: deque[Observation] = field(default_factory=deque)
    current: Counts = field(default_factory=Counts)
    collecting: Counts | None = field(default_factory=Counts)  # first-N reference being built
    reference: Counts | None = None
    ref_id: str | None = None
    ref_source: ReferenceSource | None = None
    ref_set_at: float | None = None
    persisted_id: str | None = None  # the reference id the registry holds, as far as we know
    alarms: dict[str, bool] = field(default_factory=_no_alarms)
    comparison: Comparison | None = None
    pending: int = 0
    evaluated_at: float = float("-inf")

    def clear_alarms(self) -> None:
        self.alarms = _no_alarms()
