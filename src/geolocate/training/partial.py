"""Partial fine-tuning that fits a CPU: the last backbone blocks + the head, over cached trunk activations.

The trunk (everything before the last ``train.partial_blocks`` blocks; ``Backbone.partial_split``) stays frozen,
so its output is computed once per image and kept on disk as float16 ``.npy`` files read memory-mapped
(EfficientNet-Lite0, any tail of 1-4 blocks: 192x7x7 values, 18.8 KB an image): the clean activations of every
image, plus ``train.partial_copies`` augmented copies of each training image (``geolocate.augment``, seeded by
the image's content and the copy, like the augmented embeddings). Training then runs only the tail: ~20 ms an
image-step on one core instead of ~150 ms through the whole network.

A cache file is named by the trunk's weights, the images (path, size, mtime), the augmentation and the copy, so
a rerun (another seed, another head) reuses it; it is written atomically (``geolocate.io``) and the trunk runs
under ONNX Runtime.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..io import atomic_write
from ..progress import console, progress_bar
from ..runtime import ordered_map
from .embeddings import content_digest, file_stamp, load_batch


class TailModel(nn.Module):
    """Cached trunk activations (float16 or float32) -> the tail's pooled features -> the head's ``GeoOutput``."""

    def __init__(self, tail: nn.Module, head: nn.Module):
        super().__init__()
        self.tail, self.head = tail, head

    def features(self, acts: torch.Tensor) -> torch.Tensor:
        return self.tail(acts.float())

    def forward(self, acts: torch.Tensor):
        return self.head(self.features(acts))


class Rows:
    """Several memory-mapped activation arrays seen as one: ``take(idx)`` -> float32 tensor of those rows."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self),) + tuple(self.parts[0].shape[1:])

    def take(self, idx) -> torch.Tensor:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx),) + self.shape[1:], dtype=np.float32)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        for k in np.unique(part):
            sel = part == k
            rows = idx[sel] - self.starts[k]
            order = np.argsort(rows)  # sequential reads of the memory map
            got = np.empty((len(rows),) + self.shape[1:], dtype=np.float32)
            got[order] = self.parts[k][rows[order]]
            out[sel] = got
        return torch.from_numpy(out)


def trunk_shape(trunk: nn.Module, size: int) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(trunk.eval()(torch.zeros(1, 3, size, size)).shape[1:])


def _trunk_key(trunk: nn.Module, paths: Sequence[str], extra: str) -> str:
    from ..models.onnx import weights_digest

    h = hashlib.sha1(f"{weights_digest(trunk)}|{extra}".encode())
    for p in paths:
        h.update(f"{p}|{file_stamp(p)}\n".encode())
    return h.hexdigest()[:16]


def cached_activations(trunk: nn.Module, preprocess, paths: Sequence[str], cache_dir: str | Path, name: str,
                       augment=None, copy: int = 0, batch_size: int = 32, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float16 activations (N, C, H, W), memory-mapped read-only; ok mask (N,)) of the trunk over ``paths``.

    With ``augment``: augmented copy ``copy`` of every image. Unreadable images get zeros and ok False."""
    from ..models.onnx import to_onnx_bytes
    from ..runtime import ort_session

    extra = f"{name}|{preprocess.to_dict()}|" + (f"{augment.key}.{copy}" if augment is not None else "clean")
    key = _trunk_key(trunk, paths, extra)
    cache_dir = Path(cache_dir)
    path, ok_path = cache_dir / f"{name}-{key}.npy", cache_dir / f"{name}-{key}.ok.npy"
    what = f"augmented copy {copy}" if augment is not None else "clean"
    if path.is_file() and ok_path.is_file():
        console.print(f"activations: {len(paths)} cached ({what}, {path})", markup=False, highlight=False, soft_wrap=True)
        return np.load(path, mmap_mode="r"), np.load(ok_path)
    shape = trunk_shape(trunk, preprocess.size)
    session = ort_session(to_onnx_bytes(trunk, torch.zeros(2, 3, preprocess.size, preprocess.size), "image", ["acts"]))
    transforms = None
    if augment is not None:
        transforms = [augment.seeded(augment.seed_for(content_digest(p), copy)) for p in paths]
    n = len(paths)
    ok = np.zeros(n, dtype=bool)

    def work(s: int):
        x, good = load_batch(paths[s:s + batch_size], preprocess, transforms and transforms[s:s + batch_size])
        return s, (session.run(["acts"], {"image": x})[0] if x is not None else None), good

    def write(tmp: Path) -> None:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, *shape))
        with progress_bar(f"trunk activations ({what})", n) as advance:
            for s, out, good in ordered_map(work, range(0, n, batch_size), workers):
                rows = np.arange(s, s + len(good))
                if out is not None:
                    mm[rows[np.asarray(good)]] = out.astype(np.float16)
                mm[rows[~np.asarray(good)]] = 0
                ok[rows] = good
                advance(len(good))
        mm.flush()
        del mm

    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write, suffix=".npy")
    atomic_write(ok_path, lambda p: np.save(p, ok), suffix=".npy")
    console.print(f"activations: {n} computed ({what}, {path}, {path.stat().st_size / 2**20:.0f} MiB)", markup=False,
                  highlight=False, soft_wrap=True)
    return np.load(path, mmap_mode="r"), ok


@torch.no_grad()
def tail_features(model: TailModel, acts: Rows | np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Pooled features of the (trained) tail over cached activations, in chunks (eval mode)."""
    rows = acts if isinstance(acts, Rows) else Rows([acts])
    model.eval()
    return torch.cat([model.features(rows.take(np.arange(s, min(s + batch_size, len(rows))))) for s in range(0, len(rows), batch_size)])
