"""Embedding extraction with a per-image cache for frozen backbones.

The cache is the sharded float16 store ``<cache_dir>/<backbone cache_name>/``
(``geolocate.training.store``: memory-mapped shards + an index parquet) and
holds, per id, the content digest of its image (blake2b of the file bytes),
the file's size:mtime stamp when it was hashed, and the features. Features are
found by content, so a copied or moved checkout, or an identical file
rewritten, is never embedded again; a file whose stamp is unchanged is not
even re-hashed. An image whose file is gone (``clean-raw``) keeps its cached
features by id. The single-file ``<cache_name>.npz`` cache of earlier versions
is migrated into the store when first opened; within it, entries of still
older versions (keys of path, size and mtime) keep every entry whose file is
unchanged in place. Images are decoded and run on one worker thread
per core (see ``geolocate.runtime``).

Augmented copies of training images (``augment.copies``) live in the same
cache under the id ``<id>#<augment key>.<copy>`` and the digest
``<content digest>#<augment key>.<copy>``: found by content like the originals,
and recomputed only when the image, the augmentation spec or the backbone changes.
"""
from __future__ import annotations

import dataclasses as dc
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..io import ImageError, atomic_write
from ..progress import console, progress_bar, tagged
from ..runtime import ordered_map

if TYPE_CHECKING:
    from ..augment import Augment
    from .store import FeatureView


def content_digest(path: str) -> str | None:
    """blake2b-128 of the file's bytes (6000 small JPEGs: ~0.2 s), None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    except OSError:
        return None


def file_stamp(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def legacy_key(path: str) -> str:
    """The key of caches written before content digests (path, size and mtime)."""
    try:
        st = os.stat(path)
        return hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    except OSError:
        return "missing"


@dc.dataclass
class CacheEntry:
    digest: str          # "" for an entry of an older cache, whose stamp is then its legacy key
    stamp: str
    feat: np.ndarray


def load_cache(cache: Path, num_features: int) -> dict[str, CacheEntry]:
    """id -> entry; an unreadable cache or one of another feature size is empty (one warning line)."""
    if not cache.exists():
        return {}
    try:
        with np.load(cache, allow_pickle=False) as z:
            if z["feats"].shape[1] != num_features:
                return {}
            if "digests" not in z:
                return {i: CacheEntry("", k, f) for i, k, f in zip(z["ids"].tolist(), z["keys"].tolist(), z["feats"])}
            return {i: CacheEntry(d, st, f) for i, d, st, f in
                    zip(z["ids"].tolist(), z["digests"].tolist(), z["stamps"].tolist(), z["feats"])}
    except (OSError, KeyError, ValueError, IndexError):
        console.print(tagged("warning", f"embedding cache {cache} unreadable: rebuilding it"), highlight=False, soft_wrap=True)
        return {}


def save_cache(cache: Path, entries: dict[str, CacheEntry]) -> None:
    ids = list(entries)

    def _save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=np.asarray(ids), digests=np.asarray([entries[i].digest for i in ids]),
                     stamps=np.asarray([entries[i].stamp for i in ids]),
                     feats=np.stack([entries[i].feat for i in ids]).astype(np.float32))

    atomic_write(cache, _save, suffix=".npz")


def load_batch(paths: Sequence[str], preprocess, transforms: Sequence | None = None) -> tuple[np.ndarray | None, list[bool]]:
    """(B', 3, S, S) float32 of the readable images (None if none), and which were readable.

    ``transforms``: one training-time transform (or None) per path, see ``Preprocess.load``.
    """
    arrays, ok = [], []
    for p, t in zip(paths, transforms or [None] * len(paths)):
        try:
            arrays.append(preprocess.load_array(p, transform=t))
            ok.append(True)
        except ImageError as e:
            console.print(tagged("skipped", e, "red"), highlight=False, soft_wrap=True)
            ok.append(False)
    return (np.stack(arrays) if arrays else None), ok


ENGINES = ("onnx", "torch")


@torch.inference_mode()
def embed_paths(backbone: torch.nn.Module, paths: Sequence[str], batch_size: int = 32, desc: str = "embedding",
                engine: str = "onnx", onnx_cache: str | Path | None = None,
                workers: int | None = None, transforms: Sequence | None = None,
                device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(features (N, F) float32 with NaN rows for unreadable images, ok mask (N,)).

    ``engine="onnx"`` runs the backbone under ONNX Runtime (same features within ~1e-5, several times faster
    on CPU): each of ``workers`` threads (default: one per core) decodes a batch and runs it through one shared
    single-threaded session. Its export is cached in ``onnx_cache``. ``engine="torch"`` decodes on the workers and
    runs the batches in this thread, on ``device`` (``train.device``; ONNX Runtime runs on the CPU, so a CUDA
    device switches the engine to torch). ``transforms`` (training only): one transform or None per path.
    """
    from .precision import resolve_device

    device = resolve_device(device)
    if device.type != "cpu":
        engine = "torch"
    if engine not in ENGINES:
        raise ValueError(f"unknown embedding engine {engine!r}: choose one of {', '.join(ENGINES)}")
    backbone.eval()
    if device.type != "cpu":
        backbone.to(device)
    ort = None
    if engine == "onnx" and (onnx_cache is not None or len(paths) >= batch_size):  # a fresh export costs seconds
        from ..models.onnx import OrtFeatures

        ort = OrtFeatures(backbone, cache_dir=onnx_cache)
    n = len(paths)
    feats = np.full((n, backbone.num_features), np.nan, dtype=np.float32)
    okmask = np.zeros(n, dtype=bool)
    starts = list(range(0, n, batch_size))

    def work(s: int):
        x, ok = load_batch(paths[s:s + batch_size], backbone.preprocess, transforms and transforms[s:s + batch_size])
        if ort is not None and x is not None:
            return s, ort.features(x), ok
        return s, x, ok

    with progress_bar(desc, n) as advance:
        for s, out, ok in ordered_map(work, starts, workers):
            idx = np.arange(s, s + len(ok))[np.asarray(ok)]
            if out is not None:
                feats[idx] = out if ort is not None else backbone(torch.from_numpy(out).to(device)).float().cpu().numpy()
                okmask[idx] = True
            advance(len(ok))
    if device.type != "cpu":
        backbone.to("cpu")
    return feats, okmask


def cached_embeddings(backbone: torch.nn.Module, ids: Sequence[str], paths: Sequence[str], cache_dir: str | Path,
                      batch_size: int = 32, engine: str = "onnx", augment: "Augment | None" = None,
                      copy: int = 0, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Features for ``ids`` (images at ``paths``) using and refreshing the on-disk cache, as one float32 array.

    With ``augment`` (training images only): the features of augmented copy ``copy`` of each image instead.
    ``cached_embedding_view`` is the same without loading them all into memory.
    """
    view, ok = cached_embedding_view(backbone, ids, paths, cache_dir, batch_size, engine, augment, copy, device)
    return np.asarray(view), ok


def cached_embedding_view(backbone: torch.nn.Module, ids: Sequence[str], paths: Sequence[str], cache_dir: str | Path,
                          batch_size: int = 32, engine: str = "onnx", augment: "Augment | None" = None,
                          copy: int = 0, device: str | torch.device = "cpu") -> tuple["FeatureView", np.ndarray]:
    """(a :class:`~geolocate.training.store.FeatureView` of the features of ``ids`` in the sharded float16 store
    ``<cache_dir>/<backbone cache_name>/``, which rows exist); see :func:`cached_embeddings`."""
    from .store import EmbeddingStore

    store = EmbeddingStore.open(cache_dir, backbone.cache_name, backbone.num_features)
    cache = store.root
    entries = store.entries()
    index = store.index
    by_digest: dict[str, int] = {}
    for pos, d in enumerate(index.digests.tolist()):
        if d:
            by_digest.setdefault(d, pos)
    pos_of = np.full(len(ids), -1, dtype=np.int64)      # position in the store's index, -1 = not (yet) there
    new_of: dict[int, int] = {}                          # row j -> row of the newly computed features
    changes: dict[str, tuple[str, str, int, int]] = {}   # id -> (digest, stamp, shard, row) to commit
    todo: list[tuple[int, str | None, str | None]] = []   # (row, digest, stamp) to embed
    legacy = 0
    suffix = f"#{augment.key}.{copy}" if augment is not None else ""
    ids = [i + suffix for i in ids]
    for j, (i, p) in enumerate(zip(ids, paths)):
        old = entries.get(i)
        stamp = file_stamp(p)
        if stamp is None:  # gone (`clean-raw`): the cached features of its id, if any
            if old is not None:
                pos_of[j] = old
            else:
                todo.append((j, None, None))
            continue
        old_digest = index.digests[old] if old is not None else ""
        if old is not None and old_digest and index.stamps[old] == stamp:
            pos_of[j] = old  # unchanged since it was hashed
            continue
        digest = content_digest(p)
        digest = digest and digest + suffix
        hit = by_digest.get(digest) if digest else None
        if hit is None and old is not None and not old_digest and not suffix and index.stamps[old] == legacy_key(p):
            hit, legacy = old, legacy + 1
        if hit is None:
            todo.append((j, digest, stamp))
            continue
        pos_of[j] = hit
        changes[i] = (digest, stamp, int(index.shard[hit]), int(index.row[hit]))
        by_digest[digest] = hit
    if legacy:
        console.print(tagged("note", f"embedding cache {cache}: {legacy} entries of an older cache format kept "
                             "(their files are unchanged); the cache now keys images by content"), highlight=False, soft_wrap=True)
    loc = store.location(pos_of)
    new = None
    if todo:
        rows = [j for j, _, _ in todo]
        transforms = [augment.seeded(augment.seed_for(d, copy)) for _, d, _ in todo] if augment is not None else None
        new, ok = embed_paths(backbone, [paths[j] for j in rows], batch_size, engine=engine, onnx_cache=Path(cache_dir) / "onnx",
                              desc="embedding (augmented)" if augment is not None else "embedding", transforms=transforms,
                              device=device)
        keep = np.flatnonzero(ok)
        new = new[keep]
        for k, t in enumerate(keep.tolist()):
            j, digest, stamp = todo[t]
            new_of[j] = k
            if digest:
                changes[ids[j]] = (digest, stamp, -1, k)
    what = f"augmented copy {copy} ({augment.domain}, {augment.key}) " if augment is not None else ""
    console.print(f"embeddings: {what}{len(ids) - len(todo)} cached, {len(todo)} computed ({cache})", markup=False,
                  highlight=False, soft_wrap=True)
    if changes or new_of:
        # features computed for images without a digest (unreadable digests) are stored too, but indexed by no id
        new_loc = store.commit(changes, new if new is not None and len(new) else None)
        for j, k in new_of.items():
            loc[j] = new_loc[k]
    view = store.view(loc)
    return view, view.ok()
