"""The benchmark config over 3 seeds: the shipped answer, kNN and prior on val/test, and on the held-out rendering.

``configs/benchmark.yaml`` (36,000 Earth patches: 18,000 places cut from NASA shaded relief and Blue Marble) is
built once in ``--workspace`` (earth source -> index -> sequence-aware split; the embeddings and the augmented
copies are cached there, about 15 min on 2 cores the first time), then trained once per seed (``train.seed``
0, 1, 2: only the head is retrained). Each run's ``summary.json`` gives the shipped answer (reranking and
refinement as chosen on validation), the kNN (k=1, same embeddings) and prior rows on val and test.

Read the in-domain rows with care: at 18,000 land places, patches 220 km wide overlap their neighbours, so a test
patch shares pixels with training patches of other sequences, which is why kNN is about as good as the model.
The honest check is ``heldout_rendering``: every val/test place cut from ETOPO1 (``source.earth.heldout_imagery``,
written by the earth source to ``data/records_heldout/``, never indexed), embedded once, then scored per seed
through the run's model as shipped and through kNN on the training embeddings.

Writes ``bench/results/benchmark.json``: ``rows`` of ``{"seed", "predictor", "split", "shift", "n", "median_km",
"p90_km", "top1_acc", "geoscore"}`` and a ``summary`` of mean ± std over seeds.

    python bench/bench_benchmark.py [--seeds 0 1 2] [--config configs/benchmark.yaml] [--workspace DIR] [--count N]
"""
from __future__ import annotations

import argparse
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

from _workspace import build_earth, seed_spread, shipped_answers, workspace_config  # noqa: E402
from geolocate.io import write_json  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "benchmark.json"


def row(seed: int, predictor: str, split: str, shift: str, m: dict) -> dict:
    return {"seed": seed, "predictor": predictor, "split": split, "shift": shift, "n": int(m["n"]),
            "median_km": round(float(m["median_km"]), 1), "p90_km": round(float(m["p90_km"]), 1),
            "top1_acc": round(float(m["top1_acc"]), 4), "geoscore": round(float(m["geoscore"]), 1)}


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = dict.fromkeys((r["predictor"], r["split"], r["shift"]) for r in rows)
    for predictor, split, shift in keys:
        sel = [r for r in rows if (r["predictor"], r["split"], r["shift"]) == (predictor, split, shift)]
        out.append({"predictor": predictor, "split": split, "shift": shift, "seeds": len(sel), "n": sel[0]["n"],
                    **{k: seed_spread([r[k] for r in sel]) for k in ("median_km", "p90_km", "geoscore")},
                    "top1": seed_spread([r["top1_acc"] for r in sel], percent=True)})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "benchmark.yaml")
    ap.add_argument("--workspace", type=Path, default=None, help="keep the data and caches here (default: a temp dir)")
    ap.add_argument("--count", type=int, default=None, help="source.earth.count (default: the config's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import polars as pl

    from geolocate.evaluation import evaluate, knn_predict, prior_predict
    from geolocate.index import load_index
    from geolocate.io import read_json
    from geolocate.models import backbone_for, load_model
    from geolocate.runs.experiment import run_experiment
    from geolocate.serving import Geolocator
    from geolocate.sources.base import RecordPaths, heldout_records_dir, read_records_frame
    from geolocate.training.embeddings import cached_embeddings, embed_paths

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-benchmark-") as tmp_s:
        root = args.workspace or Path(tmp_s)
        cfg = workspace_config(args.config, root, args.count)
        index_file = Path(cfg.paths.data_dir) / "index" / "splits.parquet"
        t0 = time.perf_counter()
        if not index_file.is_file() or not (heldout_records_dir(cfg.paths.data_dir) / "earth.jsonl").is_file():
            build_earth(cfg)
        build_s = time.perf_counter() - t0
        df, labels, _ = load_index(cfg)
        df = df.filter(pl.col("split").is_not_null())
        cell_index = {c["cell"]: i for i, c in enumerate(labels["classes"])}
        class_lat = np.array([c["lat"] for c in labels["classes"]])
        class_lon = np.array([c["lon"] for c in labels["classes"]])
        n_cls = labels["num_classes"]
        backbone = backbone_for(cfg.model).eval()
        cache = Path(cfg.paths.data_dir) / "cache" / "embeddings"
        train = df.filter(pl.col("split") == "train")
        tr_feats, ok = cached_embeddings(backbone, train["id"].to_list(), train["path"].to_list(), cache)
        assert ok.all()
        # the held-out rendering of every val/test place (same place = same sequence and centre)
        held = read_records_frame(heldout_records_dir(cfg.paths.data_dir) / "earth.jsonl").with_columns(
            RecordPaths.of(cfg.paths.data_dir).resolve_expr("path"), pl.col("id").str.replace(r"-[a-z0-9]+$", "").alias("place"))
        parts = {}
        for split in ("val", "test"):
            part = df.filter(pl.col("split") == split).with_columns(pl.col("id").str.replace(r"-[a-z0-9]+$", "").alias("place"))
            places = part.unique("place", keep="first", maintain_order=True).select("place", "label")
            h = held.join(places, on="place", how="inner")
            feats, okh = embed_paths(backbone, h["path"].to_list(), desc=f"embedding held-out {split}", onnx_cache=cache / "onnx")
            assert okh.all()
            parts[split] = (h, feats)
        rows, run_s = [], []
        for seed in args.seeds:
            cfg.train.seed = seed
            cfg.validate()
            t_run = time.perf_counter()
            run_dir = run_experiment(cfg)
            run_s.append(round(time.perf_counter() - t_run, 1))
            summary = read_json(run_dir / "summary.json")
            for split in ("val", "test"):
                rows.append(row(seed, "model", split, "none", summary["metrics"][split]))
                for b in ("knn", "prior"):
                    rows.append(row(seed, b, split, "none", summary["baselines"][b][split]))
            model, _ = load_model(run_dir / "checkpoints" / "model.pt")
            geo = Geolocator.from_pretrained(run_dir / "checkpoints" / "model.pt", engine="torch")
            for split, (h, feats) in parts.items():
                y, la, lo = h["label"].to_numpy(), h["lat"].to_numpy(), h["lon"].to_numpy()
                scores, pla, plo, _ = shipped_answers(geo, model, feats, zip(la, lo), cell_index)
                rows.append(row(seed, "model", split, "heldout_rendering", evaluate(scores, y, la, lo, pla, plo, countries=False)))
                sc, kla, klo = knn_predict(tr_feats, train["label"].to_numpy(), train["lat"].to_numpy(), train["lon"].to_numpy(),
                                           feats, n_cls, k=cfg.eval.knn_k)
                rows.append(row(seed, "knn", split, "heldout_rendering", evaluate(sc, y, la, lo, kla, klo, countries=False)))
                sc, pla, plo = prior_predict(train["label"].to_numpy(), n_cls, len(y), class_lat, class_lon)
                rows.append(row(seed, "prior", split, "heldout_rendering", evaluate(sc, y, la, lo, pla, plo, countries=False)))
            print(f"seed {seed}: test median {summary['metrics']['test']['median_km']:,.0f} km ({run_s[-1]:.0f} s)", flush=True)
            result = {
                "benchmark": "benchmark_config",
                "what": f"{args.config.name}: {cfg.source.earth.count} Earth patches ({', '.join(cfg.source.earth.imagery)}), "
                        f"head {cfg.model.head}, augment.copies {cfg.augment.copies}, seeds {args.seeds}; model = the run's "
                        f"shipped answer, kNN k={cfg.eval.knn_k} on the same embeddings, prior; heldout_rendering = every "
                        f"val/test place cut from {cfg.source.earth.heldout_imagery}, never trained on; mean ± std over seeds",
                "dataset": summary["dataset"],
                "build_s": round(build_s, 1), "run_s": run_s, "total_s": round(time.perf_counter() - t_all, 1),
                "complete": seed == args.seeds[-1],
                "summary": summarise(rows),
                "rows": rows,
            }
            write_json(args.out, result)
    print("\n| predictor | split | shift | median km | p90 km | top-1 | GeoScore |\n|---|---|---|---:|---:|---:|---:|")
    for s in result["summary"]:
        print(f"| {s['predictor']} | {s['split']} | {s['shift']} | {s['median_km']} | {s['p90_km']} | {s['top1']} | {s['geoscore']} |")
    return result


if __name__ == "__main__":
    main()
