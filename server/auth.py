"""Tenant and admin authentication: bearer keys → tenant, keys kept only as sha256 digests.

API keys are long random secrets, so an unsalted sha256 is enough to keep them out of config
files and memory dumps; lookups hash the presented key and confirm with `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapters.registry import Quotas, TenantRecord
from adapters.registry_types import QUOTA_FIELDS
from server.errors import AuthenticationFailed, PermissionDenied

BASE_MODEL = "base"


def hash_key(key: str) -> str:
    """The stored form of an API key: lowercase sha256 hex digest."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    key_digests: tuple[str, ...]
    adapters: frozenset[str]  # adapter names (every version of each) and/or the base model
    default: str | None
    quotas: Quotas = field(default_factory=Quotas)

    def may_use(self, adapter: str) -> bool:
        return adapter in self.adapters


class TenantDirectory:
    """Immutable view of the configured tenants, indexed by key digest."""

    def __init__(self, tenants: list[Tenant], admin_digests: tuple[str, ...] = ()) -> None:
        self._by_digest: dict[str, Tenant] = {}
        for t in tenants:
            for d in t.key_digests:
                if d in self._by_digest:
                    raise ValueError(f"tenant key configured twice ({t.name})")
                self._by_digest[d] = t
        self.tenants: dict[str, Tenant] = {t.name: t for t in tenants}
        self.admin_digests = admin_digests
        if set(admin_digests) & set(self._by_digest):
            raise ValueError("the admin key must differ from every tenant key")

    @classmethod
    def from_records(
        cls, records: Iterable[TenantRecord], admin_digests: tuple[str, ...], base_model: str
    ) -> TenantDirectory:
        del base_model  # entitlements name the base model like any adapter
        tenants = [Tenant(r.name, r.key_digests, r.adapters, r.default, r.quotas) for r in records]
        return cls(tenants, admin_digests)

    def authenticate(self, authorization: str | None) -> Tenant:
        digest = _bearer_digest(authorization)
        tenant = self._by_digest.get(digest) if digest else None
        if tenant is None or not any(hmac.compare_digest(digest, d) for d in tenant.key_digests):
            raise AuthenticationFailed("Invalid or missing API key.")
        return tenant

    def authenticate_admin(self, authorization: str | None) -> None:
        digest = _bearer_digest(authorization)
        if digest and any(hmac.compare_digest(digest, d) for d in self.admin_digests):
            return
        if digest and digest in self._by_digest:
            raise PermissionDenied("This key may not use the admin API.")
        raise AuthenticationFailed("Invalid or missing admin key.")


def _bearer_digest(authorization: str | None) -> str:
    if not authorization:
        return ""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return ""
    return hash_key(token)


def read_tenants_file(path: Path | None) -> list[TenantRecord]:
    """The bootstrap tenants file (YAML; format in docs/configuration.md). Its tenants seed the
    registry at start when the registry does not hold them yet; the admin API manages them after."""
    if path is None:
        return []
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with a 'tenants' key")
    tenants_raw = raw.get("tenants") or {}
    if not isinstance(tenants_raw, dict):
        raise ValueError(f"{path}: 'tenants' must map tenant name → settings")
    records = [_parse_tenant(name, spec, path) for name, spec in tenants_raw.items()]
    TenantDirectory.from_records(records, (), "")  # refuses a key configured twice
    return records


def _parse_tenant(name: str, spec: Any, path: Path) -> TenantRecord:
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: tenant {name!r} must be a mapping")
    digests = spec.get("key_sha256", [])
    if isinstance(digests, str):
        digests = [digests]
    digests = [str(d).lower() for d in digests]
    if not digests or any(len(d) != 64 for d in digests):
        raise ValueError(f"{path}: tenant {name!r} needs key_sha256 (one or a list of sha256 hex)")
    adapters = frozenset(str(a) for a in spec.get("adapters", []))
    default = spec.get("default")
    if default is not None and default.partition("@")[0] not in adapters:
        raise ValueError(f"{path}: tenant {name!r} default {default!r} is not in its adapters")
    quotas = _parse_quotas(name, spec, path)
    return TenantRecord(str(name), tuple(digests), adapters, default, quotas)


def _parse_quotas(name: str, spec: dict[str, Any], path: Path) -> Quotas:
    """Quotas of one tenant: known keys only (a typo must not silently mean "unlimited"),
    whole numbers, at least 1 (`max_adapters` may be 0)."""
    q = spec.get("quotas") or {}
    if not isinstance(q, dict):
        raise ValueError(f"{path}: tenant {name!r} quotas must be a mapping")
    unknown = sorted(str(k) for k in set(q) - set(QUOTA_FIELDS))
    if unknown:
        known = ", ".join(QUOTA_FIELDS)
        raise ValueError(f"{path}: tenant {name!r} has unknown quotas {unknown} (known: {known})")
    for key, value in q.items():
        least = 0 if key == "max_adapters" else 1
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            raise ValueError(
                f"{path}: tenant {name!r} quota {key} must be a whole number >= {least}"
            )
    return Quotas.from_dict(q)


def load_tenants(path: Path | None, admin_digests: tuple[str, ...]) -> TenantDirectory:
    """A directory straight from a tenants file (tools, tests; the gateway seeds its registry)."""
    return TenantDirectory.from_records(read_tenants_file(path), admin_digests, "")
