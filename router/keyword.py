"""Keyword classifier: the simplest baseline (counts each domain's keywords in the text).

Kept as the parity baseline the learned classifiers must beat (docs/router.md), and as a
dependency-free fallback classifier.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from router.types import Prediction

_WORD = re.compile(r"[a-z0-9][a-z0-9'+#.-]*")


class KeywordClassifier:
    """Per-domain keywords; `word*` matches any word starting with `word`, and phrases of
    several words match consecutive words. Confidence = the top domain's share of all matches,
    damped when there are few (`1 - 0.5**hits`): one lone hit gives 0.5, a 1-1 tie 0.25."""

    name = "keyword"
    blocking = False

    def __init__(self, keywords: Mapping[str, Sequence[str]]) -> None:
        self._domains = tuple(keywords)
        self._exact: dict[str, list[str]] = {}
        self._prefix: list[tuple[str, str]] = []
        self._phrases: list[tuple[tuple[str, ...], str]] = []
        for domain, words in keywords.items():
            for raw in words:
                parts = tuple(_WORD.findall(raw.lower()))
                if not parts:
                    continue
                if len(parts) > 1:
                    self._phrases.append((parts, domain))
                elif raw.endswith("*"):
                    self._prefix.append((parts[0], domain))
                else:
                    self._exact.setdefault(parts[0], []).append(domain)
        # Prefixes by length: a word is checked with one slice and lookup per distinct length
        # (about ten) instead of one startswith per prefix (over a hundred in the demo routes).
        self._prefix_by_len: dict[int, dict[str, list[str]]] = {}
        for prefix, domain in self._prefix:
            self._prefix_by_len.setdefault(len(prefix), {}).setdefault(prefix, []).append(domain)

    @property
    def domains(self) -> tuple[str, ...]:
        return self._domains

    def hits(self, text: str) -> dict[str, int]:
        """Keyword matches per domain."""
        words = [w.rstrip(".") for w in _WORD.findall(text.lower())]
        counts: dict[str, int] = {}
        exact, by_len = self._exact, self._prefix_by_len
        for w in words:
            for domain in exact.get(w, ()):
                counts[domain] = counts.get(domain, 0) + 1
            for size, prefixes in by_len.items():
                if len(w) >= size:
                    for domain in prefixes.get(w[:size], ()):
                        counts[domain] = counts.get(domain, 0) + 1
        if self._phrases:
            joined = " " + " ".join(words) + " "
            for parts, domain in self._phrases:
                n = joined.count(" " + " ".join(parts) + " ")
                if n:
                    counts[domain] = counts.get(domain, 0) + n
        return counts

    def classify(self, text: str) -> Prediction:
        counts = self.hits(text)
        if not counts:
            return Prediction(None, 0.0)
        best = max(counts, key=lambda d: (counts[d], -self._domains.index(d)))
        top = counts[best]
        share = top / sum(counts.values())
        return Prediction(best, share * (1.0 - 0.5**top))
