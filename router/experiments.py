"""A/B experiments on a routing target: definitions, sticky assignment, and the lookup the
request path uses.

An experiment splits the traffic of one *target* — an adapter alias (`support@stable`, or
`support`, which means the `stable` alias) or an auto-routing domain (`domain:medical`) —
between variants, each naming the model that serves it (`support@3`, `support@4`, an alias, or
the base model). The first variant is the control. A user is assigned by a stable hash of
(experiment, tenant, user key) onto [0, 1): candidates own the low end of the interval and the
control the rest, so raising a candidate's share (a ramp 1 % → 10 % → 50 %) only moves users
from control to candidate and never back, and a rollback (share 0) sends everyone to control.

Shadow mode mirrors a share of the target's requests to a candidate and throws the answer away;
the real request is served by the live assignment as usual. Whether a request is mirrored is
hashed from its request id (not sticky: mirroring is invisible to the user).

Pure module: no I/O, no server imports; the registry stores definitions as JSON.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.types import DEFAULT_ALIAS, NAME_RE, AdapterRef

DOMAIN_PREFIX = "domain:"
ACTIVE = ("running", "paused")  # paused: weights frozen, still assigning and measuring
Status = Literal["running", "paused", "promoted", "aborted", "rolled_back"]
_SCALE = float(1 << 64)


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_RE.pattern)
    model: str = Field(min_length=1, max_length=140)


class ShadowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variant: str
    share: float = Field(gt=0.0, le=1.0)


class ExperimentSpec(BaseModel):
    """What an operator submits (admin API / CLI); stored as the record's `definition`."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(min_length=1, max_length=140)
    variants: list[VariantSpec] = Field(min_length=2, max_length=8)
    # Initial live shares by variant name (missing → 0; control gets the rest). With a ramp,
    # the candidate starts at the ramp's first step instead.
    weights: dict[str, float] = Field(default_factory=dict)
    ramp: list[float] = Field(default_factory=list, max_length=10)
    ramp_interval_s: float = Field(600.0, ge=1.0)
    shadow: ShadowSpec | None = None
    tenants: list[str] = Field(default_factory=list)
    analysis_window_s: float = Field(600.0, ge=5.0)
    # Guardrail rules (server.experiments.analysis.Guardrails validates them).
    guardrails: dict[str, Any] = Field(default_factory=dict)
    auto_promote: bool = False

    @model_validator(mode="after")
    def _check(self) -> ExperimentSpec:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variant names must be unique")
        if parse_target(self.target) is None:
            raise ValueError("target must be an adapter alias (name or name@alias) or domain:NAME")
        unknown = set(self.weights) - set(names)
        if unknown:
            raise ValueError(f"weights name unknown variants: {sorted(unknown)}")
        if any(not 0.0 <= w <= 1.0 for w in self.weights.values()):
            raise ValueError("weights must be within [0, 1]")
        if sum(w for n, w in self.weights.items() if n != names[0]) > 1.0 + 1e-9:
            raise ValueError("candidate weights add up to more than 1")
        if self.ramp:
            if len(self.variants) != 2:
                raise ValueError("a ramp needs exactly two variants (control, candidate)")
            if any(not 0.0 < s <= 1.0 for s in self.ramp) or self.ramp != sorted(self.ramp):
                raise ValueError("ramp steps must increase within (0, 1]")
        if self.shadow is not None and self.shadow.variant not in names[1:]:
            raise ValueError("shadow.variant must name a candidate variant")
        return self

    @property
    def control(self) -> str:
        return self.variants[0].name

    def initial_weights(self) -> dict[str, float]:
        """Live shares at start: the ramp's first step, else the given weights; control the rest."""
        if self.ramp:
            shares = {self.variants[1].name: self.ramp[0]}
        else:
            shares = {v.name: self.weights.get(v.name, 0.0) for v in self.variants[1:]}
        return with_control(self.control, shares)


def with_control(control: str, candidates: Mapping[str, float]) -> dict[str, float]:
    """Candidate shares plus the control's (1 - their sum), control first."""
    rest = max(0.0, 1.0 - sum(candidates.values()))
    return {control: round(rest, 9), **{n: round(w, 9) for n, w in candidates.items()}}


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed target: an adapter alias (name, alias) or a domain."""

    adapter: str | None = None
    alias: str | None = None
    domain: str | None = None

    @property
    def key(self) -> str:
        if self.domain is not None:
            return DOMAIN_PREFIX + self.domain
        return f"{self.adapter}@{self.alias}"


def parse_target(text: str) -> Target | None:
    if text.startswith(DOMAIN_PREFIX):
        domain = text[len(DOMAIN_PREFIX) :]
        return Target(domain=domain) if NAME_RE.match(domain) else None
    ref = AdapterRef.parse(text)
    if ref is None or ref.version is not None:
        return None  # a fixed version is not a target: nobody's traffic moves with it
    return Target(adapter=ref.name, alias=ref.alias or DEFAULT_ALIAS)


def request_target_key(requested: str | None, domain: str | None) -> str | None:
    """The target key a request falls under: its routed domain, else the alias it named."""
    if domain is not None:
        return DOMAIN_PREFIX + domain
    if not requested:
        return None
    ref = AdapterRef.parse(requested)
    if ref is None or ref.version is not None:
        return None
    return f"{ref.name}@{ref.alias or DEFAULT_ALIAS}"


def unit_hash(*parts: str) -> float:
    """A stable, uniform value in [0, 1) from `parts` (same on every replica and restart)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def pick(order: Sequence[tuple[str, float]], u: float) -> str:
    """The variant whose slice of [0, 1) holds `u`; `order` lists candidates first, control
    last (it takes whatever share is left, including rounding)."""
    edge = 0.0
    for name, weight in order[:-1]:
        edge += weight
        if u < edge:
            return name
    return order[-1][0]


@dataclass(frozen=True, slots=True)
class Assignment:
    experiment: str
    variant: str
    model: str
    # Set when this request is also mirrored to a candidate (shadow mode).
    shadow_variant: str | None = None
    shadow_model: str | None = None


@dataclass(frozen=True, slots=True)
class LiveExperiment:
    """One active experiment, ready for the request path (built once per registry snapshot)."""

    name: str
    spec: ExperimentSpec
    status: str
    order: tuple[tuple[str, float], ...]  # candidates first, control last
    models: Mapping[str, str]

    @classmethod
    def build(
        cls, name: str, spec: ExperimentSpec, status: str, weights: Mapping[str, float]
    ) -> LiveExperiment:
        candidates = tuple((v.name, float(weights.get(v.name, 0.0))) for v in spec.variants[1:])
        order = (*candidates, (spec.control, 0.0))
        return cls(name, spec, status, order, {v.name: v.model for v in spec.variants})

    def applies_to(self, tenant: str) -> bool:
        return not self.spec.tenants or tenant in self.spec.tenants

    def assign(self, tenant: str, user: str, request_id: str) -> Assignment:
        variant = pick(self.order, unit_hash(self.name, tenant, user))
        shadow = self.spec.shadow
        if (
            shadow is not None
            and variant != shadow.variant
            and unit_hash(self.name, "shadow", request_id) < shadow.share
        ):
            return Assignment(
                self.name,
                variant,
                self.models[variant],
                shadow.variant,
                self.models[shadow.variant],
            )
        return Assignment(self.name, variant, self.models[variant])


class ExperimentBook:
    """Active experiments indexed by target key. At most one active experiment per target
    (the admin API refuses a second), so a lookup is one dict access."""

    def __init__(self, experiments: Sequence[LiveExperiment]) -> None:
        self.by_target: dict[str, LiveExperiment] = {}
        for exp in experiments:
            target = parse_target(exp.spec.target)
            if target is not None and exp.status in ACTIVE:
                self.by_target[target.key] = exp

    def __bool__(self) -> bool:
        return bool(self.by_target)

    def find(self, requested: str | None, domain: str | None, tenant: str) -> LiveExperiment | None:
        key = request_target_key(requested, domain)
        exp = self.by_target.get(key) if key is not None else None
        return exp if exp is not None and exp.applies_to(tenant) else None
