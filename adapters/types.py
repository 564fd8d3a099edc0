"""Value types shared by the registry, the residency manager and the gateway.

A model name as clients write it (`medical`, `medical@3`, `medical@canary`) is an `AdapterRef`;
the registry resolves it to one immutable `AdapterVersion`. Each version is registered on the
engine under its own `served_name`, so moving an alias never changes what a name means to vLLM.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,31}$")
DEFAULT_ALIAS = "stable"


class VersionState(enum.StrEnum):
    """Lifecycle: registered → validated → ready, or → rejected; ready → retired."""

    REGISTERED = "registered"
    VALIDATED = "validated"
    READY = "ready"
    REJECTED = "rejected"
    RETIRED = "retired"


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """A parsed model name: `name`, `name@<version number>` or `name@<alias>`."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str) -> AdapterRef | None:
        """None when `text` cannot name an adapter (the caller answers model_not_found)."""
        name, sep, tag = text.partition("@")
        if not NAME_RE.match(name):
            return None
        if not sep:
            return cls(name)
        if tag.isdigit() and len(tag) <= 9:
            return cls(name, version=int(tag))
        if ALIAS_RE.match(tag):
            return cls(name, alias=tag)
        return None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}@{self.alias}" if self.alias else self.name


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    """One immutable registered version of an adapter (a registry row, detached)."""

    name: str
    version: int
    digest: str
    base_digest: str | None
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    source_uri: str
    path: str
    state: VersionState
    created_at: float
    state_reason: str | None = None
    pinned: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """What clients see in `X-Loraplex-Adapter`: `name@version`."""
        return f"{self.name}@{self.version}"

    @property
    def served_name(self) -> str:
        """The engine-side name: unique per content, so a reload never serves stale state."""
        return f"{self.name}@{self.version}-{self.digest.removeprefix('sha256:')[:10]}"

    @property
    def routable(self) -> bool:
        return self.state is VersionState.READY
