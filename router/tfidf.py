"""TF-IDF (word + character n-grams) + logistic regression, the default classifier.

Fitted with scikit-learn (`router.training`), but served by this module with its own analyzers
and a sparse dot product over the fitted vocabulary: scikit-learn takes ~1 s to import and
~0.3 ms per single-string `predict_proba`, this path takes a few µs to a few tens of µs
(docs/router.md). The analyzers replicate scikit-learn's `word` (token pattern
`(?u)\\b\\w\\w+\\b`) and `char_wb` analyzers exactly; tests/unit/test_router_tfidf.py checks
both agree.

A prompt hits a few dozen vocabulary columns. numpy's fixed cost per call (~1 µs each, a dozen
calls per block, and `np.unique`'s sort) dominates at that size, so a block with few columns
is scored in pure Python over precomputed rows (idf times weights per column); numpy takes over for
long inputs, where its per-element speed wins (docs/benchmarks.md, "What was optimised").
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
        out.extend(padded_word_ngrams(word, lo, hi))
    return out


def padded_word_ngrams(word: str, lo: int, hi: int) -> list[str]:
    """`char_wb` n-grams of one word (scikit-learn pads it with a space on each side)."""
    w = f" {word} "
    size = len(w)
    out: list[str] = []
    for n in range(lo, hi + 1):
        if size <= n:  # a short word counts once, as itself
            out.append(w)
            break
        out.extend([w[i : i + n] for i in range(size - n + 1)])
    return out


WORD_CACHE_SIZE = 50_000
# One word's (sum of its columns' weight rows, sum of their idf²); None: no column.
WordSums = tuple[tuple[float, ...] | None, float]
# Above this many n-gram hits in one block, numpy's vectorised path is faster than the pure
# Python one (crossover measured at ~130-160 on the default routes' model, 5 domains).
SPARSE_MAX_COLUMNS = 128


@dataclass
class TfidfBlock:
    """One fitted vectorizer: analyzer, n-gram range, vocabulary (term → global column)."""

    analyzer: str  # "word" | "char_wb"
    ngram_range: tuple[int, int]
    vocab: dict[str, int]
    stop_words: frozenset[str] = frozenset()
    # char_wb n-grams never cross words, so each word's columns are computed once and reused:
    # most words of a prompt were seen before, and a lookup is ~50x cheaper than its n-grams.
    # Bounded (cleared when full), so odd input cannot grow it.
    _word_columns: dict[str, list[int]] = field(default_factory=dict, repr=False)
    # The same per word for the pure-Python scoring: its columns' weight rows summed and their
    # idf² summed (TfidfClassifier._char_logits). Bounded the same way.
    _word_sums: dict[str, WordSums] = field(default_factory=dict, repr=False)

    def columns(self, text: str) -> list[int]:
        """The vocabulary column of every n-gram of `text` that has one (repeats kept)."""
        lo, hi = self.ngram_range
        vocab = self.vocab
        if self.analyzer == "word":
            grams = word_ngrams(text, lo, hi, self.stop_words)
            return [c for c in map(vocab.get, grams) if c is not None]
        out: list[int] = []
        for word in text.split():  # = scikit-learn's whitespace collapsing, then split()
            out.extend(self.word_columns(word))
        return out

    def word_columns(self, word: str) -> list[int]:
        """A char_wb block's columns for one word (cached)."""
        cache = self._word_columns
        cols = cache.get(word)
        if cols is None:
            lo, hi = self.ngram_range
            grams = padded_word_ngrams(word, lo, hi)
            cols = [c for c in map(self.vocab.get, grams) if c is not None]
            if len(cache) >= WORD_CACHE_SIZE:
                cache.clear()
            cache[word] = cols
        return cols

    def clear_caches(self) -> None:
        self._word_columns.clear()
        self._word_sums.clear()


class TfidfClassifier:
    """The default classifier: probabilities of a multinomial logistic regression."""

    name = "tfidf"
    blocking = False

    def __init__(
        self, blocks: list[TfidfBlock], idf: FloatArray, head: LinearHead, meta: dict[str, Any]
    ) -> None:
        self.blocks = blocks
        self.idf = idf
        self.head = head
        self.meta = meta
        # Per column: idf times the column's weight per domain, and idf² (the l2 norm's terms), as
        # Python floats for the pure-Python path. Built once (a few ms for ~16k columns).
        self._rows: list[tuple[float, ...]] = list(map(tuple, (idf[:, None] * head.coef).tolist()))
        self._idf2: list[float] = (idf * idf).tolist()
        self._intercept: list[float] = head.intercept.tolist()

    @property
    def domains(self) -> tuple[str, ...]:
        return self.head.domains

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint", ""))

    def probabilities(self, text: str) -> FloatArray:
        """Per block: sublinear tf times idf over the n-grams found, l2-normalised (as
        scikit-learn's TfidfVectorizer), dotted with the weights; then the softmax."""
        return np.array(self._probabilities(text))

    def classify(self, text: str) -> Prediction:
        probs = self._probabilities(text)
        best = max(range(len(probs)), key=probs.__getitem__)  # the first of ties, as argmax
        return Prediction(self.head.domains[best], probs[best])

    def _probabilities(self, text: str) -> list[float]:
        text = text.lower()
        logits = self._intercept
        for block in self.blocks:
            if block.analyzer == "char_wb":
                logits = self._char_logits(block, text, logits)
                continue
            cols = block.columns(text)
            if not cols:
                continue
            if len(cols) <= SPARSE_MAX_COLUMNS:
                logits = self._sparse_logits(cols, logits)
            else:
                logits = self._dense_logits(cols, logits)
        top = max(logits)
        e = [math.exp(z - top) for z in logits]
        total = sum(e)
        return [x / total for x in e]

    def _sparse_logits(self, cols: list[int], logits: list[float]) -> list[float]:
        """`logits` + this block's contribution, in pure Python. A column seen n times has tf
        1 + ln(n): its row counts once, plus ln(n) times more as an extra row."""
        rows, idf2 = self._rows, self._idf2
        if len(set(cols)) == len(cols):  # the common case: no repeated n-gram
            sq = sum(map(idf2.__getitem__, cols))
            vecs = list(map(rows.__getitem__, cols))
        else:
            counts = Counter(cols)
            sq = sum(map(idf2.__getitem__, counts))
            vecs = list(map(rows.__getitem__, counts))
            for col, n in counts.items():
                if n > 1:
                    extra = math.log(n)  # tf - 1
                    vecs.append(tuple([x * extra for x in rows[col]]))
                    sq += extra * (2.0 + extra) * idf2[col]  # tf² - 1
        inv = 1.0 / math.sqrt(sq)
        return [z + s * inv for z, s in zip(logits, map(sum, zip(*vecs, strict=True)), strict=True)]

    def _char_logits(self, block: TfidfBlock, text: str, logits: list[float]) -> list[float]:
        """`_sparse_logits` for a char_wb block, from per-word sums (cached, as its columns):
        the words' rows and idf² add up to the block's as if every n-gram occurred once; an
        n-gram seen n > 1 times (within a word or across words) is then corrected by
        (tf - n) times its row, tf = 1 + ln(n). Long inputs go to numpy (no sums computed)."""
        words = text.split()
        cols: list[int] = []
        for word in words:
            cols += block.word_columns(word)
        if not cols:
            return logits
        if len(cols) > SPARSE_MAX_COLUMNS:
            return self._dense_logits(cols, logits)
        sums = block._word_sums
        vecs: list[tuple[float, ...]] = []
        sq = 0.0
        for word in words:
            vec, wsq = sums.get(word) or self._word_sums_of(block, word)
            if vec is not None:
                vecs.append(vec)
                sq += wsq
        if len(set(cols)) != len(cols):
            rows, idf2 = self._rows, self._idf2
            for col, n in Counter(cols).items():
                if n > 1:
                    tf = 1.0 + math.log(n)
                    delta = tf - n
                    vecs.append(tuple([x * delta for x in rows[col]]))
                    sq += (tf * tf - n) * idf2[col]
        inv = 1.0 / math.sqrt(sq)
        return [z + s * inv for z, s in zip(logits, map(sum, zip(*vecs, strict=True)), strict=True)]

    def _word_sums_of(self, block: TfidfBlock, word: str) -> WordSums:
        cols = block.word_columns(word)
        entry: WordSums = (None, 0.0)
        if cols:
            rows = map(self._rows.__getitem__, cols)
            vec = tuple(map(sum, zip(*rows, strict=True)))
            entry = (vec, sum(map(self._idf2.__getitem__, cols)))
        sums = block._word_sums
        if len(sums) >= WORD_CACHE_SIZE:
            sums.clear()
        sums[word] = entry
        return entry

    def _dense_logits(self, cols: list[int], logits: list[float]) -> list[float]:
        """The same with numpy, for long inputs."""
        index, counts = np.unique(np.array(cols), return_counts=True)
        w = (1.0 + np.log(counts)) * self.idf[index]
        w /= math.sqrt(float(w @ w))
        contribution: list[float] = (w @ self.head.coef[index]).tolist()
        return [z + c for z, c in zip(logits, contribution, strict=True)]

    def save(self, path: Path) -> None:
        """One `.npz` (no pickle): vocabularies, idf, weights and a JSON header."""
        arrays: dict[str, Any] = {}
        header = dict(self.meta, format=ARTEFACT_FORMAT, domains=list(self.domains), blocks=[])
        for i, b in enumerate(self.blocks):
            terms = sorted(b.vocab, key=b.vocab.__getitem__)
            arrays[f"vocab{i}"] = np.array(terms, dtype=np.str_)
            arrays[f"cols{i}"] = np.array([b.vocab[t] for t in terms], dtype=np.int64)
            spec = {"analyzer": b.analyzer, "ngram_range": list(b.ngram_range)}
            header["blocks"].append(dict(spec, stop_words=sorted(b.stop_words)))
        arrays["idf"] = self.idf
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
                lo, hi = spec["ngram_range"]
                stop = frozenset(spec.get("stop_words", ()))
                blocks.append(TfidfBlock(spec["analyzer"], (lo, hi), vocab, stop))
            head = LinearHead(tuple(header.pop("domains")), data["coef"], data["intercept"])
            idf = np.asarray(data["idf"], dtype=np.float64)
        header.pop("format")
        return cls(blocks, idf, head, header)
