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
    """Map each sequence id to a split name; see :func:`split_table`."""
    t = split_table(sequence_ids, ratios, seed)
    return dict(zip(t["seq"].to_list(), t["split"].to_list()))


def split_table(sequence_ids, ratios: list[float], seed: int) -> pl.DataFrame:
    """(seq, split) for each distinct sequence id (vectorised: no loop over rows or sequences).

    The distinct sequences (sorted, then shuffled with ``seed``) are laid end to
    end by image count; a sequence goes to the split whose share of the line
    (cumulative ``ratios``) holds its midpoint. Every image of a sequence thus
    shares one split, a zero ratio gets nothing, and each split's image count is
    within half a sequence of its target at each boundary.
    """
    seq = _as_string_series(sequence_ids)
    if seq.len() == 0:
        return pl.DataFrame(schema={"seq": pl.Utf8, "split": pl.Utf8})
    vc = seq.value_counts(sort=False, name="n").sort("seq")
    names, sizes = vc["seq"], vc["n"].to_numpy().astype(np.float64)
    order = np.random.default_rng(seed).permutation(len(names))
    sz = sizes[order]
    ends = np.cumsum(sz)
    target = np.asarray(ratios, dtype=np.float64)
    bounds = np.cumsum(target / target.sum()) * ends[-1]
    k = np.minimum(np.searchsorted(bounds, ends - sz / 2, side="right"), len(SPLITS) - 1)
    return pl.DataFrame({"seq": names.gather(order), "split": pl.Series(np.asarray(SPLITS)[k], dtype=pl.Utf8)})


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


def make_splits(cfg, plot: bool = True) -> dict[str, int]:
    """Write splits.parquet and (``plot``) the coverage map coloured by split; return images per split."""
    paths = IndexPaths.from_config(cfg)
    if not paths.images.exists():
        raise FileNotFoundError(f"no index at {paths.root}: run `geolocate index` first")
    df = pl.read_parquet(paths.images, columns=["id", "sequence_id", "lat", "lon", "label"])
    table = split_table(df["sequence_id"], cfg.index.split_ratios, cfg.index.seed)
    df = df.with_columns(_as_string_series(df["sequence_id"])).join(table, on="seq", how="left", maintain_order="left")
    splits = df.select("id", "split")
    write_parquet(paths.splits, splits)
    if plot:
        plot_coverage(df, paths.coverage)
    counts = dict(splits.group_by("split").len().iter_rows())
    return {s: int(counts.get(s, 0)) for s in SPLITS}
