"""Embedding extraction with a per-image cache for frozen backbones.

The cache ``<cache_dir>/<backbone>.npz`` holds ids, a key per id (path,
size, mtime) and features; only images whose key changed are recomputed.
An image whose file is gone (``clean-raw``) keeps its cached features.
Images are decoded and run on one worker thread per core (see ``geolocate.runtime``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..io import ImageError, atomic_write
from ..progress import console, progress_bar
from ..runtime import ordered_map


def file_key(path: str) -> str:
    try:
        st = os.stat(path)
        return hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    except OSError:
        return "missing"


def load_batch(paths: Sequence[str], preprocess) -> tuple[np.ndarray | None, list[bool]]:
    """(B', 3, S, S) float32 of the readable images (None if none), and which were readable."""
    arrays, ok = [], []
    for p in paths:
        try:
            arrays.append(preprocess.load_array(p))
            ok.append(True)
        except ImageError as e:
            console.print(f"skipped: {e}", markup=False, highlight=False)
            ok.append(False)
    return (np.stack(arrays) if arrays else None), ok


ENGINES = ("onnx", "torch")


@torch.inference_mode()
def embed_paths(backbone: torch.nn.Module, paths: Sequence[str], batch_size: int = 32, desc: str = "embedding",
                engine: str = "onnx", onnx_cache: str | Path | None = None,
                workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, F) float32 with NaN rows for unreadable images, ok mask (N,)).

    ``engine="onnx"`` runs the backbone under ONNX Runtime (same features within ~1e-5, several times faster
    on CPU): each of ``workers`` threads (default: one per core) decodes a batch and runs it through one shared
    single-threaded session. Its export is cached in ``onnx_cache``. ``engine="torch"`` decodes on the workers and
    runs the batches in this thread.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown embedding engine {engine!r}: choose one of {', '.join(ENGINES)}")
    backbone.eval()
    ort = None
    if engine == "onnx" and (onnx_cache is not None or len(paths) >= batch_size):  # a fresh export costs seconds
        from ..models.onnx import OrtFeatures

        ort = OrtFeatures(backbone, cache_dir=onnx_cache)
    n = len(paths)
    feats = np.full((n, backbone.num_features), np.nan, dtype=np.float32)
    okmask = np.zeros(n, dtype=bool)
    starts = list(range(0, n, batch_size))

    def work(s: int):
        x, ok = load_batch(paths[s:s + batch_size], backbone.preprocess)
        if ort is not None and x is not None:
            return s, ort.features(x), ok
        return s, x, ok

    with progress_bar(desc, n) as advance:
        for s, out, ok in ordered_map(work, starts, workers):
            idx = np.arange(s, s + len(ok))[np.asarray(ok)]
            if out is not None:
                feats[idx] = out if ort is not None else backbone(torch.from_numpy(out)).float().numpy()
                okmask[idx] = True
            advance(len(ok))
    return feats, okmask


def cached_embeddings(backbone: torch.nn.Module, ids: Sequence[str], paths: Sequence[str], cache_dir: str | Path,
                      batch_size: int = 32, engine: str = "onnx") -> tuple[np.ndarray, np.ndarray]:
    """Features for ``ids`` using and refreshing the on-disk cache."""
    cache = Path(cache_dir) / f"{backbone.cache_name}.npz"
    keys = np.asarray([file_key(p) for p in paths])
    ids_arr = np.asarray(ids)
    old: dict[str, tuple[str, np.ndarray]] = {}
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if z["feats"].shape[1] == backbone.num_features:
                    old = {i: (k, f) for i, k, f in zip(z["ids"], z["keys"], z["feats"])}
        except (OSError, KeyError, ValueError):
            console.print(f"[yellow]warning:[/] embedding cache {cache} unreadable: rebuilding it")
    feats = np.full((len(ids), backbone.num_features), np.nan, dtype=np.float32)
    todo = []
    for j, (i, k) in enumerate(zip(ids_arr, keys)):
        hit = old.get(i)
        # a file removed by `clean-raw` keeps its cached features, so later runs still use it
        if hit is not None and (hit[0] == k or k == "missing"):
            feats[j] = hit[1]
        else:
            todo.append(j)
    if todo:
        new, ok = embed_paths(backbone, [paths[j] for j in todo], batch_size, engine=engine, onnx_cache=Path(cache_dir) / "onnx")
        feats[todo] = new
        for j, f, good in zip(todo, new, ok):
            if good:
                old[ids_arr[j]] = (keys[j], f)
        all_ids = np.asarray(list(old.keys()))

        def _save(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, ids=all_ids, keys=np.asarray([old[i][0] for i in all_ids]),
                         feats=np.stack([old[i][1] for i in all_ids]).astype(np.float32))

        atomic_write(cache, _save, suffix=".npz")
    return feats, ~np.isnan(feats).any(axis=1)
