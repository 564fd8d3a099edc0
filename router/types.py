"""Value types shared by classifiers, the routing policy, the gateway glue and the eval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

# Why a decision went to the fallback target (a bounded set: these are metric label values).
FallbackReason = Literal["low_confidence", "catch_all", "not_entitled", "no_text", "unavailable"]
FALLBACK_REASONS: tuple[FallbackReason, ...] = (
    "low_confidence",
    "catch_all",
    "not_entitled",
    "no_text",
    "unavailable",
)


@dataclass(frozen=True, slots=True)
class Prediction:
    """A classifier's raw answer: its best domain (None when it has no evidence at all) and a
    confidence in [0, 1]. Thresholds are applied by the router, not here."""

    domain: str | None
    confidence: float


@dataclass(frozen=True, slots=True)
class Decision:
    """What the router chose for one request.

    `domain` is the classified domain, or None when nothing was close enough (out of scope).
    `target` is the model name to serve with (adapter, alias or base model); `fallback` tells
    whether it is the fallback target rather than the domain's own, and `reason` why.
    """

    domain: str | None
    confidence: float
    classifier: str
    target: str
    fallback: bool
    reason: FallbackReason | None = None


class Classifier(Protocol):
    """Text → Prediction. `blocking` classifiers (embeddings) are run off the event loop."""

    @property
    def name(self) -> str: ...

    @property
    def domains(self) -> tuple[str, ...]: ...

    @property
    def blocking(self) -> bool: ...

    def classify(self, text: str) -> Prediction: ...


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled prompt (training data and eval data share the `{"text", "label"}` form)."""

    text: str
    label: str
