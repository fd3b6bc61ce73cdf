"""Geo-intelligence ablation on the Earth benchmark: what each answer point is worth, 3 seeds, val and test.

The demo pipeline (``configs/demo.yaml``) is built once and trained once per seed (embeddings cached).
Each run reports, on the same val/test images:

- ``baseline``: the linear cell head answering with the top cell's anchor (what the project shipped);
- ``knn1``: the nearest training image (cosine, same embeddings);
- ``refine``: the same head, answer refined inside the top cells from the training gallery (parameters
  chosen on validation only);
- ``best``: whatever the run ships (refined when refinement beat the anchors on validation).

Writes ``bench/results/geo_ablation.json``: ``rows`` of ``{"variant", "seed", "split", "n", "median_km", "p90_km",
"acc_200km", "acc_2500km", "geoscore"}`` and a ``summary`` (mean ± std over seeds).

    python bench/bench_geo_ablation.py [--count 6000] [--seeds 0 1 2]
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

RESULTS = ROOT / "bench" / "results" / "geo_ablation.json"
KEYS = ("n", "median_km", "p90_km", "acc_200km", "acc_2500km", "geoscore")
VARIANTS = ("baseline", "knn1", "refine", "best")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=6000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from geolocate.runs.experiment import run_experiment

    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-geo-ablation-") as tmp_s:
        tmp = Path(tmp_s)
        cfg = workspace_config(args.config, tmp, args.count)
        cfg.eval.knn_k = 1
        build_earth(cfg)
        for seed in args.seeds:
            cfg.train.seed = seed
            s = json.loads((run_experiment(cfg) / "summary.json").read_text())
            abl = s["answer_point"]["ablation"]
            for split in ("val", "test"):
                tables = {"baseline": abl["cell_anchor"][split], "knn1": s["baselines"]["knn"][split],
                          "refine": abl.get("refined", {}).get(split), "best": s["metrics"][split]}
                for variant, m in tables.items():
                    if m is not None:
                        rows.append({"variant": variant, "seed": seed, "split": split, **{k: m[k] for k in KEYS}})
            print(f"seed {seed}: refined={s['answer_point']['refined']} params={s['answer_point']['params']}", flush=True)
    summary = []
    for split in ("val", "test"):
        for variant in VARIANTS:
            sel = [r for r in rows if r["variant"] == variant and r["split"] == split]
            if not sel:
                continue
            stat = {k: (float(np.mean([r[k] for r in sel])), float(np.std([r[k] for r in sel]))) for k in KEYS[1:]}
            summary.append({"variant": variant, "split": split, "seeds": len(sel), "n": sel[0]["n"],
                            **{k: f"{m:,.3f} ± {sd:,.3f}" if k.startswith("acc") else f"{m:,.0f} ± {sd:,.0f}" for k, (m, sd) in stat.items()}})
    result = {"benchmark": "geo_ablation",
              "what": f"{args.config.name} at {args.count} Earth patches, seeds {args.seeds}: answer point ablation (mean ± std)",
              "total_s": round(time.perf_counter() - t0, 1), "summary": summary, "rows": rows}
    write_json(args.out, result)
    print("\n| variant | split | median km | p90 km | ≤200 km | ≤2500 km | GeoScore |\n|---|---|---:|---:|---:|---:|---:|")
    for r in summary:
        print(f"| {r['variant']} | {r['split']} | {r['median_km']} | {r['p90_km']} | {r['acc_200km']} | {r['acc_2500km']} | {r['geoscore']} |")
    return result


if __name__ == "__main__":
    main()
