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
    """H3 class cell per point after merging/dropping small cells (None = dropped).

    Vectorised: cells are computed as uint64 H3 indexes over whole columns
    (``polars-h3``), a parent is bit arithmetic on the index (:func:`_h3_parent`)
    and cell sizes are hash counts; the merge loop runs once per resolution
    level, never once per row, and each level only revisits the rows that were
    just merged (a parent at resolution r can only collect rows of small cells at
    r+1: every untouched cell is finer). 1M points take about a second.
    """
    cells = _latlng_to_cells(np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64), resolution)
    active = np.flatnonzero(cells)          # rows whose cell may still be too small
    res = resolution
    while active.size:
        sub = cells[active]
        small = _group_sizes(sub) < min_samples
        if not small.any():
            break
        active = active[small]
        if policy == "drop" or res == 0:
            cells[active] = 0
            break
        res -= 1
        cells[active] = _h3_parent(cells[active], res)
    return _cells_to_strings(cells)


def _group_sizes(values: np.ndarray) -> np.ndarray:
    """For each element, how many elements share its value (hash-based, no sort)."""
    return pl.DataFrame({"v": values}).select(pl.len().over("v").alias("n"))["n"].to_numpy()


_H3_RES_MASK = np.uint64(0xF << 52)


def _h3_parent(cells: np.ndarray, res: int) -> np.ndarray:
    """Parents at ``res`` of uint64 H3 cells (each at a finer resolution): write the
    resolution field (bits 52-55) and set digits res+1..15 (3 bits each) to 7."""
    return (cells & ~_H3_RES_MASK) | np.uint64(res << 52) | np.uint64((1 << ((15 - res) * 3)) - 1)


def _latlng_to_cells(lat: np.ndarray, lon: np.ndarray, resolution: int) -> np.ndarray:
    """uint64 H3 cells (0 where a point has none), vectorised with polars-h3 when installed."""
    try:
        import polars_h3 as plh3
    except ImportError:  # pragma: no cover - fallback: h3-py per point
        from h3.api import numpy_int as h3i

        return np.fromiter((h3i.latlng_to_cell(a, o, resolution) for a, o in zip(lat.tolist(), lon.tolist())),
                           dtype=np.uint64, count=len(lat))
    out = pl.DataFrame({"lat": lat, "lon": lon}).select(plh3.latlng_to_cell("lat", "lon", resolution).alias("c"))["c"]
    return out.fill_null(0).cast(pl.UInt64).to_numpy().copy()


def _cells_to_strings(cells: np.ndarray) -> list[str | None]:
    """uint64 cells -> h3 hex strings (h3-py spelling), None for 0."""
    s = pl.Series("c", cells, dtype=pl.UInt64)
    try:
        import polars_h3 as plh3

        return s.to_frame().select(pl.when(pl.col("c") != 0).then(plh3.int_to_str("c")))["c"].to_list()
    except ImportError:  # pragma: no cover
        return [h3.int_to_str(int(c)) if c else None for c in cells]


def dataset_fingerprint(ids: list[str], cells: list[str]) -> str:
    h = hashlib.sha256()
    for i, c in sorted(zip(ids, cells)):
        h.update(f"{i}\t{c}\n".encode())
    return h.hexdigest()[:16]


def build_index(cfg, sources: list[str] | None = None, plot: bool = True) -> dict:
    """Write images.parquet, labels.json, stats.json and coverage.png; return stats."""
    paths = IndexPaths.from_config(cfg)
    ic = cfg.index
    df = collect_records(cfg.paths.data_dir, sources or cfg.index.sources or None)
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
    paths.splits.unlink(missing_ok=True)  # a split of the old image set is stale: `geolocate split` makes a new one
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
