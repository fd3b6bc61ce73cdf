"""Build ``data/index/`` from every records file.

Cells: each image gets the H3 cell at ``h3_resolution``. Cells with fewer
than ``min_cell_samples`` images are, with ``small_cells="merge"``, replaced by
their parent cell, repeatedly, until every cell is big enough or resolution 0
is reached; images in a resolution-0 cell that is still too small are dropped.
With ``small_cells="drop"`` they are dropped at once. Dropped images are
counted in ``stats.json`` and listed nowhere else. Classes are numbered by
cell id order, so the same data always gives the same class numbers.
"""
from __future__ import annotations

import dataclasses as dc
import hashlib
from pathlib import Path

import h3
import numpy as np
import polars as pl

from ..geo import place_names, valid_latlon
from ..io import read_json, save_figure, write_json, write_parquet
from ..sources.base import RECORD_FIELDS, read_records, records_dir


@dc.dataclass(frozen=True)
class IndexPaths:
    root: Path

    @classmethod
    def from_config(cls, cfg) -> "IndexPaths":
        return cls(Path(cfg.paths.data_dir) / "index")

    @property
    def images(self) -> Path:
        return self.root / "images.parquet"

    @property
    def splits(self) -> Path:
        return self.root / "splits.parquet"

    @property
    def labels(self) -> Path:
        return self.root / "labels.json"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    @property
    def coverage(self) -> Path:
        return self.root / "coverage.png"


def collect_records(data_dir: str | Path, sources: list[str] | None = None) -> pl.DataFrame:
    """Every record of every (or the named) source, deduplicated by id (last wins)."""
    rdir = records_dir(data_dir)
    files = sorted(rdir.glob("*.jsonl")) if rdir.is_dir() else []
    if sources:
        files = [f for f in files if f.stem in sources]
    rows = [r.to_dict() for f in files for r in read_records(f)]
    if not rows:
        raise FileNotFoundError(f"no image records under {rdir}: run `geolocate build-dataset` first")
    schema = {k: pl.Utf8 for k in RECORD_FIELDS} | {"lat": pl.Float64, "lon": pl.Float64, "heading": pl.Float64}
    df = pl.DataFrame(rows, schema=schema)
    return df.unique(subset="id", keep="last", maintain_order=True)


def assign_cells(lat: np.ndarray, lon: np.ndarray, resolution: int, min_samples: int, policy: str) -> list[str | None]:
    """H3 class cell per point after merging/dropping small cells (None = dropped)."""
    cells: list[str | None] = [h3.latlng_to_cell(float(a), float(o), resolution) for a, o in zip(lat, lon)]
    res = resolution
    while True:
        counts: dict[str, int] = {}
        for c in cells:
            if c is not None:
                counts[c] = counts.get(c, 0) + 1
        small = {c for c, n in counts.items() if n < min_samples}
        if not small:
            return cells
        if policy == "drop" or res == 0:
            return [None if c in small else c for c in cells]
        res -= 1
        cells = [h3.cell_to_parent(c, res) if c in small else c for c in cells]


def dataset_fingerprint(ids: list[str], cells: list[str]) -> str:
    h = hashlib.sha256()
    for i, c in sorted(zip(ids, cells)):
        h.update(f"{i}\t{c}\n".encode())
    return h.hexdigest()[:16]


def build_index(cfg, sources: list[str] | None = None, plot: bool = True) -> dict:
    """Write images.parquet, labels.json, stats.json and coverage.png; return stats."""
    paths = IndexPaths.from_config(cfg)
    ic = cfg.index
    df = collect_records(cfg.paths.data_dir, sources)
    ok = valid_latlon(df["lat"].to_numpy(), df["lon"].to_numpy())
    n_bad = int((~ok).sum())
    df = df.filter(pl.Series(ok))
    cells = assign_cells(df["lat"].to_numpy(), df["lon"].to_numpy(), ic.h3_resolution, ic.min_cell_samples, ic.small_cells)
    df = df.with_columns(pl.Series("cell", cells, dtype=pl.Utf8))
    n_dropped = int(df["cell"].null_count())
    df = df.filter(pl.col("cell").is_not_null())
    if df.height == 0:
        raise ValueError(f"no images left after min_cell_samples={ic.min_cell_samples}: lower it or add data")
    classes = sorted(df["cell"].unique().to_list())
    index_of = {c: i for i, c in enumerate(classes)}
    df = df.with_columns(pl.col("cell").replace_strict(index_of, return_dtype=pl.Int32).alias("label"))
    counts = df.group_by("label").len().sort("label")["len"].to_numpy()
    centroids = [h3.cell_to_latlng(c) for c in classes]
    names = place_names(centroids)
    labels = {
        "h3_resolution": ic.h3_resolution,
        "num_classes": len(classes),
        "classes": [
            {"index": i, "cell": c, "resolution": h3.get_resolution(c), "lat": round(la, 6), "lon": round(lo, 6),
             "place": nm["label"], "count": int(n)}
            for i, (c, (la, lo), nm, n) in enumerate(zip(classes, centroids, names, counts))
        ],
    }
    stats = {
        "images": df.height,
        "cells": len(classes),
        "per_cell": {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())},
        "top_class_share": round(float(counts.max() / counts.sum()), 4),
        "dropped_invalid_latlon": n_bad,
        "dropped_small_cells": n_dropped,
        "sequences": int(df["sequence_id"].n_unique()),
        "sources": {k: int(v) for k, v in df.group_by("source").len().iter_rows()},
        "h3_resolution": ic.h3_resolution,
        "min_cell_samples": ic.min_cell_samples,
        "small_cells": ic.small_cells,
        "fingerprint": dataset_fingerprint(df["id"].to_list(), df["cell"].to_list()),
    }
    write_parquet(paths.images, df)
    write_json(paths.labels, labels)
    write_json(paths.stats, stats)
    if plot:
        plot_coverage(df, paths.coverage)
    return stats


def load_index(cfg) -> tuple[pl.DataFrame, dict, dict]:
    """(images joined with splits when present, labels, stats)."""
    paths = IndexPaths.from_config(cfg)
    if not paths.images.exists():
        raise FileNotFoundError(f"no index at {paths.root}: run `geolocate index` first")
    df = pl.read_parquet(paths.images)
    if paths.splits.exists():
        df = df.join(pl.read_parquet(paths.splits), on="id", how="left")
    return df, read_json(paths.labels), read_json(paths.stats)


def plot_coverage(df: pl.DataFrame, path: Path) -> None:
    """Images over the Blue Marble, coloured by split when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..sources.earth import load_imagery

    fig, ax = plt.subplots(figsize=(11, 5.6))
    ax.imshow(load_imagery("bmng")[::4, ::4], extent=(-180, 180, -90, 90), alpha=0.85)
    groups = df.partition_by("split", as_dict=True) if "split" in df.columns else {("all",): df}
    colours = {"train": "#ffd23f", "val": "#3bceac", "test": "#ee4266", "all": "#ffd23f"}
    for key, part in sorted(groups.items(), key=lambda kv: str(kv[0])):
        name = key[0] if isinstance(key, tuple) else key
        ax.scatter(part["lon"].to_numpy(), part["lat"].to_numpy(), s=4, c=colours.get(str(name), "white"),
                   label=f"{name} ({part.height})", linewidths=0)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_title(f"Coverage: {df.height} images, {df['label'].n_unique()} cells")
    ax.legend(loc="lower left", markerscale=3, fontsize=8)
    save_figure(fig, path)
