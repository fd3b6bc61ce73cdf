"""Sequence-aware train/val/test split: a sequence never crosses splits.

Sequences are shuffled with the seed, then each goes to the split whose share
of images is furthest below its target ratio, so image counts track the
ratios even with sequences of unequal length.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from ..io import write_parquet
from .build import IndexPaths, plot_coverage

SPLITS = ("train", "val", "test")


def assign_splits(sequence_ids: list[str], ratios: list[float], seed: int) -> dict[str, str]:
    """Map each sequence id to a split name."""
    seq, sizes = np.unique(np.asarray(sequence_ids, dtype=object).astype(str), return_counts=True)
    order = np.random.default_rng(seed).permutation(len(seq))
    target = np.asarray(ratios, dtype=np.float64)
    filled = np.zeros(3)
    out: dict[str, str] = {}
    for i in order:
        total = filled.sum() + sizes[i]
        deficit = target * total - filled
        k = int(np.argmax(np.where(target > 0, deficit, -np.inf)))
        out[str(seq[i])] = SPLITS[k]
        filled[k] += sizes[i]
    return out


def make_splits(cfg) -> dict[str, int]:
    paths = IndexPaths.from_config(cfg)
    if not paths.images.exists():
        raise FileNotFoundError(f"no index at {paths.root}: run `geolocate index` first")
    df = pl.read_parquet(paths.images)
    mapping = assign_splits(df["sequence_id"].to_list(), cfg.index.split_ratios, cfg.index.seed)
    splits = df.select("id", pl.col("sequence_id").replace_strict(mapping, return_dtype=pl.Utf8).alias("split"))
    write_parquet(paths.splits, splits)
    plot_coverage(df.join(splits, on="id"), paths.coverage)
    counts = dict(splits.group_by("split").len().iter_rows())
    return {s: int(counts.get(s, 0)) for s in SPLITS}
