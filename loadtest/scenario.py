"""Load-test scenarios: what traffic to send, read from YAML and checked before any request.

A scenario names tenants (with keys), which adapters they ask for and how popular each is
(uniform, Zipf, or following the prompt's domain), the domain prompt mix, the share of streamed
requests, prompt and output length distributions, the load levels to run (open loop: Poisson
arrival rates; closed loop: fixed concurrencies), the bounds of each level and the SLO that
defines goodput. See `loadtest/scenarios/*.yaml` for examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Popularity = Literal["uniform", "zipf", "domain"]
Mode = Literal["open", "closed"]
Endpoint = Literal["chat", "completions"]
Selection = Literal["model", "header"]
DISTRIBUTIONS = ("fixed", "uniform", "normal", "lognormal")


class ScenarioError(ValueError):
    """The scenario file is not usable; the message names the offending field."""


@dataclass(frozen=True)
class Length:
    """A token-count distribution; samples are rounded and clipped to [min, max]."""

    dist: str = "fixed"
    value: float = 16  # fixed; the mean for normal/lognormal (of the result, not of the log)
    sigma: float = 0.5  # normal: std dev in tokens; lognormal: std dev of the log
    min: int = 1
    max: int = 4096


@dataclass(frozen=True)
class Tenant:
    name: str
    key: str
    weight: float = 1.0
    adapters: tuple[str, ...] = ()  # empty: every adapter of the scenario


@dataclass(frozen=True)
class Domain:
    name: str
    prompts: tuple[str, ...]
    weight: float = 1.0
    adapter: str | None = None  # used when popularity is "domain"


@dataclass(frozen=True)
class Load:
    mode: Mode = "closed"
    levels: tuple[float, ...] = (1,)  # arrival rates (req/s) or concurrencies
    requests: int = 100  # per level; whichever bound is hit first ends the level
    duration_s: float = 60.0
    warmup_requests: int = 0


@dataclass(frozen=True)
class SLO:
    """Goodput counts successful requests meeting every bound that is set."""

    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: float | None = None  # mean inter-token gap of the request (TPOT)


@dataclass(frozen=True)
class Scenario:
    name: str
    tenants: tuple[Tenant, ...]
    adapters: tuple[str, ...]
    domains: tuple[Domain, ...]
    url: str | None = None
    endpoint: Endpoint = "chat"
    popularity: Popularity = "uniform"
    zipf_s: float = 1.1
    selection: Selection = "model"
    stream_share: float = 1.0
    prompt_tokens: Length = Length(value=32)
    output_tokens: Length = Length(value=16)
    load: Load = Load()
    slo: SLO = SLO()
    seed: int = 0
    timeout_s: float = 300.0
    extra_body: dict[str, Any] = field(default_factory=dict)


def load_scenario(path: Path) -> Scenario:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    return parse_scenario(raw, default_name=path.stem)


def parse_scenario(raw: Any, default_name: str = "scenario") -> Scenario:
    """Build a Scenario from parsed YAML, with an error naming the first bad field."""
    r = _Reader(raw, "")
    tenants = tuple(_tenant(t) for t in r.list_of("tenants", required=True))
    if not tenants:
        raise ScenarioError("tenants: at least one tenant is needed")
    ad = _Reader(r.get("adapters", {}), "adapters")
    domains = tuple(_domain(d) for d in r.list_of("domains", required=True))
    if not domains:
        raise ScenarioError("domains: at least one domain is needed")
    names = tuple(str(n) for n in ad.list_of("names"))
    popularity = ad.choice("popularity", ("uniform", "zipf", "domain"), "uniform")
    if popularity == "domain":
        missing = [d.name for d in domains if d.adapter is None]
        if missing:
            raise ScenarioError(f"domains: popularity 'domain' needs an adapter for {missing}")
        names = names or tuple(dict.fromkeys(str(d.adapter) for d in domains))
    if not names:
        raise ScenarioError("adapters.names: at least one adapter (or 'base') is needed")
    for t in tenants:
        if popularity != "domain" and set(t.adapters) - set(names):
            raise ScenarioError(f"tenants.{t.name}.adapters: not in adapters.names")
    ld = _Reader(r.get("load", {}), "load")
    levels = tuple(float(v) for v in ld.list_of("levels") or [1])
    if any(v <= 0 for v in levels):
        raise ScenarioError("load.levels: every level must be > 0")
    sl = _Reader(r.get("slo", {}), "slo")
    extra = r.get("extra_body", {})
    if not isinstance(extra, dict):
        raise ScenarioError("extra_body: expected a mapping")
    return Scenario(
        name=str(r.get("name", default_name)),
        url=r.opt_str("url"),
        endpoint=r.choice("endpoint", ("chat", "completions"), "chat"),
        tenants=tenants,
        adapters=names,
        popularity=popularity,
        zipf_s=ad.number("zipf_s", 1.1, low=0.0),
        selection=ad.choice("selection", ("model", "header"), "model"),
        domains=domains,
        stream_share=r.number("stream_share", 1.0, low=0.0, high=1.0),
        prompt_tokens=_length(r.get("prompt_tokens", {}), "prompt_tokens", 32),
        output_tokens=_length(r.get("output_tokens", {}), "output_tokens", 16),
        load=Load(
            mode=ld.choice("mode", ("open", "closed"), "closed"),
            levels=levels,
            requests=int(ld.number("requests", 100, low=1)),
            duration_s=ld.number("duration_s", 60.0, low=0.001),
            warmup_requests=int(ld.number("warmup_requests", 0, low=0)),
        ),
        slo=SLO(
            ttft_ms=sl.opt_number("ttft_ms"),
            e2e_ms=sl.opt_number("e2e_ms"),
            itl_ms=sl.opt_number("itl_ms"),
        ),
        seed=int(r.number("seed", 0)),
        timeout_s=r.number("timeout_s", 300.0, low=0.001),
        extra_body=dict(extra),
    )


def _tenant(raw: Any) -> Tenant:
    r = _Reader(raw, "tenants[]")
    name = r.req_str("name")
    r = _Reader(raw, f"tenants.{name}")
    return Tenant(
        name=name,
        key=r.req_str("key"),
        weight=r.number("weight", 1.0, low=0.0),
        adapters=tuple(str(a) for a in r.list_of("adapters")),
    )


def _domain(raw: Any) -> Domain:
    r = _Reader(raw, "domains[]")
    name = r.req_str("name")
    r = _Reader(raw, f"domains.{name}")
    prompts = tuple(str(p) for p in r.list_of("prompts", required=True))
    if not prompts:
        raise ScenarioError(f"domains.{name}.prompts: at least one prompt is needed")
    return Domain(name, prompts, r.number("weight", 1.0, low=0.0), r.opt_str("adapter"))


def _length(raw: Any, where: str, default: float) -> Length:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return Length("fixed", float(raw), min=max(1, int(raw)), max=max(1, int(raw)))
    r = _Reader(raw, where)
    out = Length(
        dist=r.choice("dist", DISTRIBUTIONS, "fixed"),
        value=r.number("value", default, low=0.0),
        sigma=r.number("sigma", 0.5, low=0.0),
        min=int(r.number("min", 1, low=1)),
        max=int(r.number("max", 4096, low=1)),
    )
    if out.min > out.max:
        raise ScenarioError(f"{where}: min > max")
    return out


class _Reader:
    """Typed access to one YAML mapping, raising ScenarioError with the field's path."""

    def __init__(self, raw: Any, where: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ScenarioError(f"{where or 'scenario'}: expected a mapping")
        self.raw: dict[str, Any] = raw
        self.where = where

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def req_str(self, key: str) -> str:
        value = self.raw.get(key)
        if not isinstance(value, str) or not value:
            raise ScenarioError(f"{self._path(key)}: a non-empty string is required")
        return value

    def opt_str(self, key: str) -> str | None:
        value = self.raw.get(key)
        return None if value is None else str(value)

    def number(
        self, key: str, default: float, low: float | None = None, high: float | None = None
    ) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{self._path(key)}: a number is required")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ScenarioError(f"{self._path(key)}: {value} is out of range [{low}, {high}]")
        return float(value)

    def opt_number(self, key: str) -> float | None:
        return None if self.raw.get(key) is None else self.number(key, 0.0, low=0.0)

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> Any:
        value = self.raw.get(key, default)
        if value not in allowed:
            raise ScenarioError(f"{self._path(key)}: {value!r} is not one of {list(allowed)}")
        return value

    def list_of(self, key: str, required: bool = False) -> list[Any]:
        value = self.raw.get(key)
        if value is None:
            if required:
                raise ScenarioError(f"{self._path(key)}: required")
            return []
        if not isinstance(value, list):
            raise ScenarioError(f"{self._path(key)}: expected a list")
        return value
