"""TF-IDF (word + character n-grams) + logistic regression, the default classifier.

Fitted with scikit-learn (`router.training`), but served by this module with its own analyzers
and a numpy dot product over the fitted vocabulary: scikit-learn takes ~1 s to import and
~0.3 ms per single-string `predict_proba`, this path takes a few tens of µs (docs/router.md).
The analyzers replicate scikit-learn's `word` (token pattern `(?u)\\b\\w\\w+\\b`) and
`char_wb` analyzers exactly; tests/unit/test_router_tfidf.py checks both agree.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from router.linear import FloatArray, LinearHead
from router.types import Prediction

_TOKEN = re.compile(r"(?u)\b\w\w+\b")
_SPACES = re.compile(r"\s\s+")
ARTEFACT_FORMAT = "loraplex-router-tfidf/1"


def word_ngrams(text: str, lo: int, hi: int, stop_words: frozenset[str] = frozenset()) -> list[str]:
    """scikit-learn's word analyzer on lowercased text (stop words dropped before n-grams)."""
    tokens = [t for t in _TOKEN.findall(text) if t not in stop_words]
    out = list(tokens) if lo == 1 else []
    for n in range(max(lo, 2), min(hi, len(tokens)) + 1):
        out.extend(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return out


def char_wb_ngrams(text: str, lo: int, hi: int) -> list[str]:
    """scikit-learn's `char_wb` analyzer on lowercased text (n-grams inside padded words)."""
    out: list[str] = []
    for word in _SPACES.sub(" ", text).split():
        w = f" {word} "
        size = len(w)
        for n in range(lo, hi + 1):
            if size <= n:  # a short word counts once, as itself
                out.append(w)
                break
            out.extend(w[i : i + n] for i in range(size - n + 1))
    return out


def char_wb_candidates(text: str, lo: int, hi: int) -> list[str]:
    """A superset of `char_wb_ngrams` (same counts for every gram it yields) that is 3x faster:
    slide over the words joined by two spaces. A gram that straddles two words contains an
    inner space, which no `char_wb` gram has, so vocabulary lookups drop it. Exact for lo <= 3
    (the shortest padded word has 3 characters, so no word is shorter than the smallest n)."""
    if lo > 3:
        return char_wb_ngrams(text, lo, hi)
    s = " " + "  ".join(_SPACES.sub(" ", text).split()) + " "
    out: list[str] = []
    for n in range(lo, hi + 1):
        out.extend([s[i : i + n] for i in range(len(s) - n + 1)])
    return out


@dataclass
class TfidfBlock:
    """One fitted vectorizer: vocabulary (term → global column), idf, n-gram range."""

    analyzer: str  # "word" | "char_wb"
    ngram_range: tuple[int, int]
    vocab: dict[str, int]
    idf: dict[int, float] = field(default_factory=dict)
    stop_words: frozenset[str] = frozenset()

    def features(self, text: str, index: list[int], weights: list[float]) -> None:
        """Append this block's sublinear tf times idf features, l2-normalised, for `text`."""
        lo, hi = self.ngram_range
        if self.analyzer == "word":
            grams = word_ngrams(text, lo, hi, self.stop_words)
        else:
            grams = char_wb_candidates(text, lo, hi)
        vocab = self.vocab
        idf = self.idf
        cols: list[int] = []
        vals: list[float] = []
        for gram, count in Counter(grams).items():  # C-speed counting, one lookup per gram
            col = vocab.get(gram)
            if col is not None:
                cols.append(col)
                vals.append((1.0 + math.log(count)) * idf[col] if count > 1 else idf[col])
        if not cols:
            return
        norm = math.sqrt(math.fsum(v * v for v in vals))
        index.extend(cols)
        weights.extend(v / norm for v in vals)


class TfidfClassifier:
    """The default classifier: probabilities of a multinomial logistic regression."""

    name = "tfidf"
    blocking = False

    def __init__(self, blocks: list[TfidfBlock], head: LinearHead, meta: dict[str, Any]) -> None:
        self.blocks = blocks
        self.head = head
        self.meta = meta

    @property
    def domains(self) -> tuple[str, ...]:
        return self.head.domains

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint", ""))

    def probabilities(self, text: str) -> FloatArray:
        text = text.lower()
        index: list[int] = []
        weights: list[float] = []
        for block in self.blocks:
            block.features(text, index, weights)
        return self.head.sparse_probabilities(index, weights)

    def classify(self, text: str) -> Prediction:
        probs = self.probabilities(text)
        best = int(probs.argmax())
        return Prediction(self.head.domains[best], float(probs[best]))

    def save(self, path: Path) -> None:
        """One `.npz` (no pickle): vocabularies, idf, weights and a JSON header."""
        arrays: dict[str, Any] = {}
        header = dict(self.meta, format=ARTEFACT_FORMAT, domains=list(self.domains), blocks=[])
        for i, b in enumerate(self.blocks):
            terms = sorted(b.vocab, key=b.vocab.__getitem__)
            arrays[f"vocab{i}"] = np.array(terms, dtype=np.str_)
            arrays[f"cols{i}"] = np.array([b.vocab[t] for t in terms], dtype=np.int64)
            arrays[f"idf{i}"] = np.array([b.idf[b.vocab[t]] for t in terms], dtype=np.float64)
            spec = {"analyzer": b.analyzer, "ngram_range": list(b.ngram_range)}
            header["blocks"].append(dict(spec, stop_words=sorted(b.stop_words)))
        arrays["coef"] = self.head.coef
        arrays["intercept"] = self.head.intercept
        arrays["header"] = np.array(json.dumps(header))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> TfidfClassifier:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            if header.get("format") != ARTEFACT_FORMAT:
                raise ValueError(f"{path}: not a {ARTEFACT_FORMAT} artefact")
            blocks = []
            for i, spec in enumerate(header.pop("blocks")):
                cols = data[f"cols{i}"].tolist()
                vocab = dict(zip(data[f"vocab{i}"].tolist(), cols, strict=True))
                idf = dict(zip(cols, data[f"idf{i}"].tolist(), strict=True))
                lo, hi = spec["ngram_range"]
                stop = frozenset(spec.get("stop_words", ()))
                blocks.append(TfidfBlock(spec["analyzer"], (lo, hi), vocab, idf, stop))
            head = LinearHead(tuple(header.pop("domains")), data["coef"], data["intercept"])
        header.pop("format")
        return cls(blocks, head, header)
