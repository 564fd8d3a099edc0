"""A classifier bound to a routes policy: text → Decision. Also builds the classifier a
setting names, loading a saved artefact when it matches the routes' examples."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from router.keyword import KeywordClassifier
from router.policy import RoutesPolicy
from router.types import Classifier, Decision, Prediction

ClassifierKind = Literal["keyword", "tfidf", "embedding"]
CLASSIFIER_KINDS: tuple[ClassifierKind, ...] = ("keyword", "tfidf", "embedding")
log = logging.getLogger("loraplex.router")


class DomainRouter:
    """Classify, then apply the policy (thresholds, catch-all, tenant overrides, entitlement)."""

    def __init__(self, policy: RoutesPolicy, classifier: Classifier) -> None:
        self.policy = policy
        self.classifier = classifier

    def classify(self, text: str) -> tuple[Prediction, float]:
        """The prediction and the seconds it took."""
        started = time.perf_counter()
        prediction = self.classifier.classify(text)
        return prediction, time.perf_counter() - started

    def decide(
        self,
        prediction: Prediction,
        tenant: str | None = None,
        may_use: Callable[[str], bool] | None = None,
        default: str | None = None,
    ) -> Decision:
        return self.policy.decide(prediction, self.classifier.name, tenant, may_use, default)

    def route(self, text: str) -> Decision:
        """Tenant-less decision (eval, benchmarks)."""
        return self.decide(self.classifier.classify(text))


def build_classifier(
    policy: RoutesPolicy, kind: ClassifierKind, artefact: Path | None = None
) -> Classifier:
    """Build the classifier `kind` for `policy`. Learned kinds load `artefact` if it was fitted
    from exactly these examples and parameters, else fit (and save it there). Fitting imports
    scikit-learn: call this from a worker thread in an event loop."""
    if kind == "keyword":
        return KeywordClassifier(policy.keywords)
    from router.training import TfidfParams, fingerprint, with_keywords

    examples = with_keywords(policy.examples, policy.keywords)
    if kind == "tfidf":
        from dataclasses import asdict

        from router.tfidf import TfidfClassifier
        from router.training import fit_tfidf

        params = TfidfParams()
        wanted = fingerprint(examples, asdict(params))
        if artefact is not None and artefact.exists():
            loaded = TfidfClassifier.load(artefact)
            if loaded.fingerprint == wanted:
                return loaded
            log.info("router artefact %s is stale; refitting", artefact)
        model = fit_tfidf(examples, params)
    elif kind == "embedding":
        from router.embedding import HEAD_C, EmbeddingClassifier

        wanted = fingerprint(examples, {"classifier": "embedding", "c": HEAD_C})
        if artefact is not None and artefact.exists():
            loaded_e = EmbeddingClassifier.load(artefact)
            if loaded_e.fingerprint == wanted:
                return loaded_e
            log.info("router artefact %s is stale; refitting", artefact)
            model_e = EmbeddingClassifier.fit(examples, loaded_e.encoder)
        else:
            model_e = EmbeddingClassifier.fit(examples)
        if artefact is not None:
            model_e.save(artefact)
        return model_e
    else:
        raise ValueError(f"unknown classifier {kind!r}; expected one of {CLASSIFIER_KINDS}")
    if artefact is not None:
        model.save(artefact)
    return model
