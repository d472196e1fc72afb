"""Small linear classifiers in numpy (no scikit-learn): softmax regression and independent
logistic gates, trained full-batch with Adam on standardised features.

Deterministic: zero initialisation and full batches, so the same data gives the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LinearModel:
    """Standardise, then one affine map: logits = ((x - mean) / scale) @ weights + bias."""

    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    weights: np.ndarray  # (d, outputs)
    bias: np.ndarray  # (outputs,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.weights + self.bias

    def softmax(self, x: np.ndarray) -> np.ndarray:
        z = self.logits(x)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def sigmoid(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(self.logits(x), -30, 30)))

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_{k}": getattr(self, k) for k in ("mean", "scale", "weights", "bias")}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> LinearModel:
        return cls(**{k: arrays[f"{prefix}_{k}"] for k in ("mean", "scale", "weights", "bias")})


def _train(x: np.ndarray, targets: np.ndarray, link: str, l2: float, steps: int, lr: float,
           sample_weight: np.ndarray | None) -> LinearModel:
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    z = (x - mean) / scale
    n, d = z.shape
    w = np.zeros((d, targets.shape[1]))
    b = np.zeros(targets.shape[1])
    weight = (np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64))[:, None]
    weight = weight / weight.sum()
    model = LinearModel(mean, scale, w, b)
    m_w = np.zeros_like(w); v_w = np.zeros_like(w); m_b = np.zeros_like(b); v_b = np.zeros_like(b)
    beta1, beta2 = 0.9, 0.999
    for step in range(1, steps + 1):
        logits = z @ w + b
        if link == "softmax":
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
        else:
            p = 1.0 / (1.0 + np.exp(-np.clip(logits, -30, 30)))
        error = (p - targets) * weight  # the gradient of the mean cross-entropy w.r.t. the logits
        grad_w = z.T @ error + l2 * w
        grad_b = error.sum(axis=0)
        for param, grad, m, v in ((w, grad_w, m_w, v_w), (b, grad_b, m_b, v_b)):
            m *= beta1; m += (1 - beta1) * grad
            v *= beta2; v += (1 - beta2) * grad**2
            param -= lr * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + 1e-8)
    return model


def train_softmax(x: np.ndarray, labels: np.ndarray, classes: int, l2: float = 1e-2, steps: int = 300,
                  lr: float = 0.05) -> LinearModel:
    """Multinomial logistic regression: labels are class indices in [0, classes)."""
    targets = np.zeros((len(labels), classes))
    targets[np.arange(len(labels)), labels] = 1.0
    return _train(x, targets, "softmax", l2, steps, lr, None)


def train_logistic(x: np.ndarray, targets: np.ndarray, l2: float = 1e-2, steps: int = 300, lr: float = 0.05,
                   sample_weight: np.ndarray | None = None) -> LinearModel:
    """One independent logistic gate per target column (targets in [0, 1], shape (n, outputs))."""
    return _train(x, np.asarray(targets, dtype=np.float64), "sigmoid", l2, steps, lr, sample_weight)
