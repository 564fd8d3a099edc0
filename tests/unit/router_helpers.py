"""The default routes' TF-IDF model, fitted once per test process (fitting takes seconds)."""

from __future__ import annotations

import functools
from pathlib import Path

from router.policy import RoutesPolicy, load_routes
from router.tfidf import TfidfClassifier
from router.training import fit_tfidf, with_keywords


@functools.cache
def default_policy() -> RoutesPolicy:
    return load_routes()


@functools.cache
def default_tfidf() -> TfidfClassifier:
    policy = default_policy()
    return fit_tfidf(with_keywords(policy.examples, policy.keywords))


def save_default_tfidf(directory: Path) -> Path:
    """The fitted default model as an artefact the gateway will load without refitting."""
    path = directory / "tfidf.npz"
    default_tfidf().save(path)
    return path
