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
import json
import os
from pathlib import Path

import h3
import numpy as np
import polars as pl

from ..geo import place_names, valid_latlon
from ..io import read_json, save_figure, write_json, write_parquet, write_text
from ..sources.base import RECORD_SCHEMA, RecordPaths, read_records_frame, records_dir


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
    """Every record of every (or the named) source, deduplicated by id (last wins); paths in stored form."""
    rdir = records_dir(data_dir)
    files = sorted(rdir.glob("*.jsonl")) if rdir.is_dir() else []
    if sources:
        files = [f for f in files if f.stem in sources]
    frames = [read_records_frame(f) for f in files]
    df = pl.concat(frames) if frames else pl.DataFrame(schema=RECORD_SCHEMA)
    if df.height == 0:
        raise FileNotFoundError(f"no image records under {rdir}: run `geolocate build-dataset` first")
    rp = RecordPaths.of(data_dir)
    df = df.with_columns(rp.store_expr("path"))
    if df["id"].n_unique() < df.height:  # counting is several times cheaper than deduplicating
        df = df.unique(subset="id", keep="last", maintain_order=True)
    _warn_foreign_paths(df, rp)
    return df


def _warn_foreign_paths(df: pl.DataFrame, rp: RecordPaths) -> None:
    """One line per source whose records name absolute files that are gone (records of a moved checkout)."""
    from ..progress import console, tagged

    outside = df.filter(pl.col("path").str.starts_with("/")).select("source", "path")
    gone = outside.filter(pl.Series([not os.path.exists(p) for p in outside["path"].to_list()], dtype=pl.Boolean))
    for (src,), part in sorted(gone.partition_by("source", as_dict=True).items(), key=lambda kv: str(kv[0])):
        console.print(tagged("warning", f"{part.height} {src} records point at missing files outside {rp.data_dir} "
                                        f"(e.g. {part['path'][0]}): records of a moved checkout? rebuild them with "
                                        f"`geolocate build-dataset --source {src}`"), highlight=False, soft_wrap=True)


def assign_cells(lat: np.ndarray, lon: np.ndarray, resolution: int, min_samples: int, policy: str) -> list[str | None]:
    """H3 class cell per point after merging/dropping small cells (None = dropped); see :func:`assign_cell_series`."""
    return assign_cell_series(lat, lon, resolution, min_samples, policy).to_list()


def assign_cell_series(lat: np.ndarray, lon: np.ndarray, resolution: int, min_samples: int, policy: str) -> pl.Series:
    """H3 class cell per point (Utf8 series, null = dropped) after merging/dropping small cells.

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


def _cells_to_strings(cells: np.ndarray) -> pl.Series:
    """uint64 cells -> h3 hex strings (h3-py spelling), null for 0."""
    s = pl.Series("cell", cells, dtype=pl.UInt64)
    try:
        import polars_h3 as plh3

        return s.to_frame().select(pl.when(pl.col("cell") != 0).then(plh3.int_to_str("cell")))["cell"]
    except ImportError:  # pragma: no cover
        return pl.Series("cell", [h3.int_to_str(int(c)) if c else None for c in cells], dtype=pl.Utf8)


def dataset_fingerprint(ids, values) -> str:
    """sha256 over the sorted ``id\tvalue\n`` lines (16 hex digits); vectorised, ids and values as lists or Series."""
    df = pl.DataFrame({"id": ids, "v": values}, schema={"id": pl.Utf8, "v": pl.Utf8})
    text = df.sort("id", "v").select(pl.concat_str("id", pl.lit("\t"), "v", pl.lit("\n")).str.join("")).item()
    return hashlib.sha256((text or "").encode()).hexdigest()[:16]


def to_unit(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.c_[np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)]


def medoid(lat: np.ndarray, lon: np.ndarray, max_points: int = 1024) -> int:
    """Index of the point minimising the sum of great-circle distances to the others (over a seeded sample
    of ``max_points`` when there are more: the sum's minimiser barely moves, the cost stays bounded)."""
    idx = np.arange(len(lat))
    if len(idx) > max_points:
        idx = np.sort(np.random.default_rng(0).choice(len(idx), max_points, replace=False))
    u = to_unit(lat[idx], lon[idx])
    angles = np.arccos(np.clip(u @ u.T, -1.0, 1.0))
    return int(idx[np.argmin(angles.sum(axis=1))])


def class_anchors(labels: np.ndarray, lat: np.ndarray, lon: np.ndarray, classes: list[str], resolution: int) -> list[dict]:
    """The point each class answers with: its cell's centroid for a cell at ``resolution``; for a merged
    (coarser) class, whose cell lost the area of its big-enough children to classes of their own, the medoid
    of its images."""
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(len(classes) + 1))
    out = []
    for k, c in enumerate(classes):
        if h3.get_resolution(c) >= resolution:
            la, lo = h3.cell_to_latlng(c)
            out.append({"lat": la, "lon": lo, "anchor": "centroid"})
            continue
        rows = order[starts[k]:starts[k + 1]]
        m = rows[medoid(lat[rows], lon[rows])]
        out.append({"lat": float(lat[m]), "lon": float(lon[m]), "anchor": "medoid"})
    return out


def build_index(cfg, sources: list[str] | None = None, plot: bool = False) -> dict:
    """Write images.parquet, labels.json and stats.json; return stats. The coverage map is drawn by
    :func:`~geolocate.index.split.make_splits` (coloured by split), or here with ``plot=True``."""
    paths = IndexPaths.from_config(cfg)
    ic = cfg.index
    df = collect_records(cfg.paths.data_dir, sources or cfg.index.sources or None)
    records_per_source = {k: int(v) for k, v in df.group_by("source").len().sort("source").iter_rows()}
    ok = valid_latlon(df["lat"].to_numpy(), df["lon"].to_numpy())
    n_bad = int((~ok).sum())
    df = df.filter(pl.Series(ok))
    cells = assign_cell_series(df["lat"].to_numpy(), df["lon"].to_numpy(), ic.h3_resolution, ic.min_cell_samples, ic.small_cells)
    df = df.with_columns(cells.cast(pl.Utf8).alias("cell"))
    n_dropped = int(df["cell"].null_count())
    df = df.filter(pl.col("cell").is_not_null())
    if df.height == 0:
        raise ValueError(f"no images left after min_cell_samples={ic.min_cell_samples}: lower it or add data")
    classes = df["cell"].unique().sort()
    df = df.join(pl.DataFrame({"cell": classes, "label": pl.int_range(0, len(classes), eager=True, dtype=pl.Int32)}),
                 on="cell", how="left", maintain_order="left")
    classes = classes.to_list()
    counts = df.group_by("label").len().sort("label")["len"].to_numpy()
    anchors = class_anchors(df["label"].to_numpy(), df["lat"].to_numpy(), df["lon"].to_numpy(), classes, ic.h3_resolution)
    names = place_names([(a["lat"], a["lon"]) for a in anchors])
    labels = {
        "h3_resolution": ic.h3_resolution,
        "num_classes": len(classes),
        "classes": [
            {"index": i, "cell": c, "resolution": h3.get_resolution(c), "lat": round(a["lat"], 6), "lon": round(a["lon"], 6),
             "anchor": a["anchor"], "place": nm["label"], "count": int(n)}
            for i, (c, a, nm, n) in enumerate(zip(classes, anchors, names, counts))
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
        "sources": {k: int(v) for k, v in df.group_by("source").len().sort("source").iter_rows()},
        "records_per_source": records_per_source,
        "h3_resolution": ic.h3_resolution,
        "min_cell_samples": ic.min_cell_samples,
        "small_cells": ic.small_cells,
        "fingerprint": dataset_fingerprint(df["id"], df["cell"]),
    }
    # a split (and its coverage map) of the old image set is stale: `geolocate split` makes new ones
    paths.splits.unlink(missing_ok=True)
    paths.coverage.unlink(missing_ok=True)
    write_parquet(paths.images, df)
    write_text(paths.labels, labels_json(labels))
    write_json(paths.stats, stats)
    if plot:
        plot_coverage(df, paths.coverage)
    return stats


def labels_json(labels: dict) -> str:
    """labels.json with one class per line: readable, and written by the C encoder (an indented dump of 16k
    classes takes the pure-Python one, ~1 s)."""
    head = {k: v for k, v in labels.items() if k != "classes"}
    rows = ",\n".join("    " + json.dumps(c, allow_nan=False) for c in labels["classes"])
    return json.dumps(head, indent=2)[:-2] + ',\n  "classes": [\n' + rows + "\n  ]\n}\n"


def load_index(cfg) -> tuple[pl.DataFrame, dict, dict]:
    """(images joined with splits when present, labels, stats); image paths are real paths."""
    paths = IndexPaths.from_config(cfg)
    if not paths.images.exists():
        raise FileNotFoundError(f"no index at {paths.root}: run `geolocate index` first")
    df = pl.read_parquet(paths.images).with_columns(RecordPaths.of(cfg.paths.data_dir).resolve_expr("path"))
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
