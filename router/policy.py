"""The routes file: domains → targets, training examples, keywords, thresholds, fallback and
per-tenant overrides. Parsed and checked once at start-up; immutable afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from router.types import Decision, Example, Prediction

DEFAULT_ROUTES = Path(__file__).resolve().parent / "data" / "routes.yaml"
_DOMAIN_KEYS = {"target", "threshold", "keywords", "examples"}
_TENANT_KEYS = {"auto", "fallback", "domains"}
_TOP_KEYS = {
    "version",
    "fallback",
    "catch_all",
    "threshold",
    "examples_files",
    "domains",
    "tenants",
}


class RoutesError(ValueError):
    """The routes file is malformed (raised at start-up, never on the request path)."""


@dataclass(frozen=True)
class Domain:
    name: str
    target: str
    threshold: float
    keywords: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class TenantRoutes:
    auto: bool = False
    fallback: str | None = None
    domains: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RoutesPolicy:
    fallback: str
    domains: Mapping[str, Domain]
    catch_all: frozenset[str] = frozenset()
    tenants: Mapping[str, TenantRoutes] = field(default_factory=dict)
    examples: tuple[Example, ...] = ()
    source: Path | None = None

    @property
    def keywords(self) -> dict[str, tuple[str, ...]]:
        return {n: d.keywords for n, d in self.domains.items() if d.keywords}

    def tenant_auto(self, tenant: str) -> bool:
        t = self.tenants.get(tenant)
        return t is not None and t.auto

    def decide(
        self,
        prediction: Prediction,
        classifier: str,
        tenant: str | None = None,
        may_use: Callable[[str], bool] | None = None,
        default: str | None = None,
    ) -> Decision:
        """Turn a classifier's prediction into a target for one tenant.

        Below the domain's threshold, or a catch-all domain → the fallback. A domain whose
        target the tenant may not use also falls back. The fallback is the tenant's own, else
        the global one, else (if the tenant may use neither) the tenant's default model.
        """
        allowed = may_use or (lambda _: True)
        overrides = self.tenants.get(tenant or "", TenantRoutes())
        domain = self.domains.get(prediction.domain or "")
        conf = prediction.confidence

        def fall(reason: Any) -> Decision:
            candidates = [overrides.fallback, self.fallback, default]
            target = next((c for c in candidates if c and allowed(c)), self.fallback)
            name = domain.name if domain is not None and reason != "low_confidence" else None
            return Decision(name, conf, classifier, target, True, reason)

        if domain is None or conf < domain.threshold:
            return fall("low_confidence")
        if domain.name in self.catch_all:
            return fall("catch_all")
        target = overrides.domains.get(domain.name, domain.target)
        if not allowed(target):
            return fall("not_entitled")
        return Decision(domain.name, conf, classifier, target, False, None)


def load_routes(path: Path = DEFAULT_ROUTES) -> RoutesPolicy:
    """Read and check a routes file (format: docs/router.md)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RoutesError(f"{path}: {exc}") from exc
    return parse_routes(raw, path)


def parse_routes(raw: Any, path: Path | None = None) -> RoutesPolicy:
    where = str(path) if path else "routes"
    if not isinstance(raw, dict):
        raise RoutesError(f"{where}: expected a mapping")
    _no_unknown(raw, _TOP_KEYS, where)
    if raw.get("version", 1) != 1:
        raise RoutesError(f"{where}: unsupported version {raw.get('version')!r}")
    fallback = raw.get("fallback")
    if not isinstance(fallback, str) or not fallback:
        raise RoutesError(f"{where}: 'fallback' must name a model (e.g. base)")
    default_threshold = _threshold(raw.get("threshold", 0.5), where)
    domains_raw = raw.get("domains")
    if not isinstance(domains_raw, dict) or len(domains_raw) < 2:
        raise RoutesError(f"{where}: 'domains' must map at least two domain names to settings")
    domains = {
        str(n): _domain(str(n), spec, default_threshold, f"{where}: domain {n!r}")
        for n, spec in domains_raw.items()
    }
    catch_all = frozenset(str(d) for d in raw.get("catch_all") or ())
    if unknown := catch_all - set(domains):
        raise RoutesError(f"{where}: catch_all names unknown domains {sorted(unknown)}")
    tenants = {
        str(n): _tenant(spec, domains, f"{where}: tenant {n!r}")
        for n, spec in (raw.get("tenants") or {}).items()
    }
    examples = [Example(t, d.name) for d in domains.values() for t in d.examples]
    base = path.parent if path else Path.cwd()
    for name in raw.get("examples_files") or ():
        examples.extend(read_examples(base / str(name)))
    if bad := sorted({e.label for e in examples} - set(domains)):
        raise RoutesError(f"{where}: examples labelled with unknown domains {bad}")
    return RoutesPolicy(fallback, domains, catch_all, tenants, tuple(examples), path)


def read_examples(path: Path) -> list[Example]:
    """`{"text": ..., "label": ...}` per line; blank lines are skipped."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RoutesError(f"{path}: {exc}") from exc
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(Example(str(row["text"]), str(row["label"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise RoutesError(f"{path}:{i}: expected {{'text', 'label'}} ({exc})") from exc
    return out


def _domain(name: str, spec: Any, default_threshold: float, where: str) -> Domain:
    if not isinstance(spec, dict):
        raise RoutesError(f"{where}: expected a mapping")
    _no_unknown(spec, _DOMAIN_KEYS, where)
    target = spec.get("target")
    if not isinstance(target, str) or not target:
        raise RoutesError(f"{where}: 'target' must name a model")
    return Domain(
        name,
        target,
        _threshold(spec.get("threshold", default_threshold), where),
        _strings(spec.get("keywords"), f"{where}: keywords"),
        _strings(spec.get("examples"), f"{where}: examples"),
    )


def _tenant(spec: Any, domains: Mapping[str, Domain], where: str) -> TenantRoutes:
    if not isinstance(spec, dict):
        raise RoutesError(f"{where}: expected a mapping")
    _no_unknown(spec, _TENANT_KEYS, where)
    overrides = spec.get("domains") or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, str) for v in overrides.values()):
        raise RoutesError(f"{where}: 'domains' must map domain → model name")
    if unknown := set(overrides) - set(domains):
        raise RoutesError(f"{where}: unknown domains {sorted(unknown)}")
    fallback = spec.get("fallback")
    if fallback is not None and not isinstance(fallback, str):
        raise RoutesError(f"{where}: 'fallback' must name a model")
    return TenantRoutes(bool(spec.get("auto", False)), fallback, dict(overrides))


def _threshold(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise RoutesError(f"{where}: threshold must be a number in [0, 1]")
    return float(value)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RoutesError(f"{where}: expected a list of strings")
    return tuple(value)


def _no_unknown(spec: dict[str, Any], allowed: set[str], where: str) -> None:
    if unknown := set(spec) - allowed:
        raise RoutesError(f"{where}: unknown keys {sorted(unknown)}")
