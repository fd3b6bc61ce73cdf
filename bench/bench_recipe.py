"""Training recipe (issue 13): which validation signal keeps the epoch and stops early, across seeds.

On one index and split (the demo's: ``configs/demo.yaml``, 6000 Earth patches,
built under ``--root`` when not there), the head trains over the cached frozen
EfficientNet-Lite0 embeddings for the full ``train.epochs`` once per seed,
exactly as ``run_experiment`` would (same seeding, same ``Trainer``), keeping
every epoch's val and test logits. Early stopping only truncates a
trajectory, so every candidate recipe (an ``EarlyStopping``: monitor,
smoothing, patience, min epochs) is replayed on it exactly: the epoch where
it stops, the epoch it keeps, and that epoch's val and test metrics.

The recipe is chosen on validation only, and fairly: a recipe that selects
on the val median would otherwise look best on the val median just by
picking its luckiest epoch. So the val split is cut in two halves by
sequence; the recipe's monitor reads one half, the kept epoch is scored on
the other, and both ways are averaged (``val_cv``). Test is reported, never
used to decide.

Also measured: seconds per trajectory and the first epoch where the same
seed diverges with 1 vs 2 torch threads, and whether a repeat is bit-identical.
``--runs LABEL=DIR`` adds real runs (their summaries), e.g. of the code at 40f0947
or of the new defaults; ``--retabulate`` rebuilds the tables from the rows
already in ``--out`` without training again.
Writes ``bench/results/recipe.json``.

    python bench/bench_recipe.py [--root /tmp/demo-b] [--seeds 0 1 2 3 4] [--runs old@40f0947=DIR] [--retabulate]
"""
from __future__ import annotations

import argparse
import dataclasses as dc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GEOLOCATE_PROGRESS", "0")

from geolocate.config import Config  # noqa: E402
from geolocate.index import build_index, load_index, make_splits  # noqa: E402
from geolocate.io import write_json  # noqa: E402
from geolocate.labels import LabelSpace  # noqa: E402
from geolocate.models import CellHead, GeoOutput, create_backbone  # noqa: E402
from geolocate.runs.experiment import _split  # noqa: E402
from geolocate.sources import get_source  # noqa: E402
from geolocate.training import Split, Trainer, cached_embeddings, seed_everything  # noqa: E402
from geolocate.training.loop import EarlyStopping  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "recipe.json"
NO_STOP = 10_000
_TC = Config().train
# name -> EarlyStopping(monitor, patience, min_epochs, ema); "old" is the loop as at 40f0947, "new" today's defaults
CANDIDATES: dict[str, tuple[str, int, int, float]] = {
    "old": ("val_median_km", 12, 0, 0.0),
    "new": (_TC.monitor, _TC.patience, _TC.min_epochs, _TC.monitor_ema),
    "median_no_stop": ("val_median_km", NO_STOP, 0, 0.0),
    "median_ema0.8": ("val_median_km", 12, 0, 0.8),
    "loss": ("val_loss", 12, 0, 0.0),
    "loss_no_stop": ("val_loss", NO_STOP, 0, 0.0),
    "geoscore": ("val_geoscore", 12, 0, 0.0),
    "geoscore_min30": ("val_geoscore", 12, 30, 0.0),
    "geoscore_ema0.5": ("val_geoscore", 12, 0, 0.5),
    "geoscore_no_stop": ("val_geoscore", NO_STOP, 0, 0.0),
    "top1": ("val_top1", 12, 0, 0.0),
}


def subset(s: Split, idx: np.ndarray) -> Split:
    t = torch.as_tensor(idx)
    return Split(labels=s.labels[t], lat=s.lat[t], lon=s.lon[t], feats=s.feats[t] if s.feats is not None else None)


class Recorder(Trainer):
    """A Trainer whose validation rows are the val split's, and which keeps every epoch's logits on val+test."""

    def __init__(self, *args, n_val: int, **kw):
        super().__init__(*args, **kw)
        self.n_val, self.logits = n_val, []

    def val_metrics(self, head, out, split: Split) -> dict:
        self.head = head
        self.logits.append(head.decode(out).log_probs.clone())
        return super().val_metrics(head, out.take(slice(0, self.n_val)), subset(split, np.arange(self.n_val)))


@dc.dataclass
class Data:
    cfg: Config
    train: Split
    val: Split
    test: Split
    val_seq: np.ndarray
    labels: LabelSpace
    num_features: int

    @property
    def class_lat(self) -> np.ndarray:
        return self.labels.lat

    @property
    def class_lon(self) -> np.ndarray:
        return self.labels.lon

    @property
    def n_cls(self) -> int:
        return self.labels.num_classes


def load(cfg: Config) -> Data:
    """The index, split and cached embeddings, as ``run_experiment`` loads them."""
    df, labels, _ = load_index(cfg)
    df = df.filter(pl.col("split").is_not_null())
    backbone = create_backbone(cfg.model.backbone, pretrained=True)
    feats, ok = cached_embeddings(backbone, df["id"].to_list(), df["path"].to_list(),
                                  Path(cfg.paths.data_dir) / "cache" / "embeddings", engine=cfg.train.embed_engine)
    df, feats = df.filter(pl.Series(ok)), feats[ok]
    (train, _), (val, mva), (test, _) = (_split(df, feats, n) for n in ("train", "val", "test"))
    return Data(cfg, train, val, test, df["sequence_id"].to_numpy()[mva],
                LabelSpace.from_dict(labels), backbone.num_features)


def trajectory(d: Data, seed: int, threads: int, ckpt: Path) -> tuple[Recorder, list[dict], float]:
    """Train the full epochs for one seed (no stopping); (trainer with logits, val rows, seconds)."""
    cfg = Config.from_dict(d.cfg.to_dict())
    cfg.train.seed, cfg.train.patience = seed, NO_STOP
    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seed_everything(seed)
        create_backbone(cfg.model.backbone, pretrained=True)  # consumes the RNG as run_experiment's does
        head = CellHead(d.num_features, d.labels, cfg.model.dropout)
        both = Split(labels=torch.cat([d.val.labels, d.test.labels]), lat=torch.cat([d.val.lat, d.test.lat]),
                     lon=torch.cat([d.val.lon, d.test.lon]), feats=torch.cat([d.val.feats, d.test.feats]))
        rec = Recorder(cfg, d.labels, np.bincount(d.train.labels.numpy(), minlength=d.n_cls), ckpt, n_val=len(d.val))
        t0 = time.perf_counter()
        state = rec.fit_head(head, d.train, both)
        return rec, state["history"], time.perf_counter() - t0
    finally:
        torch.set_num_threads(was)


def replay(stopper: EarlyStopping, rows: list[dict]) -> tuple[int, int]:
    """(epochs run, epoch kept) of the loop's stopping rule on these rows."""
    for epoch, row in enumerate(rows, 1):
        if stopper.should_stop(epoch - 1):
            return epoch - 1, stopper.best_row["epoch"]
        stopper.update({**row, "epoch": epoch})
    return len(rows), stopper.best_row["epoch"]


def scores(rec: Recorder, d: Data, logits: torch.Tensor, part: np.ndarray | None, split: str) -> dict:
    """median km and GeoScore of one epoch's logits on val (or a part of it) or test."""
    n = rec.n_val
    s, lg = (d.val, logits[:n]) if split == "val" else (d.test, logits[n:])
    if part is not None:
        s, lg = subset(s, part), lg[torch.as_tensor(part)]
    row = Trainer.val_metrics(rec, rec.head, GeoOutput({"cell": lg}), s)
    return {"median_km": row["val_median_km"], "geoscore": row["val_geoscore"]}


def halves(seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Val indices cut in two by sequence (alternate sequences in sorted order)."""
    uniq = np.unique(seq)
    a = np.isin(seq, uniq[::2])
    return np.flatnonzero(a), np.flatnonzero(~a)


def evaluate_recipes(rec: Recorder, d: Data, rows: list[dict], seed: int) -> list[dict]:
    out = []
    parts = halves(d.val_seq)
    part_rows = {i: [Trainer.val_metrics(rec, rec.head, GeoOutput({"cell": lg[:rec.n_val][torch.as_tensor(p)]}), subset(d.val, p))
                     for lg in rec.logits]
                 for i, p in enumerate(parts)}
    for name, (monitor, patience, min_epochs, ema) in CANDIDATES.items():
        epochs_run, kept = replay(EarlyStopping(monitor, patience, min_epochs, ema), rows)
        for split in ("val", "test"):
            out.append({"recipe": name, "seed": seed, "split": split, **scores(rec, d, rec.logits[kept - 1], None, split),
                        "epochs_run": epochs_run, "best_epoch": kept})
        # selection on one half of val, scored on the other, both ways
        cv = []
        for pick, score in ((0, 1), (1, 0)):
            run, k = replay(EarlyStopping(monitor, patience, min_epochs, ema), part_rows[pick])
            cv.append((scores(rec, d, rec.logits[k - 1], parts[score], "val"), run, k))
        out.append({"recipe": name, "seed": seed, "split": "val_cv",
                    "median_km": float(np.mean([c[0]["median_km"] for c in cv])), "geoscore": float(np.mean([c[0]["geoscore"] for c in cv])),
                    "epochs_run": float(np.mean([c[1] for c in cv])), "best_epoch": float(np.mean([c[2] for c in cv]))})
    return out


def real_runs(label: str, folder: Path) -> list[dict]:
    """Rows from the summaries of real runs (``geolocate train``) in ``folder``, e.g. of the code at 40f0947."""
    out = []
    for s in sorted(p / "summary.json" for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and (p / "summary.json").exists()):
        j = json.loads(s.read_text())
        for split in ("val", "test"):
            out.append({"recipe": label, "seed": j["config"]["seed"], "split": split,
                        "median_km": j["metrics"][split]["median_km"], "geoscore": j["metrics"][split]["geoscore"],
                        "epochs_run": j["training"]["epochs_run"], "best_epoch": j["training"]["best_epoch"]})
    return out


def table(rows: list[dict]) -> list[dict]:
    """mean ± std (sample std; 0 for one seed) per (recipe, split) over seeds."""
    out = []
    for (recipe, split), g in pl.DataFrame(rows, infer_schema_length=None).group_by(["recipe", "split"], maintain_order=True):
        out.append({"recipe": recipe, "split": split, "seeds": g.height,
                    **{f"{k}_{f}": float(getattr(g[k], f)() or 0.0) for k in ("median_km", "geoscore", "epochs_run", "best_epoch") for f in ("mean", "std")}})
    return out


def prepare(cfg: Config) -> None:
    """Build the demo dataset, index and split under cfg.paths.data_dir unless they are there."""
    idx = Path(cfg.paths.data_dir) / "index"
    if (idx / "splits.parquet").exists():
        return
    get_source("earth")(cfg, Path(cfg.paths.data_dir) / "raw" / "earth")
    build_index(cfg, plot=False)
    make_splits(cfg)


def measure(args, tmp: Path) -> tuple[list[dict], dict, str]:
    """Trajectories per seed -> (rows of every candidate, the thread measurement, what was measured)."""
    root = args.root or tmp
    cfg = Config.load(args.config, [f"paths.data_dir={root / 'data'}"])
    prepare(cfg)
    d = load(cfg)
    rows, traj = [], {}
    for seed in args.seeds:
        rec, hist, sec = trajectory(d, seed, args.threads, tmp)
        print(f"seed {seed}: {len(hist)} epochs in {sec:.1f} s", flush=True)
        rows += evaluate_recipes(rec, d, hist, seed)
        traj[seed] = hist
    # threads: the first seed again with 1 and 2 threads
    s0 = args.seeds[0]
    runs = {t: trajectory(d, s0, t, tmp) for t in (1, 2)}
    diverge = lambda a, b: next((i + 1 for i, (x, y) in enumerate(zip(a, b)) if x["train_loss"] != y["train_loss"]), None)  # noqa: E731
    threads = {
        "seed": s0, "seconds_per_trajectory": {str(t): round(r[2], 2) for t, r in runs.items()},
        "first_epoch_1_vs_2_threads_differ": diverge(runs[1][1], runs[2][1]),
        f"repeat_with_{args.threads}_thread_bit_identical": diverge(traj[s0], runs[args.threads][1]) is None,
        "val_median_km_last_epoch_1_vs_2_threads": [runs[1][1][-1]["val_median_km"], runs[2][1][-1]["val_median_km"]],
    }
    what = (f"{args.config.name}: {d.n_cls} cells, train/val/test {len(d.train)}/{len(d.val)}/{len(d.test)}; seeds {args.seeds}; "
            f"recipes replayed on full {cfg.train.epochs}-epoch trajectories ({args.threads} thread); chosen on val_cv only")
    return rows, threads, what


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--root", type=Path, default=None, help="workspace with data/ (built when missing; default: a temp dir)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the recipe trajectories")
    ap.add_argument("--runs", action="append", default=[], metavar="LABEL=DIR",
                    help="add the real runs in DIR (same data) as recipe LABEL, e.g. old@40f0947=/tmp/runs-old")
    ap.add_argument("--retabulate", action="store_true", help="reuse the replayed rows of --out instead of training again")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    if args.retabulate:
        prev = json.loads(args.out.read_text())
        rows, threads, what = [r for r in prev["rows"] if r["recipe"] in CANDIDATES], prev["threads"], prev["what"]
    else:
        with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp_s:
            rows, threads, what = measure(args, Path(tmp_s))
    for item in args.runs:
        label, folder = item.split("=", 1)
        rows += real_runs(label, Path(folder))
    summary = table(rows)
    cv = {r["recipe"]: r for r in summary if r["split"] == "val_cv"}
    best = min(round(r["median_km_mean"]) for r in cv.values())
    chosen = [k for k, r in cv.items() if round(r["median_km_mean"]) == best]  # ties: same kept epochs
    results = {
        "benchmark": "recipe", "what": what,
        "candidates": {k: dict(zip(("monitor", "patience", "min_epochs", "ema"), v)) for k, v in CANDIDATES.items()},
        "chosen_on_val_cv": chosen, "threads": threads, "summary": summary, "rows": rows,
        "total_s": round(time.perf_counter() - t_all, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    fmt = lambda r, k: f"{r[k + '_mean']:,.0f} ± {r[k + '_std']:,.0f}"  # noqa: E731
    by = {(r["recipe"], r["split"]): r for r in summary}
    labels = [item.split("=", 1)[0] for item in args.runs]
    results["headline"] = [
        {"name": f"{rec}: {split} median km (mean ± std, {by[(rec, split)]['seeds']} seeds)", "value": fmt(by[(rec, split)], "median_km"), "unit": "km"}
        for rec in dict.fromkeys(("old", "new", *chosen, *labels)) for split in ("val", "test", "val_cv") if (rec, split) in by
    ]
    write_json(args.out, results)
    print("\n| recipe | split | median km | GeoScore | epochs run | kept epoch |\n|---|---|---:|---:|---:|---:|")
    for r in summary:
        print(f"| {r['recipe']} | {r['split']} | {fmt(r, 'median_km')} | {fmt(r, 'geoscore')} | {r['epochs_run_mean']:.1f} | {r['best_epoch_mean']:.1f} |")
    print(f"\nchosen on val_cv: {chosen}; threads: {threads}\nwritten {args.out}")
    return results


if __name__ == "__main__":
    main()
