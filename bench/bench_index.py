"""Index build on 1M synthetic records: the real ``geolocate index`` + ``geolocate split`` against a polars read.

Synthetic street-view-like records (clusters of "cities", sequences of 6
consecutive rows, two sources) are written as ``data/records/<source>.jsonl``,
then, in one process, on one machine, at one time:

* a plain polars read of those files (``pl.read_ndjson`` with the record schema): the floor;
* the real ``build_index`` (records reader, H3 cells + merges, classes and medoid anchors, place names,
  stats, fingerprint, images.parquet / labels.json / stats.json) and ``make_splits`` (splits.parquet),
  with the coverage map timed separately;
* the former per-row loops (kept below as references) on a smaller sample, so each speed-up is a ratio.

Writes ``bench/results/index.json``.

    python bench/bench_index.py [--rows 1000000] [--compare-rows 100000] [--resolution 4]
"""
from __future__ import annotations

import argparse
import hashlib
import json
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

from geolocate.config import Config  # noqa: E402
from geolocate.index import build_index, make_splits  # noqa: E402
from geolocate.index.build import IndexPaths, assign_cells, dataset_fingerprint, plot_coverage  # noqa: E402
from geolocate.index.split import SPLITS, assign_splits  # noqa: E402
from geolocate.io import write_json  # noqa: E402
from geolocate.sources.base import RECORD_SCHEMA  # noqa: E402

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


def loop_fingerprint(ids, cells) -> str:
    """The former per-row fingerprint (sha256 over sorted 'id\\tcell\\n' lines, one update per row)."""
    h = hashlib.sha256()
    for i, c in sorted(zip(ids, cells)):
        h.update(f"{i}\t{c}\n".encode())
    return h.hexdigest()[:16]


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


def write_records(df: pl.DataFrame, data_dir: Path) -> list[Path]:
    """The synthetic rows as records files, one per source, paths relative to the data dir (as sources store them)."""
    rdir = data_dir / "records"
    rdir.mkdir(parents=True, exist_ok=True)
    recs = df.with_columns(pl.concat_str(pl.lit("raw/"), "source", pl.lit("/"), "id", pl.lit(".jpg")).alias("path"))
    files = []
    for (src,), part in sorted(recs.partition_by("source", as_dict=True).items()):
        part.select([c for c in RECORD_SCHEMA if c in part.columns]).write_ndjson(rdir / f"{src}.jsonl")
        files.append(rdir / f"{src}.jsonl")
    return files


def real_index(df: pl.DataFrame, resolution: int, min_samples: int, ratios) -> tuple[dict, dict]:
    """Polars read vs the real build_index + make_splits on the same records files; (timings s, stats)."""
    t: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        cfg = Config()
        cfg.paths.data_dir = str(Path(tmp) / "data")
        cfg.index.h3_resolution, cfg.index.min_cell_samples, cfg.index.split_ratios = resolution, min_samples, list(ratios)
        files = write_records(df, Path(cfg.paths.data_dir))
        read, t["polars_read_ndjson"] = timed(lambda: pl.concat([pl.read_ndjson(f, schema=RECORD_SCHEMA) for f in files]))
        stats, t["build_index"] = timed(build_index, cfg)
        splits, t["make_splits"] = timed(make_splits, cfg, plot=False)
        t["index_plus_split"] = t["build_index"] + t["make_splits"]
        paths = IndexPaths.from_config(cfg)
        images = pl.read_parquet(paths.images).join(pl.read_parquet(paths.splits), on="id")
        _, t["coverage_plot"] = timed(plot_coverage, images, paths.coverage)
        assert read.height == df.height and stats["images"] == images.height
        fp_loop, t["fingerprint_loop_(former)"] = timed(loop_fingerprint, images["id"].to_list(), images["cell"].to_list())
        fp_vec, t["fingerprint_vectorised"] = timed(dataset_fingerprint, images["id"], images["cell"])
        assert fp_loop == fp_vec == stats["fingerprint"], "vectorised fingerprint must equal the per-row one"
        stats["splits"] = splits
        stats["cell_resolutions"] = {int(k): int(v) for k, v in Counter(h3.get_resolution(c) for c in images["cell"].unique().to_list()).items()}
        stats["anchors"] = dict(Counter(c["anchor"] for c in json.loads(paths.labels.read_text())["classes"]))
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
    timings, stats = real_index(df, args.resolution, args.min_samples, ratios)
    ratio = timings["index_plus_split"] / timings["polars_read_ndjson"]
    ratio_plot = (timings["index_plus_split"] + timings["coverage_plot"]) / timings["polars_read_ndjson"]

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
    results = {
        "benchmark": "index_build",
        "what": f"{args.rows:,} synthetic records in 2 JSONL files (3000 Zipf cities, sequences of 6); real build_index + "
                f"make_splits, H3 res {args.resolution}, min_cell_samples {args.min_samples} (merge), splits {ratios}; "
                "against pl.read_ndjson of the same files",
        "rows": args.rows, "synthesis_s": round(t_synth, 3), "timings_s": timings,
        "ratio_index_split_vs_read": round(ratio, 2), "ratio_with_coverage_plot": round(ratio_plot, 2),
        "rows_per_s": round(args.rows / timings["index_plus_split"]),
        "stats": stats, "loop_vs_vectorised": compare,
        "headline": [
            {"name": f"geolocate index + split, {args.rows:,} records (real path, no plot)", "value": timings["index_plus_split"], "unit": "s"},
            {"name": "plain polars read of the same records", "value": timings["polars_read_ndjson"], "unit": "s"},
            {"name": "index + split / polars read", "value": round(ratio, 2), "unit": "x"},
            {"name": "coverage map (drawn once, by split)", "value": timings["coverage_plot"], "unit": "s"},
            {"name": f"assign_cells speed-up vs per-row loop ({args.compare_rows:,} rows)", "value": compare["assign_cells"]["speedup"], "unit": "x"},
            {"name": f"assign_splits speed-up vs per-sequence loop ({args.compare_rows:,} rows)", "value": compare["assign_splits"]["speedup"], "unit": "x"},
            {"name": "dataset_fingerprint vs the former per-row loop, same digest",
             "value": round(timings["fingerprint_loop_(former)"] / max(timings["fingerprint_vectorised"], 1e-9), 1), "unit": "x"},
        ],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    write_json(args.out, results)
    print(f"\n### Index build ({args.rows:,} synthetic records, H3 res {args.resolution})\n")
    print("| step | seconds |\n|---|---:|")
    for k, v in timings.items():
        print(f"| {k} | {v:.3f} |")
    print(f"\nindex + split = {ratio:.2f}x the polars read ({ratio_plot:.2f}x with the coverage map); "
          f"{stats['images']:,} images in {stats['cells']:,} cells (resolutions {stats['cell_resolutions']}, anchors {stats['anchors']}), "
          f"splits {stats['splits']}")
    print(f"\n| on {args.compare_rows:,} rows | loop s | vectorised s | speed-up |\n|---|---:|---:|---:|")
    for k in ("assign_cells", "assign_splits"):
        c = compare[k]
        print(f"| {k} | {c['loop_s']:.2f} | {c['vectorised_s']:.3f} | {c['speedup']:.0f}x |")
    print(f"\nwritten {args.out}")
    return results


if __name__ == "__main__":
    main()
