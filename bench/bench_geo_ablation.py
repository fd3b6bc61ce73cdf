"""Geo-intelligence ablation on the Earth benchmark: each head and tool alone, then the best on validation; 3 seeds.

The demo pipeline (``configs/demo.yaml``) is built once; every variant trains on the same cached embeddings, per seed:

- ``baseline``: the linear cell head answering with the top cell's anchor (what the project shipped);
- ``knn1``: the nearest training image (cosine, same embeddings);
- ``refine``: the linear head, answer refined inside the top cells from the training gallery (parameters chosen
  on validation only);
- ``hierarchical`` (res 0 -> res 1, joint p(parent)·p(cell | parent)), ``hierarchical_mask`` (cells outside the
  top 3 parents masked), ``offset`` (cell + in-cell offset regression), ``gps`` (cell + coordinate regression),
  ``hard_negatives`` (oversampling of confused cell pairs), ``adjacency`` (H3 ring-1 soft targets instead of
  the haversine ``geo`` loss): each alone, answering with its own point;
  ``offset_hard_negatives``: the offset head trained with hard negatives;
- ``<variant>+refine``: that variant with refinement;
- decode-time reranking (``geolocate.tasks.rerank``, parameters chosen on validation): ``<variant>+prior`` (training
  cell frequencies), ``+smooth`` (top-k geographic smoothing), ``+feature`` (gated gallery-similarity reranking),
  each alone where it helped validation; ``+rerank`` the chain the run chose, ``+rerank+refine`` with refinement on
  top (the baseline's rows drop the ``baseline+`` prefix: ``prior``, ``smooth``, ``rerank``, ...);
- ``best``: per seed, the configuration with the lowest **validation** median among all of the above (test reported).

Writes ``bench/results/geo_ablation.json``: ``rows`` of ``{"variant", "seed", "split", "n", "median_km", "p90_km",
"acc_200km", "acc_2500km", "geoscore"}``, the ``summary`` (mean ± std over seeds) and which configuration won per seed.

    python bench/bench_geo_ablation.py [--count 6000] [--seeds 0 1 2] [--variants baseline offset ...] [--merge]
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
# variant -> config overrides (on top of configs/demo.yaml); every run also measures itself refined
RUNS: dict[str, dict[str, object]] = {
    "baseline": {},
    "hierarchical": {"model.head": "hierarchical", "model.levels": [0]},
    "hierarchical_mask": {"model.head": "hierarchical", "model.levels": [0], "model.hierarchy_mode": "mask"},
    "offset": {"model.head": "offset"},
    "gps": {"model.head": "gps"},
    "hard_negatives": {"train.hard_negatives": 1.0},
    "adjacency": {"train.loss": "adjacency"},  # H3 ring-1 soft targets instead of the haversine-smoothed geo loss
    "offset_hard_negatives": {"model.head": "offset", "train.hard_negatives": 1.0},  # the two best tools together
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=6000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--merge", action="store_true", help="replace only the given variants' rows in --out")
    args = ap.parse_args(argv)
    from geolocate.config import Config
    from geolocate.runs.experiment import run_experiment

    t0 = time.perf_counter()
    rows, winners = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-geo-ablation-") as tmp_s:
        tmp = Path(tmp_s)
        base = workspace_config(args.config, tmp, args.count)
        base.eval.knn_k = 1
        base.eval.refine = "always"  # measure every variant both ways; "best" picks on validation below
        base.train.hard_negatives = 0.0  # each tool alone: the variants that want hard negatives set them
        build_earth(base)
        for seed in args.seeds:
            candidates = {}  # name -> {split: metrics}
            for variant in args.variants:
                cfg = Config.from_dict(base.to_dict())
                cfg.train.seed = seed
                for k, v in RUNS[variant].items():
                    cfg.set(f"{k}={json.dumps(v)}")
                cfg.validate()
                s = json.loads((run_experiment(cfg) / "summary.json").read_text())
                abl = s["answer_point"]["ablation"]
                own = abl["head_point"] if abl.get("head_point") else abl["cell_anchor"]
                candidates[variant] = own
                for key, suffix in (("refined", "refine"), ("reranked", "rerank"), ("reranked_refined", "rerank+refine"),
                                    *((k, k.removeprefix("rerank_")) for k in abl if k.startswith("rerank_"))):
                    if abl.get(key):
                        candidates[f"{variant}+{suffix}"] = abl[key]
                if variant == "baseline":
                    candidates["knn1"] = s["baselines"]["knn"]
                print(f"seed {seed} {variant}: val {own['val']['median_km']:,.0f} km, refined "
                      f"{abl.get('refined', {}).get('val', {}).get('median_km', float('nan')):,.0f} km", flush=True)
            for name, m in candidates.items():
                for split in ("val", "test"):
                    rows.append({"variant": name.removeprefix("baseline+"), "seed": seed, "split": split,
                                 **{k: m[split][k] for k in KEYS}})
    if args.merge and args.out.is_file():  # keep the other variants' rows of an earlier run
        rerun = {r["variant"] for r in rows}
        rows = [r for r in json.loads(args.out.read_text())["rows"] if r["variant"] not in rerun | {"best"}] + rows
    rows = [r for r in rows if r["variant"] != "best"]
    for seed in sorted({r["seed"] for r in rows}):
        val = {r["variant"]: r for r in rows if r["seed"] == seed and r["split"] == "val" and r["variant"] != "knn1"}
        pick = min(val, key=lambda n: val[n]["median_km"])
        winners[seed] = pick
        rows += [{**r, "variant": "best"} for r in rows if r["seed"] == seed and r["variant"] == pick]
        print(f"seed {seed}: best on validation = {pick}", flush=True)
    summary = []
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for split in ("val", "test"):
        for variant in variants:
            sel = [r for r in rows if r["variant"] == variant and r["split"] == split]
            if not sel:
                continue
            stat = {k: (float(np.mean([r[k] for r in sel])), float(np.std([r[k] for r in sel]))) for k in KEYS[1:]}
            summary.append({"variant": variant, "split": split, "seeds": len(sel), "n": sel[0]["n"],
                            **{k: f"{m:,.3f} ± {sd:,.3f}" if k.startswith("acc") else f"{m:,.0f} ± {sd:,.0f}" for k, (m, sd) in stat.items()}})
    result = {"benchmark": "geo_ablation",
              "what": f"{args.config.name} at {args.count} Earth patches, seeds {args.seeds}: heads, tools and answer points (mean ± std)",
              "total_s": round(time.perf_counter() - t0, 1), "best_on_validation": winners, "runs": RUNS,
              "summary": summary, "rows": rows}
    write_json(args.out, result)
    print("\n| variant | split | median km | p90 km | ≤200 km | ≤2500 km | GeoScore |\n|---|---|---:|---:|---:|---:|---:|")
    for r in summary:
        print(f"| {r['variant']} | {r['split']} | {r['median_km']} | {r['p90_km']} | {r['acc_200km']} | {r['acc_2500km']} | {r['geoscore']} |")
    return result


if __name__ == "__main__":
    main()
