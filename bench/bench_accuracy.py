"""Accuracy on the Earth benchmark: model vs prior vs kNN retrieval, at two dataset sizes.

Runs the real pipeline (earth source -> index -> sequence-aware split ->
``run_experiment``) with the demo config (``configs/demo.yaml``: frozen
EfficientNet-Lite0 embeddings, linear cell head, haversine soft targets, H3
res 1) at each ``--sizes`` patch count, in a temp dir. The model, the prior
(most frequent training cell) and kNN retrieval (nearest training image on the
same embeddings) are evaluated on the same val/test images.

The Earth patches are drawn from one seeded plan, so the smaller dataset is a
prefix of the larger one: the images are cut once (largest size) and the
embedding cache of one size is reused by the next, so each image is embedded
once. Writes ``bench/results/accuracy.json``.

    python bench/bench_accuracy.py [--sizes 3000 6000] [--config configs/demo.yaml] [--epochs N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GEOLOCATE_PROGRESS", "0")

from geolocate.config import Config  # noqa: E402
from geolocate.index import build_index, make_splits  # noqa: E402
from geolocate.io import write_json  # noqa: E402
from geolocate.runs.experiment import run_experiment  # noqa: E402
from geolocate.sources import get_source  # noqa: E402
from geolocate.sources.base import SourceResult, save_source_records  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "accuracy.json"
KEYS = ["n", "top1_acc", "top5_acc", "median_km", "p90_km", "acc_200km", "acc_750km", "acc_2500km", "geoscore", "country_acc"]


def configure(base: Path, root: Path, size: int, epochs: int | None) -> Config:
    cfg = Config.load(base)
    cfg.paths.data_dir = str(root / "data")
    cfg.paths.runs_dir = str(root / "runs")
    cfg.paths.models_dir = str(root / "models")
    cfg.paths.exports_dir = str(root / "exports")
    cfg.source.earth.count = size
    if epochs:
        cfg.train.epochs = epochs
    return cfg


def run_size(base: Path, tmp: Path, size: int, records, prev_cache: Path | None, epochs: int | None) -> tuple[dict, Path]:
    root = tmp / f"n{size}"
    cfg = configure(base, root, size, epochs)
    save_source_records(cfg, "earth", SourceResult(records=records[:size]))
    cache = Path(cfg.paths.data_dir) / "cache" / "embeddings"
    if prev_cache and prev_cache.is_dir():
        shutil.copytree(prev_cache, cache, dirs_exist_ok=True)
    t0 = time.perf_counter()
    stats = build_index(cfg, plot=False)
    counts = make_splits(cfg)
    t_index = time.perf_counter() - t0
    run_dir = run_experiment(cfg)
    s = json.loads((run_dir / "summary.json").read_text())
    pick = lambda m: {k: m.get(k) for k in KEYS}  # noqa: E731
    out = {
        "patches": size, "images": s["dataset"]["images"], "cells": s["dataset"]["cells"], "splits": counts,
        "dropped_small_cells": stats["dropped_small_cells"], "h3_resolution": s["dataset"]["h3_resolution"],
        "index_s": round(t_index, 2), "run_s": s["wall_time_s"], "epochs_run": s["training"]["epochs_run"],
        "best_epoch": s["training"]["best_epoch"],
        "test": {"model": pick(s["metrics"]["test"]), "knn": pick(s["baselines"]["knn"]["test"]), "prior": pick(s["baselines"]["prior"]["test"])},
        "val": {"model": pick(s["metrics"]["val"]), "knn": pick(s["baselines"]["knn"]["val"]), "prior": pick(s["baselines"]["prior"]["val"])},
        "config": s["config"],
    }
    return out, cache


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[3000, 6000])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs (default: the config's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    sizes = sorted(args.sizes)
    t_all = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp_s:
        tmp = Path(tmp_s)
        pool_cfg = configure(args.config, tmp / "pool", sizes[-1], args.epochs)
        t0 = time.perf_counter()
        records = get_source("earth")(pool_cfg, tmp / "pool" / "raw" / "earth").records
        t_cut = time.perf_counter() - t0
        cache = None
        for size in sizes:
            print(f"\n--- accuracy: {size} patches ---", flush=True)
            r, cache = run_size(args.config, tmp, size, records, cache, args.epochs)
            runs.append(r)
    results = {
        "benchmark": "accuracy_earth",
        "what": f"Earth patches (NASA imagery, aerial) at {', '.join(map(str, sizes))} patches; {args.config.name} "
                f"(frozen EfficientNet-Lite0 + linear head, {runs[0]['config']['loss']} loss, H3 res {runs[0]['h3_resolution']}); "
                "model vs prior vs kNN on the same embeddings and images",
        "cut_images_s": round(t_cut, 1), "total_s": round(time.perf_counter() - t_all, 1), "runs": runs,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    head = []
    for r in runs:
        for split in ("test", "val"):
            m = r[split]
            n = m["model"]["n"]
            head.append({"name": f"{r['patches']} patches ({r['cells']} cells), {split} n={n}: median km model / kNN / prior",
                         "value": " / ".join(f"{m[p]['median_km']:,.0f}" for p in ("model", "knn", "prior")), "unit": "km"})
            head.append({"name": f"{r['patches']} patches, {split}: top-1 model / kNN / prior",
                         "value": " / ".join(f"{100 * m[p]['top1_acc']:.1f}" for p in ("model", "knn", "prior")), "unit": "%"})
            head.append({"name": f"{r['patches']} patches, {split}: ≤750 km model / kNN / prior",
                         "value": " / ".join(f"{100 * m[p]['acc_750km']:.1f}" for p in ("model", "knn", "prior")), "unit": "%"})
        head.append({"name": f"{r['patches']} patches: pipeline wall time (index + run)", "value": round(r["index_s"] + r["run_s"], 1), "unit": "s"})
    results["headline"] = head
    write_json(args.out, results)
    print("\n### Accuracy on the Earth benchmark\n")
    print("| patches | cells | split | n | predictor | top-1 | top-5 | median km | p90 km | ≤750 km | ≤2500 km | GeoScore |")
    print("|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        for split in ("test", "val"):
            for p in ("model", "knn", "prior"):
                m = r[split][p]
                print(f"| {r['patches']} | {r['cells']} | {split} | {m['n']} | {p} | {100 * m['top1_acc']:.1f}% | {100 * m['top5_acc']:.1f}% | "
                      f"{m['median_km']:,.0f} | {m['p90_km']:,.0f} | {100 * m['acc_750km']:.1f}% | {100 * m['acc_2500km']:.1f}% | {m['geoscore']:,.0f} |")
    print(f"\nwritten {args.out}")
    return results


if __name__ == "__main__":
    main()
