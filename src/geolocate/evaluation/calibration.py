"""Confidence calibration: temperature scaling fit on validation, and the expected calibration error.

``fit_temperature(logits, labels, objective)`` finds T > 0 minimising, on validation, either the negative
log-likelihood of ``softmax(logits / T)`` (``nll``) or the binary likelihood of its top-1 confidence (``top1``:
what ECE measures); a 1-D problem in log T, bracketed by a scan and refined by golden-section search. The head keeps
T in its temperature buffer, so every engine and export gives the calibrated probabilities and the
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


def top1_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Binary cross-entropy of the top-1 confidence against "the top-1 cell is right" (what ECE and the
    reliability diagram measure; the argmax, hence the right/wrong outcome, does not depend on T)."""
    lp = _log_softmax(np.asarray(logits, np.float64) / temperature)
    conf = np.clip(np.exp(lp.max(1)), 1e-12, 1 - 1e-12)
    right = lp.argmax(1) == np.asarray(labels)
    return float(-np.mean(np.where(right, np.log(conf), np.log1p(-conf))))


OBJECTIVES = {"nll": nll, "top1": top1_nll}


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0, iters: int = 60,
                    objective: str = "nll") -> float:
    """The T in [lo, hi] with the lowest ``objective`` on (logits, labels): ``nll`` (the likelihood of the true
    cell: calibrates the whole distribution) or ``top1`` (the binary likelihood of the top-1 confidence:
    calibrates the confidence the answer reports). A coarse log-spaced scan brackets the minimum, then a
    golden-section search refines it (the objectives are smooth in log T but need not be convex)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"calibration objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    f = lambda log_t: OBJECTIVES[objective](logits, labels, float(np.exp(log_t)))  # noqa: E731
    grid = np.linspace(np.log(lo), np.log(hi), 25)
    i = int(np.argmin([f(x) for x in grid]))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return float(np.exp((a + b) / 2))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence (0..1)."""
    return confidence_ece(probs.max(axis=1), probs.argmax(axis=1) == labels, bins)


def ece_floor(probs: np.ndarray, bins: int = 15, draws: int = 200, seed: int = 0) -> float:
    """The ECE a **perfectly calibrated** model would still show on these rows: the mean ECE when each row's
    top-1 answer is right with exactly its confidence (``draws`` simulations). On a few hundred images it is
    several points, so an ECE is only meaningful next to it."""
    conf = np.asarray(probs, np.float64).max(axis=1)
    if conf.size == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    return float(np.mean([confidence_ece(conf, rng.random(conf.size) < conf, bins) for _ in range(draws)]))


def confidence_ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE of confidences ``conf`` (N,) against outcomes ``correct`` (N,) booleans."""
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, bool)
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
