"""PIGEON-style refinement: answer with a training location inside the top-k cells, not a cell's anchor.

A :class:`Gallery` holds the L2-normalised training embeddings (float16), their coordinates and
classes; it is written beside the model file and pinned by sha256 in the model's metadata. For a
query with cell probabilities ``p`` and embedding ``q``, every gallery item ``g`` whose class is
among the query's ``top_k`` cells scores ``log p(class_g) + cos(q, g) / temperature``; the answer is
the best item's location, or, with ``neighbours > 1``, the softmax-weighted spherical mean of the
best few. A query with no gallery item in its top cells keeps the top-1 cell's anchor.
``top_k`` and ``temperature`` are chosen on the validation split (never test) by the experiment.
"""
from __future__ import annotations

import dataclasses as dc
import hashlib
from pathlib import Path

import numpy as np

from ..io import atomic_write, file_sha256

FORMAT = "geolocate-gallery/1"


class GalleryError(ValueError):
    """A gallery file that is missing, truncated, altered, or belongs to another model."""


@dc.dataclass(frozen=True)
class RefineParams:
    top_k: int = 5
    temperature: float = 0.05
    neighbours: int = 1

    def to_dict(self) -> dict:
        return dc.asdict(self)


@dc.dataclass
class Gallery:
    feats: np.ndarray   # (N, F) float16, rows L2-normalised
    lat: np.ndarray     # (N,) float64 degrees
    lon: np.ndarray
    labels: np.ndarray  # (N,) int32 class index
    features: str       # the backbone feature space (Backbone.cache_name)
    num_classes: int
    places: np.ndarray | None = None  # (N,) str: place name of each item ("near Lund, SE"), looked up at build time

    @classmethod
    def build(cls, feats, lat, lon, labels, features: str, num_classes: int, places=None,
              max_block_bytes: int = 256 << 20) -> "Gallery":
        """From features (an array, a memory map or a store view: normalised one block at a time into float16)."""
        from ..evaluation.baselines import gallery_blocks

        out = np.empty((len(feats), feats.shape[1]), np.float16)
        for s, block in gallery_blocks(feats, max_block_bytes, desc="gallery"):
            out[s:s + len(block)] = block
        return cls(out, np.asarray(lat, np.float64), np.asarray(lon, np.float64),
                   np.asarray(labels, np.int32), features, int(num_classes),
                   None if places is None else np.asarray(places, dtype=str))

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: str | Path) -> str:
        """Write atomically; return the file's sha256 (to pin in the model's metadata)."""
        def w(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                extra = {} if self.places is None else {"places": self.places}
                np.savez(fh, format=np.asarray(FORMAT), feats=self.feats, lat=self.lat, lon=self.lon, labels=self.labels,
                         features=np.asarray(self.features), num_classes=np.asarray(self.num_classes), **extra)

        atomic_write(path, w, suffix=".npz")
        return file_sha256(path)

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None, features: str | None = None,
             num_classes: int | None = None) -> "Gallery":
        """Load and check it is the gallery the model expects; any problem is one :class:`GalleryError` line."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise GalleryError(f"gallery {path}: cannot be read ({e.strerror or e})") from None
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise GalleryError(f"gallery {path}: sha256 does not match the model's record (truncated, altered or another model's)")
        try:
            import io

            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                if str(z["format"]) != FORMAT:
                    raise GalleryError(f"gallery {path}: format {str(z['format'])!r}, expected {FORMAT}")
                g = cls(z["feats"], z["lat"], z["lon"], z["labels"], str(z["features"]), int(z["num_classes"]),
                        z["places"] if "places" in z.files else None)
        except GalleryError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise GalleryError(f"gallery {path}: not a readable gallery ({type(e).__name__}: {e})") from None
        if features is not None and g.features != features:
            raise GalleryError(f"gallery {path}: features of {g.features!r}, but the model uses {features!r}")
        if num_classes is not None and g.num_classes != num_classes:
            raise GalleryError(f"gallery {path}: {g.num_classes} classes, but the model has {num_classes}")
        if not (len(g.feats) == len(g.lat) == len(g.lon) == len(g.labels)) or (len(g.labels) and g.labels.max() >= g.num_classes):
            raise GalleryError(f"gallery {path}: inconsistent arrays")
        return g


@dc.dataclass
class Candidates:
    """What refinement reads of the gallery for each query, for any ``top_k <= k`` and ``neighbours <= m``: its
    ``k`` most probable cells (most probable first, ties: the lower class) and, in each, its ``m`` most similar
    items. One search gives every grid point :func:`choose_params` tries."""
    top: np.ndarray   # (n, k) class indices
    logp: np.ndarray  # (n, k) float64 log-probabilities of those cells (clipped at 1e-12)
    cos: np.ndarray   # (n, k, m) float32 cosine similarities, most similar first; -inf where a cell has fewer items
    idx: np.ndarray   # (n, k, m) int64 gallery indices, -1 there

    @property
    def k(self) -> int:
        return self.top.shape[1]

    @property
    def m(self) -> int:
        return self.cos.shape[2]


def top_cells(probs: np.ndarray, k: int, rows: int = 8192) -> np.ndarray:
    """(n, k) each row's ``k`` most probable classes, most probable first, ties broken by the lower class, exactly
    (also where ties straddle the k-th place): so the first ``j`` columns are the top ``j`` for every ``j <= k``.
    A partition per row, ``rows`` rows at a time (never a full sort of every class)."""
    probs = np.asarray(probs)
    n, c = probs.shape
    k = max(1, min(int(k), c))
    out = np.empty((n, k), np.int64)
    for s in range(0, n, rows):
        p = probs[s:s + rows]
        kth = -np.partition(-p, k - 1, axis=1)[:, k - 1:k]            # the k-th largest value of each row
        greater, equal = p > kth, p == kth
        need = k - greater.sum(1, keepdims=True)                        # places left for the values equal to it
        mask = greater | (equal & (np.cumsum(equal, axis=1) <= need))   # ... taken by the lowest classes
        idx = np.nonzero(mask)[1].reshape(len(p), k)                     # exactly k per row, in class order
        order = np.lexsort((idx, -np.take_along_axis(p, idx, 1)), axis=1)
        out[s:s + rows] = np.take_along_axis(idx, order, 1)
    return out


def candidates(gallery: Gallery, query_feats: np.ndarray, probs: np.ndarray, k: int, m: int,
               max_block_bytes: int = 128 << 20) -> Candidates:
    """The :class:`Candidates` of ``query_feats`` (cell probabilities ``probs``): their top ``k`` cells
    (:func:`top_cells`) searched for the ``m`` most similar items each (:func:`best_in_cells`)."""
    top = top_cells(probs, k)
    logp = np.log(np.clip(np.take_along_axis(np.asarray(probs, np.float64), top, 1), 1e-12, None))
    return Candidates(top, logp, *best_in_cells(gallery, query_feats, top, m, max_block_bytes))


def best_in_cells(gallery: Gallery, query_feats: np.ndarray, top: np.ndarray, m: int = 1,
                  max_block_bytes: int = 128 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(cos (n, k, m) float32, most similar first, -inf where a cell has fewer items; their gallery indices, -1
    there): each query's ``m`` most similar gallery items in each of its cells ``top`` (n, k).

    Searched cell by cell (:func:`cell_blocks`): the queries that name cell ``c`` against the items of ``c`` only,
    with a running best ``m`` per (query, cell). That is ``k / cells`` of a dense search's work and memory, and a
    1M-item gallery needs no float32 copy. Refinement and feature reranking both search this way."""
    from ..evaluation.baselines import merge_top

    n, k = top.shape
    m = max(1, min(int(m), max(len(gallery), 1)))
    q = normalised(np.nan_to_num(query_feats))
    cos = np.full((n, k, m), -np.inf, np.float32)
    idx = np.full((n, k, m), -1, np.int64)
    for _c, qq, slots, gidx, g in cell_blocks(gallery, top, max_block_bytes):
        sim = q[qq] @ g.T                                                   # (b, items of c in this block)
        mb = min(m, len(gidx))
        part = np.argpartition(-sim, mb - 1, axis=1)[:, :mb]
        cos[qq, slots], idx[qq, slots] = merge_top(cos[qq, slots], idx[qq, slots], np.take_along_axis(sim, part, axis=1),
                                                   gidx[part], m)
    return cos, idx


def refine(gallery: Gallery, query_feats: np.ndarray, probs: np.ndarray, params: RefineParams = RefineParams(),
           anchor_lat: np.ndarray | None = None, anchor_lon: np.ndarray | None = None,
           max_block_bytes: int = 128 << 20, fallback: tuple[np.ndarray, np.ndarray] | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lat, lon, gallery index or -1) per query; -1 where no gallery item lies in the top cells, and the query
    keeps its ``fallback`` point (the head's own answer, per query) or else the anchor of its top-1 cell.

    Only the items of a query's top cells can win, so the search runs cell by cell (:func:`candidates`).
    """
    cands = candidates(gallery, query_feats, probs, params.top_k, params.neighbours, max_block_bytes)
    return refine_from(gallery, cands, params, probs, anchor_lat, anchor_lon, fallback)


def refine_from(gallery: Gallery, cands: Candidates, params: RefineParams, probs: np.ndarray,
                anchor_lat: np.ndarray | None = None, anchor_lon: np.ndarray | None = None,
                fallback: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`refine`'s answer from searched :class:`Candidates` (of at least ``params.top_k`` cells and
    ``params.neighbours`` items each): every item of the top cells scores ``log p(cell) + cos / temperature``."""
    k, m = min(params.top_k, probs.shape[1]), max(1, min(params.neighbours, len(gallery)))  # as best_in_cells keeps
    if k > cands.k or m > cands.m:
        raise ValueError(f"refinement with top_k {k}, neighbours {m} from candidates of {cands.k} cells, {cands.m} items")
    n = len(cands.top)
    score = (cands.logp[:, :k, None] + cands.cos[:, :k, :m] / params.temperature).reshape(n, k * m)
    gidx = cands.idx[:, :k, :m].reshape(n, k * m)
    order = np.lexsort((gidx, -score), axis=1)[:, :m]                  # best first; ties: the lower gallery index
    best_s, best_i = np.take_along_axis(score, order, 1), np.take_along_axis(gidx, order, 1)
    out_lat, out_lon = np.full(n, np.nan), np.full(n, np.nan)
    out_idx = np.full(n, -1, dtype=np.int64)
    ok = np.isfinite(best_s[:, 0])
    best = best_i[:, 0]
    if params.neighbours <= 1:
        out_lat[ok], out_lon[ok] = gallery.lat[best[ok]], gallery.lon[best[ok]]
    elif ok.any():
        sc, idx = best_s[ok], best_i[ok]
        w = np.where(np.isfinite(sc), np.exp(sc - sc[:, :1]), 0.0)
        v = (w[..., None] * _to_xyz(gallery.lat[np.maximum(idx, 0)], gallery.lon[np.maximum(idx, 0)])).sum(1)
        out_lat[ok], out_lon[ok] = _to_latlon(v)
    out_idx[ok] = best[ok]
    missing = np.isnan(out_lat)
    if missing.any() and fallback is not None:
        out_lat[missing], out_lon[missing] = np.asarray(fallback[0])[missing], np.asarray(fallback[1])[missing]
    elif missing.any():
        if anchor_lat is None or anchor_lon is None:
            raise ValueError("some queries have no gallery item in their top cells: give the anchors to fall back to")
        top1 = probs.argmax(1)
        out_lat[missing], out_lon[missing] = anchor_lat[top1[missing]], anchor_lon[top1[missing]]
    return out_lat, out_lon, out_idx


def normalised(feats) -> np.ndarray:
    """Rows of ``feats`` as L2-normalised float32 (a zero row stays zero)."""
    q = np.asarray(feats, np.float32)
    return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)


def cell_blocks(gallery: Gallery, top: np.ndarray, max_block_bytes: int = 128 << 20):
    """The gallery searched cell by cell for queries with candidate cells ``top`` (n, k): yields
    ``(cell, query rows, their slot in top, gallery indices, float32 gallery rows)`` for every cell some query
    names, in blocks of at most ``max_block_bytes`` of gallery rows and of (query x item) scores.

    Only a query's own candidate cells are ever compared with it: ``k / cells`` of a dense search's work and memory,
    and a 1M-item gallery needs no float32 copy (:func:`best_in_cells` reads it).
    """
    n, k = top.shape
    order = np.argsort(gallery.labels, kind="stable")                 # the items of each cell, contiguous
    cells, starts, counts = np.unique(gallery.labels[order], return_index=True, return_counts=True)
    pair_cell, pair_query, pair_slot = top.ravel(), np.repeat(np.arange(n), k), np.tile(np.arange(k), n)
    by_cell = np.argsort(pair_cell, kind="stable")
    pair_cell, pair_query, pair_slot = pair_cell[by_cell], pair_query[by_cell], pair_slot[by_cell]
    lo, hi = np.searchsorted(pair_cell, cells, "left"), np.searchsorted(pair_cell, cells, "right")
    rows = max(1, max_block_bytes // max(4 * gallery.feats.shape[1], 1))
    for c, g_start, g_count, q_lo, q_hi in zip(cells.tolist(), starts, counts, lo, hi):
        if q_lo == q_hi:
            continue  # no query has this cell among its top cells
        qs, slots = pair_query[q_lo:q_hi], pair_slot[q_lo:q_hi]
        for g0 in range(g_start, g_start + g_count, rows):
            gidx = order[g0:min(g0 + rows, g_start + g_count)]
            g = gallery.feats[gidx].astype(np.float32)
            chunk = max(1, max_block_bytes // max(8 * len(gidx), 1))
            for s in range(0, len(qs), chunk):
                yield c, qs[s:s + chunk], slots[s:s + chunk], gidx, g


def shipped_gallery(meta: dict | None) -> dict | None:
    """The model metadata's record of the gallery written beside it (``gallery_sha256``, ``gallery_size``,
    ``features``): refinement's, else feature reranking's; None when neither ships one."""
    meta = meta or {}
    for key in ("refine", "rerank"):
        if (meta.get(key) or {}).get("gallery_sha256"):
            return meta[key]
    return None


def gallery_path(model_path: str | Path) -> Path:
    """``models/best.pt`` -> ``models/best.gallery.npz``: where a model's gallery lives."""
    return Path(model_path).with_suffix(".gallery.npz")


def _to_xyz(lat, lon) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def _to_latlon(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    return np.degrees(np.arcsin(np.clip(v[..., 2], -1, 1))), np.degrees(np.arctan2(v[..., 1], v[..., 0]))


def choose_params(gallery: Gallery, val_feats, val_probs, val_lat, val_lon, anchor_lat, anchor_lon,
                  grid_k=(1, 3, 5, 10), grid_t=(0.02, 0.05, 0.1, 0.2), grid_n=(1, 4),
                  fallback: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[RefineParams, float]:
    """The parameters with the lowest validation median error (ties: the first in grid order); (params, its km).

    The gallery is searched once, for the grid's largest ``top_k`` and ``neighbours`` (:func:`candidates`); every
    grid point is then read off that search (:func:`refine_from`), the same answers as :func:`refine` with it."""
    from ..geo import haversine_km

    best: tuple[float, RefineParams] | None = None
    cands = candidates(gallery, val_feats, val_probs, max(grid_k), max(grid_n))  # one search for the whole grid
    for k in grid_k:
        for t in grid_t:
            for nb in grid_n:
                p = RefineParams(k, t, nb)
                la, lo, _ = refine_from(gallery, cands, p, val_probs, anchor_lat, anchor_lon, fallback=fallback)
                med = float(np.median(haversine_km(val_lat, val_lon, la, lo)))
                if best is None or med < best[0] - 1e-9:
                    best = (med, p)
    return best[1], best[0]
