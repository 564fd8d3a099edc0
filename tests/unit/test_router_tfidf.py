"""The numpy inference path of the TF-IDF classifier agrees with scikit-learn, round-trips
through its artefact, and a stale artefact is refitted rather than trusted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.sparse import hstack

from router.domain_router import build_classifier
from router.policy import RoutesPolicy, read_examples
from router.tfidf import TfidfClassifier, char_wb_ngrams, word_ngrams
from router.training import TfidfParams, sklearn_tfidf, with_keywords
from router.types import Example
from tests.unit.router_helpers import default_policy, default_tfidf

DATA = Path(__file__).resolve().parents[2] / "router" / "data"
ODD_INPUTS = [
    "",
    "a",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\nand  double  spaces",
    "Ünïcödé naïve café — résumé ✓ 東京 👍",
    "I'm  an   x y z a b",
    "x" * 300,
    "C++ & C# vs. Node.js: 100% (!!)",
    "odd\u00a0spaces\u2003and\x1cseparators\u3000here",
]


@pytest.fixture
def policy() -> RoutesPolicy:
    return default_policy()


@pytest.fixture
def fitted() -> TfidfClassifier:
    return default_tfidf()


def test_analyzers_match_sklearn() -> None:
    word, char = sklearn_tfidf(TfidfParams())
    word_an, char_an = word.build_analyzer(), char.build_analyzer()
    stop = frozenset(word.get_stop_words() or ())
    for text in [*ODD_INPUTS, *(e.text for e in read_examples(DATA / "test.jsonl"))]:
        assert word_ngrams(text.lower(), 1, 2, stop) == word_an(text)
        assert char_wb_ngrams(text.lower(), 3, 5) == char_an(text)


def test_word_cache_changes_nothing_and_stays_bounded(
    fitted: TfidfClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    import router.tfidf

    probe = [*ODD_INPUTS, *(e.text for e in read_examples(DATA / "test.jsonl"))]
    char_block = next(b for b in fitted.blocks if b.analyzer == "char_wb")
    char_block._word_columns.clear()
    cold = [fitted.probabilities(t) for t in probe]
    warm = [fitted.probabilities(t) for t in probe]
    monkeypatch.setattr(router.tfidf, "WORD_CACHE_SIZE", 8)
    char_block._word_columns.clear()
    tiny = [fitted.probabilities(t) for t in probe]  # cleared over and over
    assert len(char_block._word_columns) <= 8
    for a, b, c in zip(cold, warm, tiny, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_probabilities_match_sklearn(policy: RoutesPolicy, fitted: TfidfClassifier) -> None:
    from sklearn.linear_model import LogisticRegression

    examples = with_keywords(policy.examples, policy.keywords)
    word, char = sklearn_tfidf(TfidfParams())
    texts = [e.text for e in examples]
    x = hstack([word.fit_transform(texts), char.fit_transform(texts)]).tocsr()
    params = TfidfParams()
    model = LogisticRegression(
        C=params.c, max_iter=1000, class_weight="balanced", solver="newton-cg"
    ).fit(x, [e.label for e in examples])
    probe = [*ODD_INPUTS, *(e.text for e in read_examples(DATA / "test.jsonl"))]
    expected = model.predict_proba(hstack([word.transform(probe), char.transform(probe)]).tocsr())
    got = np.array([fitted.probabilities(t) for t in probe])
    assert fitted.domains == tuple(model.classes_)
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_artefact_round_trip(fitted: TfidfClassifier, tmp_path: Path) -> None:
    path = tmp_path / "m" / "tfidf.npz"
    fitted.save(path)
    loaded = TfidfClassifier.load(path)
    assert loaded.fingerprint == fitted.fingerprint
    assert loaded.domains == fitted.domains
    for text in ["My chest hurts when I breathe", "transfer 50 euros", *ODD_INPUTS]:
        np.testing.assert_array_equal(loaded.probabilities(text), fitted.probabilities(text))


def test_not_an_artefact_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, header=np.array('{"format": "something-else"}'))
    with pytest.raises(ValueError, match="not a loraplex-router-tfidf"):
        TfidfClassifier.load(path)


def test_build_loads_a_matching_artefact_and_refits_a_stale_one(
    policy: RoutesPolicy, fitted: TfidfClassifier, tmp_path: Path
) -> None:
    path = tmp_path / "tfidf.npz"
    fitted.save(path)
    stamp = path.stat().st_mtime_ns
    loaded = build_classifier(policy, "tfidf", path)
    assert isinstance(loaded, TfidfClassifier)
    assert loaded.fingerprint == fitted.fingerprint
    assert path.stat().st_mtime_ns == stamp  # loaded, not rewritten
    # Same file, different examples: the fingerprint no longer matches → refit and overwrite.
    changed = RoutesPolicy(
        policy.fallback,
        policy.domains,
        policy.catch_all,
        policy.tenants,
        (*policy.examples, Example("what is a deductible on a health plan", "finance")),
    )
    refit = build_classifier(changed, "tfidf", path)
    assert isinstance(refit, TfidfClassifier)
    assert refit.fingerprint != fitted.fingerprint
    assert TfidfClassifier.load(path).fingerprint == refit.fingerprint


def test_classify_is_fast_enough_for_the_request_path(fitted: TfidfClassifier) -> None:
    """A sanity bound, not a benchmark (loadtest/bench/routing.py measures): even a 1000-char
    input (twice the default max_chars) stays in the low milliseconds on a loaded CI machine."""
    text = " ".join(e.text for e in read_examples(DATA / "test.jsonl"))[:1000]
    best = min(_timed(fitted, text) for _ in range(20))
    assert best < 0.01


def _timed(model: TfidfClassifier, text: str) -> float:
    import time

    started = time.perf_counter()
    model.classify(text)
    return time.perf_counter() - started
