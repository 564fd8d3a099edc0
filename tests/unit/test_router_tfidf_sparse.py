"""The TF-IDF classifier's pure-Python scoring (prompt-sized inputs) agrees with the numpy
path (long inputs) and with a plain numpy reference, repeated n-grams included, and its
per-word caches change no result and stay bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import router.tfidf
from router.linear import FloatArray
from router.policy import read_examples
from router.tfidf import SPARSE_MAX_COLUMNS, TfidfClassifier
from tests.unit.router_helpers import default_tfidf

DATA = Path(__file__).resolve().parents[2] / "router" / "data"
REPEATS = [
    "the the the the",
    "aaaaaaa bbbbbbb aaaaaaa",
    "contract contract law lawyer lawyers",
    "x" * 300,
    "hi",
    "",
]


def _probe() -> list[str]:
    texts = [e.text for e in read_examples(DATA / "test.jsonl")]
    joined = " ".join(texts)
    # Around the pure-Python / numpy switch too (SPARSE_MAX_COLUMNS n-gram hits per block).
    cuts = [joined[i : i + n] for i in range(0, 2000, 97) for n in (30, 60, 90, 120, 500)]
    return [*texts[:80], *cuts, *REPEATS]


def _reference(model: TfidfClassifier, text: str) -> FloatArray:
    """scikit-learn's transform + predict_proba, written out with numpy on every block."""
    text = text.lower()
    logits = model.head.intercept.copy()
    for block in model.blocks:
        cols = block.columns(text)
        if cols:
            index, counts = np.unique(np.array(cols), return_counts=True)
            w = (1.0 + np.log(counts)) * model.idf[index]
            w /= np.sqrt(w @ w)
            logits += w @ model.head.coef[index]
    return model.head.probabilities(logits)


def test_both_paths_agree_with_the_reference() -> None:
    model = default_tfidf()
    sizes = set()
    for text in _probe():
        sizes.add(len(model.blocks[1].columns(text.lower())) > SPARSE_MAX_COLUMNS)
        np.testing.assert_allclose(
            model.probabilities(text), _reference(model, text), rtol=0, atol=1e-12
        )
        prediction = model.classify(text)
        probs = _reference(model, text)
        assert prediction.domain == model.domains[int(probs.argmax())]
        assert prediction.confidence == pytest.approx(float(probs.max()), abs=1e-12)
    assert sizes == {False, True}  # both paths were exercised


def test_word_caches_change_nothing_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    model = default_tfidf()
    block = next(b for b in model.blocks if b.analyzer == "char_wb")
    probe = _probe()
    block.clear_caches()
    cold = [model.probabilities(t) for t in probe]
    warm = [model.probabilities(t) for t in probe]
    monkeypatch.setattr(router.tfidf, "WORD_CACHE_SIZE", 8)
    block.clear_caches()
    tiny = [model.probabilities(t) for t in probe]  # cleared over and over
    assert len(block._word_columns) <= 8
    assert len(block._word_sums) <= 8
    for a, b, c in zip(cold, warm, tiny, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
