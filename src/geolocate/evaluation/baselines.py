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
                query_feats: np.ndarray, num_classes: int, k: int = 1, chunk: int = 1024):
    """(scores (N, C), pred_lat, pred_lon)."""
    g = _normalise(train_feats.astype(np.float32))
    n = len(query_feats)
    scores = np.full((n, num_classes), -2.0, dtype=np.float32)
    plat, plon = np.empty(n), np.empty(n)
    for s in range(0, n, chunk):
        sim = _normalise(query_feats[s:s + chunk].astype(np.float32)) @ g.T  # (b, G)
        # best similarity per class
        for c in np.unique(train_labels):
            cols = train_labels == c
            scores[s:s + chunk, c] = sim[:, cols].max(axis=1)
        kk = min(k, sim.shape[1])
        part = np.argpartition(-sim, kth=kk - 1, axis=1)[:, :kk]  # the k best, then in order
        nn_idx = np.take_along_axis(part, np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1), axis=1)
        for r, row in enumerate(nn_idx):
            labs = train_labels[row]
            vals, cnt = np.unique(labs, return_counts=True)
            best = vals[cnt == cnt.max()]
            # tie-break by rank: the first neighbour whose cell is among the most voted
            j = next(j for j in row if train_labels[j] in best)
            plat[s + r], plon[s + r] = train_lat[j], train_lon[j]
            if k > 1:
                scores[s + r, best] += 1.0  # the voted cell ranks first
    return scores, plat, plon
