"""Index build on 1M synthetic metadata rows: H3 cells, splits, labels, stats — vectorised.

Synthetic street-view-like metadata (clusters of "cities", sequences of 6
consecutive rows) goes through the same steps as ``geolocate index`` +
``geolocate split``: ``assign_cells`` (H3 + merge of small cells into parents),
class numbering, ``assign_splits`` (sequence-aware), per-cell stats and the
dataset fingerprint, and writing images.parquet. On a smaller sample it also
runs the former per-row loops (kept below as references) so the speed-up is a
ratio measured in one process, on one machine, at one time.
Writes ``bench/results/index.json``.

    python bench/bench_index.py [--rows 1000000] [--compare-rows 100000] [--resolution 4]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import h3
import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from geolocate.index.build import assign_cells, dataset_fingerprint  # noqa: E402
from geolocate.index.split import SPLITS, assign_splits  # noqa: E402
from geolocate.io import write_json, write_parquet  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "index.json"


# ---- the former per-row implementations (references for the ratio) ----------------------
def loop_assign_cells(lat, lon, resolution, min_samples, policy):
    cells = [h3.latlng_to_cell(float(a), float(o), resolution) for a, o in zip(lat, lon)]
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


def loop_assign_splits(sequence_ids, ratios, seed):
    seq, sizes = np.unique(np.asarray(sequence_ids, dtype=object).astype(str), return_counts=True)
    order = np.random.default_rng(seed).permutation(len(seq))
    target = np.asarray(ratios, dtype=np.float64)
    filled = np.zeros(3)
    out = {}
    for i in order:
        total = filled.sum() + sizes[i]
        deficit = target * total - filled
        k = int(np.argmax(np.where(target > 0, deficit, -np.inf)))
        out[str(seq[i])] = SPLITS[k]
        filled[k] += sizes[i]
    return out


def fingerprint_vectorised(df: pl.DataFrame) -> str:
    """Same digest as ``dataset_fingerprint`` (sha256 over sorted 'id\\tcell\\n' lines) with one hash update."""
    text = df.select("id", "cell").sort("id", "cell").select(pl.concat_str("id", pl.lit("\t"), "cell", pl.lit("\n")).str.join(""))
    return hashlib.sha256(text.item().encode()).hexdigest()[:16]


# ---- synthetic metadata --------------------------------------------------------------------
def synthetic(n: int, seed: int = 0, cities: int = 3000, seq_len: int = 6) -> pl.DataFrame:
    """n rows clustered around `cities` centres (population ~ Zipf), sequences of seq_len rows."""
    rng = np.random.default_rng(seed)
    c_lat = np.degrees(np.arcsin(rng.uniform(-0.85, 0.95, cities)))
    c_lon = rng.uniform(-180, 180, cities)
    weight = 1.0 / np.arange(1, cities + 1) ** 0.9
    n_seq = -(-n // seq_len)
    city = rng.choice(cities, size=n_seq, p=weight / weight.sum())
    spread = rng.uniform(0.02, 0.4, n_seq)                              # degrees: ~2-40 km
    s_lat = c_lat[city] + rng.normal(0, 1, n_seq) * spread
    s_lon = c_lon[city] + rng.normal(0, 1, n_seq) * spread
    rep = np.repeat(np.arange(n_seq), seq_len)[:n]
    lat = np.clip(s_lat[rep] + rng.normal(0, 0.002, n), -89.9, 89.9)   # a sequence wanders ~200 m
    lon = (s_lon[rep] + rng.normal(0, 0.002, n) + 180) % 360 - 180
    ids = pl.int_range(0, n, eager=True).cast(pl.Utf8)
    return pl.DataFrame({
        "id": "img" + ids, "lat": lat, "lon": lon,
        "sequence_id": "seq" + pl.Series(rep).cast(pl.Utf8),
        "source": np.where(rng.uniform(size=n) < 0.9, "mapillary", "folder"),
    })


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def build(df: pl.DataFrame, resolution: int, min_samples: int, ratios) -> tuple[dict, dict]:
    """The index steps on one frame; returns (timings s, stats)."""
    t: dict[str, float] = {}
    cells, t["h3_cells_and_merge"] = timed(assign_cells, df["lat"].to_numpy(), df["lon"].to_numpy(), resolution, min_samples, "merge")
    t0 = time.perf_counter()
    df = df.with_columns(pl.Series("cell", cells, dtype=pl.Utf8)).filter(pl.col("cell").is_not_null())
    classes = df["cell"].unique().sort()
    df = df.join(pl.DataFrame({"cell": classes, "label": pl.int_range(0, len(classes), eager=True, dtype=pl.Int32)}), on="cell")
    t["labels"] = time.perf_counter() - t0
    mapping, t["splits"] = timed(assign_splits, df["sequence_id"], ratios, 0)
    t0 = time.perf_counter()
    df = df.with_columns(pl.col("sequence_id").replace_strict(mapping, return_dtype=pl.Utf8).alias("split"))
    t["splits"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    counts = df.group_by("label").len()["len"].to_numpy()
    stats = {
        "images": df.height, "cells": len(classes),
        "per_cell": {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())},
        "top_class_share": round(float(counts.max() / counts.sum()), 4),
        "sequences": int(df["sequence_id"].n_unique()),
        "sources": {k: int(v) for k, v in df.group_by("source").len().iter_rows()},
        "splits": {k: int(v) for k, v in df.group_by("split").len().iter_rows()},
        "cell_resolutions": {int(k): int(v) for k, v in Counter(h3.get_resolution(c) for c in classes.to_list()).items()},
    }
    t["stats"] = time.perf_counter() - t0
    stats["fingerprint"], t["fingerprint_vectorised"] = timed(fingerprint_vectorised, df)
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        _, t["write_parquet"] = timed(write_parquet, Path(tmp) / "images.parquet", df)
    t["total"] = sum(v for k, v in t.items())
    fp_loop, t["fingerprint_loop_(current)"] = timed(dataset_fingerprint, df["id"].to_list(), df["cell"].to_list())
    assert fp_loop == stats["fingerprint"], "vectorised fingerprint must equal the current one"
    return {k: round(v, 3) for k, v in t.items()}, stats


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--compare-rows", type=int, default=100_000, help="rows for the loop-vs-vectorised ratio")
    ap.add_argument("--resolution", type=int, default=4)
    ap.add_argument("--min-samples", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    ratios = [0.8, 0.15, 0.05]

    df, t_synth = timed(synthetic, args.rows)
    timings, stats = build(df, args.resolution, args.min_samples, ratios)

    # loop vs vectorised on the same sample, same process
    small = df.head(args.compare_rows)
    la, lo, seqs = small["lat"].to_numpy(), small["lon"].to_numpy(), small["sequence_id"].to_list()
    ref, t_loop_cells = timed(loop_assign_cells, la, lo, args.resolution, args.min_samples, "merge")
    vec, t_vec_cells = timed(assign_cells, la, lo, args.resolution, args.min_samples, "merge")
    assert ref == vec, "vectorised assign_cells differs from the loop"
    _, t_loop_splits = timed(loop_assign_splits, seqs, ratios, 0)
    _, t_vec_splits = timed(assign_splits, seqs, ratios, 0)
    compare = {
        "rows": args.compare_rows,
        "assign_cells": {"loop_s": round(t_loop_cells, 3), "vectorised_s": round(t_vec_cells, 3),
                         "speedup": round(t_loop_cells / t_vec_cells, 1), "identical": True},
        "assign_splits": {"loop_s": round(t_loop_splits, 3), "vectorised_s": round(t_vec_splits, 3),
                          "speedup": round(t_loop_splits / t_vec_splits, 1)},
    }
    rows_per_s = args.rows / timings["total"]
    results = {
        "benchmark": "index_build",
        "what": f"{args.rows:,} synthetic rows (3000 Zipf cities, sequences of 6); H3 res {args.resolution}, "
                f"min_cell_samples {args.min_samples} (merge), splits {ratios}",
        "rows": args.rows, "synthesis_s": round(t_synth, 3), "timings_s": timings, "rows_per_s": round(rows_per_s),
        "stats": stats, "loop_vs_vectorised": compare,
        "headline": [
            {"name": f"index build, {args.rows:,} rows (cells+labels+splits+stats+fingerprint+parquet)", "value": timings["total"], "unit": "s"},
            {"name": "of which H3 cells + merge", "value": timings["h3_cells_and_merge"], "unit": "s"},
            {"name": "of which sequence-aware splits", "value": timings["splits"], "unit": "s"},
            {"name": "index build throughput", "value": round(rows_per_s), "unit": "rows/s"},
            {"name": f"assign_cells speed-up vs per-row loop ({args.compare_rows:,} rows)", "value": compare["assign_cells"]["speedup"], "unit": "x"},
            {"name": f"assign_splits speed-up vs per-sequence loop ({args.compare_rows:,} rows)", "value": compare["assign_splits"]["speedup"], "unit": "x"},
            {"name": "dataset_fingerprint (current per-row loop) vs vectorised, same digest",
             "value": round(timings["fingerprint_loop_(current)"] / max(timings["fingerprint_vectorised"], 1e-9), 1), "unit": "x"},
        ],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    write_json(args.out, results)
    print(f"\n### Index build ({args.rows:,} synthetic rows, H3 res {args.resolution})\n")
    print("| step | seconds |\n|---|---:|")
    for k, v in timings.items():
        print(f"| {k} | {v:.3f} |")
    print(f"\n{stats['images']:,} images in {stats['cells']:,} cells (resolutions {stats['cell_resolutions']}), "
          f"splits {stats['splits']}")
    print(f"\n| on {args.compare_rows:,} rows | loop s | vectorised s | speed-up |\n|---|---:|---:|---:|")
    for k in ("assign_cells", "assign_splits"):
        c = compare[k]
        print(f"| {k} | {c['loop_s']:.2f} | {c['vectorised_s']:.3f} | {c['speedup']:.0f}x |")
    print(f"\nwritten {args.out}")
    return results


if __name__ == "__main__":
    main()
