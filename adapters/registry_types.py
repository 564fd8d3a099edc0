"""Registry value types: what the store returns, what the request path reads (a `Snapshot`),
and the registry's errors. Kept apart from the SQL so readers need no database imports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapters.types import DEFAULT_ALIAS, AdapterRef, AdapterVersion
from server.errors import Conflict, LoraplexError, NotFound


class VersionNotFound(NotFound):
    code = "adapter_not_found"


class VersionInUse(Conflict):
    code = "version_in_use"


class InvalidTransition(Conflict):
    code = "invalid_state_transition"


class TenantNotFound(NotFound):
    code = "tenant_not_found"


class TenantExists(Conflict):
    code = "tenant_exists"


class ExperimentNotFound(NotFound):
    code = "experiment_not_found"


class ExperimentExists(Conflict):
    code = "experiment_exists"


class RegistryUnavailable(LoraplexError):
    """The registry database cannot be reached (stopped, unreachable, locked) right now.
    Requests keep being served from the in-memory snapshot; mutations and reads that need
    the database answer 503 until it is back."""

    status = 503
    code = "registry_unavailable"
    type = "server_error"

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asked for a mutation (audit): the admin key's id, an optional human name."""

    name: str
    request_id: str | None = None


SYSTEM = Actor("system")


@dataclass(frozen=True, slots=True)
class Quotas:
    """Per-tenant limits (None: unlimited), stored as the tenant row's JSON `quotas` column, so
    a new key needs no migration. Enforced by `server.quotas`; docs/configuration.md."""

    max_adapters: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    # Requests of the tenant in flight at once (a stream counts until it ends).
    max_concurrent: int | None = None
    # Caps on a generation request's fields; a request over a cap is refused (400).
    max_tokens: int | None = None
    max_n: int | None = None
    max_best_of: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in QUOTA_FIELDS}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> Quotas:
        """From a stored or configured mapping; unknown keys are ignored (a newer replica may
        have written them), missing ones are unlimited."""
        raw = raw or {}
        return cls(**{n: None if raw.get(n) is None else int(raw[n]) for n in QUOTA_FIELDS})


QUOTA_FIELDS = (
    "max_adapters",
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent",
    "max_tokens",
    "max_n",
    "max_best_of",
)


@dataclass(frozen=True, slots=True)
class TenantRecord:
    name: str
    key_digests: tuple[str, ...]
    adapters: frozenset[str]
    default: str | None = None
    quotas: Quotas = field(default_factory=Quotas)

    def as_audit(self) -> dict[str, Any]:
        """Audit view: key digests shortened (they identify keys, they are not secrets to log)."""
        return {
            "keys": [d[:12] for d in self.key_digests],
            "adapters": sorted(self.adapters),
            "default": self.default,
            "quotas": self.quotas.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    target: str
    before: Any
    after: Any
    request_id: str | None


@dataclass(frozen=True, slots=True)
class NewVersion:
    """What registration knows about a version before the registry numbers it."""

    digest: str
    base_digest: str | None
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    source_uri: str
    path: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExperimentRecord:
    """An experiment as stored: `definition` (variants, shadow, ramp, guardrails) is parsed by
    `router.experiments`; `weights` is the live traffic share per variant name."""

    name: str
    target: str
    definition: Mapping[str, Any]
    status: str
    weights: Mapping[str, float]
    ramp_step: int
    step_started_at: float
    reason: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    def as_audit(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "status": self.status,
            "weights": dict(self.weights),
            "ramp_step": self.ramp_step,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable view of the registry; the request path resolves names against it."""

    generation: int = -1
    versions: Mapping[tuple[str, int], AdapterVersion] = field(default_factory=dict)
    aliases: Mapping[tuple[str, str], int] = field(default_factory=dict)
    tenants: Mapping[str, TenantRecord] = field(default_factory=dict)
    experiments: Mapping[str, ExperimentRecord] = field(default_factory=dict)

    def resolve(self, ref: AdapterRef) -> AdapterVersion | None:
        """The version a reference means now: explicit number, alias, or the `stable` alias."""
        if ref.version is not None:
            return self.versions.get((ref.name, ref.version))
        number = self.aliases.get((ref.name, ref.alias or DEFAULT_ALIAS))
        return None if number is None else self.versions.get((ref.name, number))

    def names(self) -> list[str]:
        return sorted({name for name, _ in self.versions})

    def versions_of(self, name: str) -> list[AdapterVersion]:
        return sorted(
            (v for (n, _), v in self.versions.items() if n == name), key=lambda v: v.version
        )

    def aliases_of(self, name: str) -> dict[str, int]:
        return {a: v for (n, a), v in sorted(self.aliases.items()) if n == name}

    def aliases_pointing_at(self, name: str, version: int) -> list[str]:
        return [a for (n, a), v in sorted(self.aliases.items()) if n == name and v == version]
