"""Sequence-aware train/val/test split: a sequence never crosses splits.

Sequences are shuffled with the seed and laid end to end by image count; each
goes to the split whose share of that line holds its midpoint, so image counts
track the ratios even with sequences of unequal length.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from ..io import write_parquet
from .build import IndexPaths, plot_coverage

SPLITS = ("train", "val", "test")


def assign_splits(sequence_ids: list[str], ratios: list[float], seed: int) -> dict[str, str]:
    """Map each sequence id to a split name (vectorised: no loop over rows or sequences).

    The distinct sequences (sorted, then shuffled with ``seed``) are laid end to
    end by image count; a sequence goes to the split whose share of the line
    (cumulative ``ratios``) holds its midpoint. Every image of a sequence thus
    shares one split, a zero ratio gets nothing, and each split's image count is
    within half a sequence of its target at each boundary.
    """
    seq = _as_string_series(sequence_ids)
    if seq.len() == 0:
        return {}
    vc = seq.value_counts(sort=False, name="n").sort("seq")
    names, sizes = vc["seq"].to_numpy(), vc["n"].to_numpy().astype(np.float64)
    order = np.random.default_rng(seed).permutation(len(names))
    sz = sizes[order]
    ends = np.cumsum(sz)
    target = np.asarray(ratios, dtype=np.float64)
    bounds = np.cumsum(target / target.sum()) * ends[-1]
    k = np.minimum(np.searchsorted(bounds, ends - sz / 2, side="right"), len(SPLITS) - 1)
    return dict(zip(names[order].tolist(), np.asarray(SPLITS, dtype=object)[k].tolist()))


def _as_string_series(values) -> pl.Series:
    """Sequence ids as a Utf8 series (None -> "None", as str() would spell it)."""
    if isinstance(values, pl.Series):
        s = values
    else:
        try:
            s = pl.Series(values=values, dtype=pl.Utf8)
        except (TypeError, pl.exceptions.PolarsError):
            s = pl.Series(values=np.asarray(values, dtype=object).astype(str), dtype=pl.Utf8)
    return s.cast(pl.Utf8).fill_null("None").rename("seq")


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
