"""Baselines computed on the same split as the model.

- ``prior``: always the most frequent training cell (scores = class frequencies),
  located at that cell's centroid.
- ``knn``: retrieval over the same backbone embeddings, the training set as
  gallery, cosine similarity; the prediction is the nearest neighbour's true
  position (k=1) or the majority cell of the k nearest (located at the best
  matching neighbour of that cell); cell scores rank classes by their nearest
  neighbour's similarity, so top-5 is meaningful.
"""
from __future__ import annotations

import numpy as np


def prior_predict(train_labels: np.ndarray, num_classes: int, n: int, class_lat: np.ndarray, class_lon: np.ndarray):
    freq = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
    freq /= max(freq.sum(), 1)
    top = int(np.argmax(freq))
    return np.tile(freq, (n, 1)), np.full(n, class_lat[top]), np.full(n, class_lon[top])


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(train_feats: np.ndarray, train_labels: np.ndarray, train_lat: np.ndarray, train_lon: np.ndarray,
                query_feats: np.ndarray, num_classes: int, k: int = 1, max_block_bytes: int = 256 << 20):
    """(scores (N, C), pred_lat, pred_lon), streamed: at most ``max_block_bytes`` of similarities at a time.

    The gallery is sorted by class once, so each block's best similarity per class is one
    ``np.maximum.reduceat`` over contiguous columns (no per-class mask); memory is O(block x gallery),
    never O(queries x gallery), so a 1M-image gallery runs in bounded RAM.
    """
    if k < 1:
        raise ValueError(f"knn k must be >= 1, got {k}")
    order = np.argsort(train_labels, kind="stable")
    g = _normalise(train_feats[order].astype(np.float32))
    labels_sorted = np.asarray(train_labels)[order]
    lat_sorted, lon_sorted = np.asarray(train_lat)[order], np.asarray(train_lon)[order]
    present, starts = np.unique(labels_sorted, return_index=True)
    n, G = len(query_feats), len(g)
    scores = np.full((n, num_classes), -2.0, dtype=np.float32)
    plat, plon = np.empty(n), np.empty(n)
    chunk = max(1, min(n, max_block_bytes // max(4 * G, 1)))
    kk = min(k, G)
    for s in range(0, n, chunk):
        sim = _normalise(query_feats[s:s + chunk].astype(np.float32)) @ g.T  # (b, G)
        scores[s:s + chunk, present] = np.maximum.reduceat(sim, starts, axis=1)
        part = np.argpartition(-sim, kth=kk - 1, axis=1)[:, :kk]  # the k best, then in order
        nn_idx = np.take_along_axis(part, np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1, kind="stable"), axis=1)
        if kk == 1:
            j = nn_idx[:, 0]
            plat[s:s + chunk], plon[s:s + chunk] = lat_sorted[j], lon_sorted[j]
            continue
        for r, row in enumerate(nn_idx):
            labs = labels_sorted[row]
            vals, cnt = np.unique(labs, return_counts=True)
            best = vals[cnt == cnt.max()]
            # tie-break by rank: the first neighbour whose cell is among the most voted
            j = next(j for j in row if labels_sorted[j] in best)
            plat[s + r], plon[s + r] = lat_sorted[j], lon_sorted[j]
            scores[s + r, best] += 1.0  # the voted cell ranks first
    return scores, plat, plon
