"""Out-of-distribution score on the embedding: the mean cosine distance to the nearest training images.

``knn_distance(gallery, feats, k)`` is ``1 - mean`` of the ``k`` highest cosine similarities between each query
and the (L2-normalised) training gallery; far from every training image means unlike the training data (a
street photo given to an aerial model). The threshold is a high quantile of the validation images' scores
(``eval.ood_quantile``, default 0.99: about 1 % of in-distribution images are flagged); validation images are
not in the gallery, so their scores are honest held-out scores.
"""
from __future__ import annotations

import math

import numpy as np


def normalise(feats: np.ndarray) -> np.ndarray:
    f = np.nan_to_num(np.asarray(feats, dtype=np.float32))
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def knn_distance(gallery: np.ndarray, feats: np.ndarray, k: int = 5, max_block_bytes: int = 64 << 20,
                 normalised: bool = False) -> np.ndarray:
    """(N,) mean cosine distance (0..2) from each row of ``feats`` to its ``k`` nearest rows of ``gallery``
    (rows L2-normalised here, the gallery's only unless ``normalised``; memory O(block x gallery))."""
    g = np.asarray(gallery, dtype=np.float32) if normalised else normalise(gallery)
    q = normalise(feats)
    if len(g) == 0:
        raise ValueError("the OOD gallery is empty: no training embeddings")
    if q.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"features of width {q.shape[-1] if q.ndim else '?'} do not match the gallery's {g.shape[1]}")
    k = max(1, min(int(k), len(g)))
    out = np.empty(len(q), dtype=np.float64)
    step = max(1, max_block_bytes // max(4 * len(g), 1))
    for s in range(0, len(q), step):
        sim = q[s:s + step] @ g.T
        top = np.partition(sim, len(g) - k, axis=1)[:, len(g) - k:]
        out[s:s + step] = 1.0 - top.mean(1)
    return out


def fit_threshold(val_scores: np.ndarray, quantile: float = 0.99) -> float:
    """The ``quantile`` of the validation scores (the higher order statistic: no interpolation above the data)."""
    if not (0.0 < quantile <= 1.0) or not math.isfinite(quantile):
        raise ValueError(f"eval.ood_quantile must be in (0, 1], got {quantile!r}")
    s = np.asarray(val_scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("no validation scores to fit the OOD threshold on")
    return float(np.quantile(s, quantile, method="higher"))
