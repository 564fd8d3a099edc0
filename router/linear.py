"""A fitted linear model's weights, applied with numpy (no scikit-learn on the request path)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LinearHead:
    """Multinomial logistic regression: `coef` (n_features by n_classes, transposed from
    scikit-learn's layout so a row gather picks one feature's weights) and `intercept`.
    A binary model (one coefficient row in scikit-learn) is stored as two columns [0, z]."""

    domains: tuple[str, ...]
    coef: FloatArray
    intercept: FloatArray

    @classmethod
    def from_sklearn(
        cls, domains: tuple[str, ...], coef: FloatArray, intercept: FloatArray
    ) -> LinearHead:
        coef = np.asarray(coef, dtype=np.float64)
        intercept = np.asarray(intercept, dtype=np.float64)
        if coef.shape[0] == 1:  # binary: P(class 1) = sigmoid(z) = softmax([0, z])[1]
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([np.zeros(1), intercept])
        return cls(domains, np.ascontiguousarray(coef.T), intercept)

    def probabilities(self, logits: FloatArray) -> FloatArray:
        z = logits - logits.max()
        e = np.exp(z)
        out: FloatArray = e / e.sum()
        return out

    def dense_probabilities(self, x: FloatArray) -> FloatArray:
        return self.probabilities(x @ self.coef + self.intercept)
