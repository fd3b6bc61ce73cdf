"""Confidence calibration: temperature scaling fit on validation, and the expected calibration error.

``fit_temperature(logits, labels)`` finds T > 0 minimising the validation negative log-likelihood of
``softmax(logits / T)`` (a 1-D convex problem in log T, solved by golden-section search). The head then
divides its last layer by T, so every engine and export gives the calibrated probabilities and the
ranking of cells is unchanged. ``ece`` is the usual 15-bin expected calibration error of the top-1
confidence.
"""
from __future__ import annotations

import numpy as np


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    lp = _log_softmax(np.asarray(logits, np.float64) / temperature)
    return float(-lp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0, iters: int = 60) -> float:
    """The T in [lo, hi] with the lowest NLL on (logits, labels)."""
    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, labels, np.exp(c)), nll(logits, labels, np.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, labels, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, labels, np.exp(d))
    return float(np.exp((a + b) / 2))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence (0..1)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return float(total)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(_log_softmax(np.asarray(logits, np.float64) / temperature))
