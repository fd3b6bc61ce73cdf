"""Selective prediction: answer only when the (calibrated) top-1 confidence reaches a threshold.

``selective_table`` gives, per threshold, the share of images answered (coverage), and the top-1 accuracy and
median error of the answered ones; ``selective_curve`` the same for every possible number answered, most
confident first (the coverage–accuracy and coverage–median-km curves of the report).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def _arrays(confidence, correct, error_km):
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    d = np.asarray(error_km, dtype=np.float64)
    if not (len(conf) == len(ok) == len(d)):
        raise ValueError(f"confidence, correct and error_km differ in length: {len(conf)}, {len(ok)}, {len(d)}")
    return conf, ok, d


def _median(d: np.ndarray) -> float | None:
    """The median error, None when there is none (nothing answered, or no known errors)."""
    return float(np.median(d)) if len(d) and np.isfinite(d).all() else None


def selective_table(confidence, correct, error_km, thresholds: Sequence[float] = THRESHOLDS) -> list[dict]:
    """One row per threshold t: answered = confidence >= t."""
    conf, ok, d = _arrays(confidence, correct, error_km)
    rows = []
    for t in thresholds:
        m = conf >= t
        n = int(m.sum())
        rows.append({"threshold": float(t), "answered": n, "coverage": float(n / len(conf)) if len(conf) else None,
                     "top1_acc": float(ok[m].mean()) if n else None, "median_km": _median(d[m])})
    return rows


def selective_curve(confidence, correct, error_km, points: int = 50) -> dict[str, list[float]]:
    """Coverage, accuracy and median km when answering the ``k`` most confident images, at up to ``points``
    coverages from 1/N to 1 (ties in confidence are answered together)."""
    conf, ok, d = _arrays(confidence, correct, error_km)
    n = len(conf)
    if n == 0:
        return {"coverage": [], "top1_acc": [], "median_km": [], "threshold": []}
    order = np.argsort(-conf, kind="stable")
    ks = np.unique(np.linspace(1, n, min(points, n)).round().astype(int))
    acc = np.cumsum(ok[order]) / np.arange(1, n + 1)
    out: dict[str, list[float]] = {"coverage": [], "top1_acc": [], "median_km": [], "threshold": []}
    for k in ks:
        t = conf[order[k - 1]]
        k = int((conf >= t).sum())  # everything as confident as the k-th is answered too
        out["coverage"].append(k / n)
        out["top1_acc"].append(float(acc[k - 1]))
        out["median_km"].append(float(np.median(d[order[:k]])))
        out["threshold"].append(float(t))
    return out
