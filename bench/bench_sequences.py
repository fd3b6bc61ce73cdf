"""Sequence-aware inference on the Earth benchmark: one answer per sequence vs each frame alone, on real pixels.

The Earth source groups its patches into sequences (``sequence_size`` neighbouring places, each cut from every
rendering: one "drive"); the sequence-aware split keeps sequences whole. The demo pipeline
(``configs/demo.yaml``) is built and trained once; then every val and test frame goes through the shipped
predictor (``Geolocator.predict_sequences``: image -> engine -> probabilities + features -> refinement), once
per combiner setting:

- ``per_frame``: each frame's own answer (what ``geolocate predict`` gives without ``--sequence``);
- ``<combiner>``: the sequence's one answer (the frames' probabilities combined by a registered combiner of
  ``geolocate.tasks.combine``, their features averaged for refinement), scored against every frame's position.

The setting is chosen on validation (lowest median km); test is only reported. Writes
``bench/results/sequences.json``.

    python bench/bench_sequences.py [--count 6000] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GEOLOCATE_PROGRESS", "0")

from _workspace import build_earth, workspace_config  # noqa: E402
from geolocate.io import write_json  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "sequences.json"
SETTINGS = [("mean_prob", {}), ("rank", {})] + [
    ("sum_logprob", {"temperature": t, "floor": f}) for t in (1.0, 2.0, 4.0, 12.0) for f in (1e-4, 1e-3, 1e-2)]


def _label(name: str, params: dict) -> str:
    return name + "".join(f" {k}={v:g}" for k, v in params.items())


def _sequences(df, split: str):
    import polars as pl

    part = df.filter(pl.col("split") == split).sort("sequence_id", "id")
    return [(s, g["path"].to_list(), list(zip(g["lat"].to_list(), g["lon"].to_list())))
            for (s,), g in part.group_by("sequence_id", maintain_order=True)]


def _stats(d) -> dict:
    from geolocate.evaluation.metrics import distance_metrics

    m = distance_metrics(np.asarray(d, float))
    return {k: round(m[k], 4 if k.startswith("acc") else 1) for k in ("n", "median_km", "mean_km", "p90_km", "acc_200km", "acc_750km", "geoscore")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--workspace", type=Path, default=None, help="keep the built data/run here (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from geolocate.index.build import load_index
    from geolocate.runs.experiment import run_experiment
    from geolocate.serving import Geolocator

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-sequences-") as tmp_s:
        root = args.workspace or Path(tmp_s)
        cfg = workspace_config(args.config, root, args.count)
        cfg.train.seed = args.seed
        run = sorted((root / "runs").glob("*/checkpoints/model.pt")) if args.workspace else []
        if not run:
            build_earth(cfg)
            model = run_experiment(cfg) / "checkpoints" / "model.pt"
        else:
            model = run[-1]
        t_train = time.perf_counter() - t0
        df = load_index(cfg)[0]
        geo = Geolocator.from_pretrained(model)
        splits = {s: _sequences(df, s) for s in ("val", "test")}
        rows, frame_km = [], {}
        for split, seqs in splits.items():
            for i, (name, params) in enumerate(SETTINGS):
                out = geo.predict_sequences(seqs, top_k=1, combiner=name, combiner_params=params)
                seq_km = [e for sp in out for e in sp.frame_errors_km]
                if i == 0:
                    frame_km[split] = [f.error_km for sp in out for f in sp.frames]
                    rows.append({"split": split, "variant": "per_frame", "sequences": len(seqs), **_stats(frame_km[split])})
                rows.append({"split": split, "variant": _label(name, params), "sequences": len(seqs), **_stats(seq_km)})
                print(f"{split} {_label(name, params)}: median {rows[-1]['median_km']:,.0f} km "
                      f"(per frame {_stats(frame_km[split])['median_km']:,.0f} km)", flush=True)
    val = {r["variant"]: r for r in rows if r["split"] == "val" and r["variant"] != "per_frame"}
    chosen = min(val, key=lambda v: (val[v]["median_km"], -val[v]["geoscore"]))
    pick = {s: {r["variant"]: r for r in rows if r["split"] == s} for s in ("val", "test")}
    result = {
        "benchmark": "sequences",
        "what": (f"{args.config.name} at {args.count} Earth patches (sequence_size {cfg.source.earth.sequence_size} places x "
                 f"{len(cfg.source.earth.imagery)} renderings), seed {args.seed}: per-frame answers vs one answer per sequence; "
                 "the setting chosen on val"),
        "model": {"run_id": geo.info.get("meta", {}).get("run_id"), "refined": geo.gallery is not None},
        "chosen_on_val": chosen,
        "headline": {s: {"per_frame_median_km": pick[s]["per_frame"]["median_km"], "sequence_median_km": pick[s][chosen]["median_km"],
                         "per_frame_geoscore": pick[s]["per_frame"]["geoscore"], "sequence_geoscore": pick[s][chosen]["geoscore"],
                         "frames": pick[s]["per_frame"]["n"], "sequences": pick[s]["per_frame"]["sequences"]}
                     for s in ("val", "test")},
        "train_s": round(t_train, 1), "total_s": round(time.perf_counter() - t0, 1), "rows": rows,
    }
    write_json(args.out, result)
    print(f"\nchosen on val: {chosen}")
    print("\n| variant | split | frames | median km | p90 km | ≤200 km | ≤750 km | GeoScore |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['split']} | {r['n']} | {r['median_km']:,.0f} | {r['p90_km']:,.0f} | {r['acc_200km']:.3f} | "
              f"{r['acc_750km']:.3f} | {r['geoscore']:,.0f} |")
    return result


if __name__ == "__main__":
    main()
