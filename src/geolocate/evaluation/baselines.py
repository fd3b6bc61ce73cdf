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

import contextlib

import numpy as np


def prior_predict(train_labels: np.ndarray, num_classes: int, n: int, class_lat: np.ndarray, class_lon: np.ndarray):
    freq = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
    freq /= max(freq.sum(), 1)
    top = int(np.argmax(freq))
    return np.tile(freq, (n, 1)), np.full(n, class_lat[top]), np.full(n, class_lon[top])


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


PROGRESS_ROWS = 200_000  # a pass over a gallery at least this large shows a progress bar


def gallery_blocks(feats, max_block_bytes: int, desc: str | None = None):
    """(start, L2-normalised float32 rows) of ``feats`` in blocks of at most ``max_block_bytes``.

    ``feats``: any array-like whose ``feats[a:b]`` is an array: a numpy array, a float16 memory map, or a
    :class:`~geolocate.training.store.FeatureView` of the embedding store; only one block is in memory at a time.
    ``desc``: a progress bar of that name over a large gallery.
    """
    from ..progress import progress_bar

    n, f = len(feats), feats.shape[1]
    rows = max(1, min(n, max_block_bytes // max(4 * f, 1)))
    with progress_bar(desc or "", n) if desc and n >= PROGRESS_ROWS else _no_bar() as advance:
        for s in range(0, n, rows):
            yield s, _normalise(np.asarray(feats[s:s + rows], dtype=np.float32))
            advance(min(rows, n - s))


@contextlib.contextmanager
def _no_bar():
    yield lambda n=1, description=None: None


def merge_top(best_v: np.ndarray, best_i: np.ndarray, v: np.ndarray, i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest values per row of two (values, indices) candidate sets, in order (ties: lower index)."""
    allv, alli = np.concatenate([best_v, v], axis=1), np.concatenate([best_i, i], axis=1)
    order = np.lexsort((alli, -allv), axis=1)[:, :k]
    return np.take_along_axis(allv, order, axis=1), np.take_along_axis(alli, order, axis=1)


def knn_predict(train_feats, train_labels: np.ndarray, train_lat: np.ndarray, train_lon: np.ndarray,
                query_feats: np.ndarray, num_classes: int, k: int = 1, max_block_bytes: int = 256 << 20):
    """(scores (N, C), pred_lat, pred_lon), streamed over both the gallery and the queries.

    The gallery (``train_feats``: an array, a memory map or a store view) is read one block of at most
    ``max_block_bytes`` at a time; inside a block, rows are sorted by class so each query block's best similarity
    per class is one ``np.maximum.reduceat`` over contiguous columns; the k nearest are kept as a running top-k.
    Memory is O(block + queries x (classes + k)), never O(queries x gallery) or O(gallery): a 1M-image gallery
    runs in bounded RAM.
    """
    if k < 1:
        raise ValueError(f"knn k must be >= 1, got {k}")
    labels, lat, lon = np.asarray(train_labels), np.asarray(train_lat), np.asarray(train_lon)
    q = _normalise(np.asarray(query_feats, dtype=np.float32))
    n, G = len(q), len(labels)
    scores = np.full((n, num_classes), -2.0, dtype=np.float32)
    kk = min(k, G)
    best_v = np.full((n, kk), -np.inf, dtype=np.float32)
    best_i = np.full((n, kk), -1, dtype=np.int64)
    for g0, g in gallery_blocks(train_feats, max_block_bytes, desc=f"kNN baseline ({n:,} queries)"):
        order = np.argsort(labels[g0:g0 + len(g)], kind="stable")
        g = g[order]
        present, starts = np.unique(labels[g0:g0 + len(g)][order], return_index=True)
        chunk = max(1, min(n, max_block_bytes // max(4 * len(g), 1)))
        kb = min(kk, len(g))
        for s in range(0, n, chunk):
            sim = q[s:s + chunk] @ g.T  # (b, block)
            sl = scores[s:s + chunk, present]
            scores[s:s + chunk, present] = np.maximum(sl, np.maximum.reduceat(sim, starts, axis=1))
            part = np.argpartition(-sim, kth=kb - 1, axis=1)[:, :kb]
            best_v[s:s + chunk], best_i[s:s + chunk] = merge_top(best_v[s:s + chunk], best_i[s:s + chunk],
                                                                 np.take_along_axis(sim, part, axis=1), g0 + order[part], kk)
    plat, plon = np.empty(n), np.empty(n)
    if kk == 1:
        j = best_i[:, 0]
        return scores, lat[j], lon[j]
    for r, row in enumerate(best_i):
        labs = labels[row]
        vals, cnt = np.unique(labs, return_counts=True)
        best = vals[cnt == cnt.max()]
        # tie-break by rank: the first neighbour whose cell is among the most voted
        j = next(j for j in row if labels[j] in best)
        plat[r], plon[r] = lat[j], lon[j]
        scores[r, best] += 1.0  # the voted cell ranks first
    return scores, plat, plon
