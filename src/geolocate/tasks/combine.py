"""Evidence combination: several probability vectors over one label space -> one (the only place this is done).

Used for the views of one sample (N/E/S/W photos of one place), the frames of one sequence, and the
members of an ensemble. Every combiner maps ``probs`` (V, C) and optional non-negative ``weights`` (V,)
to one (C,) distribution (non-negative, sums to 1), in ``probs``' dtype:

- ``mean_prob``: the (weighted) average of the probabilities (PIGEON's 4-view fusion; the ensemble average).
  Computed in float64, so V identical rows give back exactly that row.
- ``sum_logprob``: ``softmax(sum_v w_v * log(max(p_v, floor)) / temperature)``: a product of experts that
  picks the cell every row agrees on, where one confident outlier cannot veto it (the floor) and ``temperature``
  tempers the sharpness that summing many rows brings (``temperature = V`` is the normalised geometric mean).
- ``rank``: reciprocal rank fusion, ``sum_v w_v / (rrf_k + rank_v(c))`` normalised; it ignores how the members'
  probabilities are scaled (its values order the cells; they are not calibrated probabilities).

``combine(name, probs, weights, **params)`` resolves a registered combiner; ``register_combiner`` adds one.
Ensemble weights from each model's validation record are :func:`ensemble_weights`.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

Combiner = Callable[..., np.ndarray]
COMBINERS: dict[str, Combiner] = {}


def register_combiner(name: str) -> Callable[[Combiner], Combiner]:
    def deco(fn: Combiner) -> Combiner:
        if name in COMBINERS:
            raise ValueError(f"combiner {name!r} is already registered")
        COMBINERS[name] = fn
        return fn

    return deco


def get_combiner(name: str) -> Combiner:
    try:
        return COMBINERS[name]
    except KeyError:
        raise ValueError(f"unknown combiner {name!r}: choose one of {', '.join(COMBINERS)}") from None


def combine(name: str, probs, weights=None, **params) -> np.ndarray:
    """(V, C) probabilities (+ optional (V,) weights) -> (C,) with the registered combiner ``name``."""
    fn = get_combiner(name)
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1:
        raise ValueError(f"combine needs a (views, classes) array with at least one row, got shape {p.shape}")
    return fn(p, _weights(weights, p.shape[0]), **params).astype(p.dtype if p.dtype.kind == "f" else np.float64, copy=False)


def _weights(weights, n: int) -> np.ndarray:
    """Normalised weights (sum 1), uniform when None; a bad weight vector is one ValueError line."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, np.float64).reshape(-1)
    if w.shape != (n,):
        raise ValueError(f"{len(w)} weights for {n} probability rows")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w / w.sum()


@register_combiner("mean_prob")
def mean_prob(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, np.float64)
    if np.all(weights == weights[0]):
        return p.sum(0) / len(p)  # exact for identical rows (sums of up to 2**29 equal float32 values are exact)
    return weights @ p


@register_combiner("sum_logprob")
def sum_logprob(probs: np.ndarray, weights: np.ndarray, floor: float = 1e-4, temperature: float = 1.0) -> np.ndarray:
    """``weights`` are normalised (sum 1); they are scaled back to sum V so equal weights are a plain sum."""
    if not (floor > 0) or not (temperature > 0):
        raise ValueError(f"sum_logprob needs floor > 0 and temperature > 0, got floor={floor}, temperature={temperature}")
    logp = np.log(np.maximum(np.asarray(probs, np.float64), floor))
    s = (weights * len(weights)) @ logp / temperature
    e = np.exp(s - s.max())
    return e / e.sum()


@register_combiner("rank")
def rank_fusion(probs: np.ndarray, weights: np.ndarray, rrf_k: float = 60.0) -> np.ndarray:
    p = np.asarray(probs, np.float64)
    order = np.argsort(-p, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, p.shape[1] + 1)[None, :].repeat(len(p), 0), axis=1)
    s = weights @ (1.0 / (rrf_k + ranks))
    return s / s.sum()


def mean_features(feats) -> np.ndarray:
    """(V, F) -> (F,): the features of a multi-view sample or a sequence for the gallery step (exact for identical rows)."""
    f = np.asarray(feats)
    return (np.asarray(f, np.float64).sum(0) / len(f)).astype(f.dtype if f.dtype.kind == "f" else np.float64)


def mean_points(points) -> np.ndarray:
    """(V, 2) lat/lon -> (2,): their mean on the sphere (the head points of several views or frames; exact for identical rows)."""
    p = np.asarray(points, np.float64)
    if len(p) == 1 or np.all(p == p[0]):
        return p[0].copy()
    la, lo = np.radians(p[:, 0]), np.radians(p[:, 1])
    v = np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], 1).mean(0)
    v /= max(np.linalg.norm(v), 1e-12)
    return np.array([np.degrees(np.arcsin(np.clip(v[2], -1, 1))), np.degrees(np.arctan2(v[1], v[0]))])


# ---- ensembles --------------------------------------------------------------------------
ENSEMBLE_METHODS = {
    # name: (combiner, how member weights are derived)
    "average": ("mean_prob", None),
    "val-median": ("mean_prob", "val_median"),
    "val-loss": ("mean_prob", "val_loss"),
    "rank": ("rank", None),
}


def ensemble_weights(metas: Sequence[Mapping], names: Sequence[str], source: str | None) -> np.ndarray | None:
    """Member weights from each model's recorded validation metrics (None: uniform).

    ``val_median``: w ∝ 1 / validation median km; ``val_loss``: w ∝ exp(-validation loss) (a likelihood ratio).
    A member without the needed record is a ValueError naming it.
    """
    if source is None:
        return None
    vals = []
    for meta, name in zip(metas, names):
        val = ((meta or {}).get("metrics") or {}).get("val") or {}
        if source == "val_median":
            v = val.get("median_km")
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"{name}: no validation median_km in its metadata to weight it by (use --ensemble average)")
            vals.append(1.0 / max(float(v), 1e-3))
        elif source == "val_loss":
            v = val.get("loss", (meta or {}).get("best_val_loss"))
            if not isinstance(v, (int, float)) or not np.isfinite(v):
                raise ValueError(f"{name}: no validation loss in its metadata to weight it by (use --ensemble val-median or average)")
            vals.append(-float(v))
        else:
            raise ValueError(f"unknown ensemble weight source {source!r}")
    w = np.asarray(vals)
    if source == "val_loss":
        w = np.exp(w - w.max())
    return w / w.sum()


def same_label_space(classes_a: Sequence[Mapping], classes_b: Sequence[Mapping]) -> str | None:
    """None when both class lists name the same cells in the same order, else why not (one phrase)."""
    if len(classes_a) != len(classes_b):
        return f"{len(classes_a)} vs {len(classes_b)} classes"
    for i, (a, b) in enumerate(zip(classes_a, classes_b)):
        if a.get("cell") != b.get("cell"):
            return f"class {i} is cell {a.get('cell')} vs {b.get('cell')}"
    return None
