"""Run artifacts: metrics.csv, plots, REPORT.md, summary.json, the latest link, best-model promotion.

``summary.json`` schema (``schema_version`` 1) — stable keys, documented in README:
  run_id, created_at, wall_time_s, status
  dataset:   fingerprint, images, cells, h3_resolution, splits{train,val,test}, sources{}
  config:    backbone, loss, epochs, finetune_epochs, lr, batch_size, geo_tau_km, geo_mix_ce, seed, threads,
             monitor, monitor_ema, patience, min_epochs
  training:  epochs_run, best_epoch, best_phase, best_val_{median_km,acc,loss,geoscore}, best_monitor, stopped_early
  metrics:   {val, test} -> every metric of the catalogue (``geolocate.catalogue``) that ``in_summary``
  baselines: {prior, knn} -> {val, test} with the same metric keys
  gate:      metric, split, value, previous, promoted
  artifacts: {name: bool} for every file the run should hold
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from ..catalogue import THRESHOLDS_KM, metric, table_metrics
from ..io import save_figure, write_json, write_text

SCHEMA_VERSION = 1
PLOTS = ["loss.png", "val_accuracy.png", "geo_error_cdf.png", "confusion_matrix.png"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    if not history:
        return
    cols = list(history[0].keys())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(history)
    write_text(path, buf.getvalue())


def plot_history(history: list[dict], plots: Path) -> None:
    plt = _plt()
    x = np.arange(1, len(history) + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["train_loss"] for r in history], label="train")
    ax.plot(x, [r["val_loss"] for r in history], label="val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Loss")
    save_figure(fig, plots / "loss.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["val_top1"] for r in history], label=f"val {metric('top1_acc').label}")
    ax.plot(x, [r["val_top5"] for r in history], label=f"val {metric('top5_acc').label}")
    ax2 = ax.twinx()
    ax2.plot(x, [r["val_median_km"] for r in history], color="grey", ls="--", label=f"val {metric('median_km').label}")
    ax2.set_ylabel(metric("median_km").label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    ax.set_title("Validation accuracy")
    save_figure(fig, plots / "val_accuracy.png")


def plot_cdf(dists: dict[str, np.ndarray], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in dists.items():
        d = np.sort(np.maximum(np.asarray(d), 0.1))
        ax.plot(d, np.arange(1, len(d) + 1) / max(len(d), 1), label=name)
    for r in THRESHOLDS_KM:
        ax.axvline(r, color="#ccc", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("error (km)")
    ax.set_ylabel("share of test images")
    ax.set_title("Geo error CDF (test)")
    ax.legend()
    save_figure(fig, path)


def plot_confusion(true: np.ndarray, pred: np.ndarray, names: list[str], path: Path, top: int = 15) -> None:
    plt = _plt()
    cls, cnt = np.unique(true, return_counts=True)
    keep = cls[np.argsort(-cnt)][:top]
    pos = {c: i for i, c in enumerate(keep)}
    m = np.zeros((len(keep), len(keep) + 1))
    for t, p in zip(true, pred):
        if t in pos:
            m[pos[t], pos.get(p, len(keep))] += 1
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    labels = [names[c][:22] for c in keep]
    ax.set_yticks(range(len(keep)), labels, fontsize=7)
    ax.set_xticks(range(len(keep) + 1), labels + ["other"], fontsize=7, rotation=90)
    ax.set_xlabel("predicted cell")
    ax.set_ylabel("true cell")
    ax.set_title(f"Confusion of the {len(keep)} most frequent test cells (row-normalised)")
    save_figure(fig, path)


def metrics_table(columns: dict[str, dict]) -> str:
    """Markdown table: one row per metric, one column per predictor."""
    head = "| metric | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    rows = []
    for m in table_metrics():
        if any(m.name in c for c in columns.values()):
            rows.append(f"| {m.label} | " + " | ".join(m.fmt(c.get(m.name)) for c in columns.values()) + " |")
    return head + "\n".join(rows) + "\n"


def _calibration_lines(cal: dict | None) -> list[str]:
    if not cal or not cal.get("fitted"):
        return []
    rows = [f"| {split} | {cal[f'{split}_ece_before']:.3f} | {cal[f'{split}_ece_after']:.3f} | "
            f"{'–' if cal.get(f'{split}_ece_answer') is None else format(cal[f'{split}_ece_answer'], '.3f')} | "
            f"{'–' if cal.get(f'{split}_ece_floor') is None else format(cal[f'{split}_ece_floor'], '.3f')} |"
            for split in ("val", "test") if f"{split}_ece_before" in cal]
    how = {"top1": "the top-1 confidence's likelihood", "nll": "the true cell's likelihood"}.get(cal.get("objective", "nll"))
    return ["## Confidence calibration", "",
            f"Temperature {cal['temperature']:.2f}, fit on validation to {how} (ranking unchanged). "
            "\"Answer\" is the confidence the answer reports (after decode-time reranking, when that ships); \"floor\" is the ECE "
            "a perfectly calibrated model would still show on these images (sampling noise: compare ECEs with it).", "",
            "| split | ECE before | ECE after | ECE of the answer | floor |", "|---|---:|---:|---:|---:|", *rows, ""]


def _confidence_lines(summary: dict) -> list[str]:
    from .confidence import report_lines  # conformal sets, selective prediction, OOD flag (their plots too)

    return report_lines(summary)


def _answer_point_lines(ap: dict | None) -> list[str]:
    """REPORT.md section: which point the model answers with, and each choice's metrics (chosen on validation)."""
    if not ap or not ap.get("ablation"):
        return []
    how = (f"a training location refined inside the top {ap['params']['top_k']} cells from the training gallery (temperature "
           f"{ap['params']['temperature']}, {ap['params']['neighbours']} neighbours), chosen on validation" if ap["refined"]
           else "the top cell's anchor (refinement did not beat it on validation)")
    rr = ap.get("rerank") or {}
    stages = ", ".join(f"{st['name']} ({', '.join(f'{k}={v}' for k, v in st['params'].items())})" for st in rr.get("stages", []))
    rerank = ([] if not rr else
              [f"Decode-time reranking of the cells: {stages}, chosen on validation." if ap.get("reranked") else
               f"Decode-time reranking: {'the stages ' + stages + ' helped the cell anchors but not the shipped answer' if stages else 'no stage improved validation'}, so none ships.", ""])
    tables = {f"{point} ({split})": m for point, per in ap["ablation"].items() for split, m in per.items()}
    return ["## Answer point", "", f"The model answers with {how}.", "", *rerank, metrics_table(tables)]


def write_report(run_dir: Path, summary: dict, stats: dict) -> None:
    m, b, gate = summary["metrics"], summary["baselines"], summary["gate"]
    cfg, gm = summary["config"], metric(summary["gate"]["metric"])
    lines = [
        f"# Run {summary['run_id']}",
        "",
        f"Created {summary['created_at']} · wall time {summary['wall_time_s']:.0f} s · dataset `{summary['dataset']['fingerprint']}` "
        f"({summary['dataset']['images']} images, {summary['dataset']['cells']} H3 cells at resolution {summary['dataset']['h3_resolution']})",
        "",
        "## Test split",
        "",
        metrics_table({"model": m["test"], "prior": b["prior"]["test"], f"kNN (k={summary['config'].get('knn_k', 1)})": b["knn"]["test"]}),
        "## Validation split",
        "",
        metrics_table({"model": m["val"], "prior": b["prior"]["val"], "kNN": b["knn"]["val"]}),
        *_calibration_lines(summary.get("calibration")),
        *_confidence_lines(summary),
        *_answer_point_lines(summary.get("answer_point")),
        "## Training",
        "",
        f"- epochs run: {summary['training']['epochs_run']}, kept epoch (best {summary['config']['monitor']}): "
        f"{summary['training']['best_epoch']}, val median there: {metric('median_km').fmt(summary['training']['best_val_median_km'], unit=True)}, "
        f"early stop: {summary['training']['stopped_early']}, threads: {summary['config']['threads']}"
        + (f", CPU kernels: {summary['config']['cpu_kernels']}" if summary['config'].get('cpu_kernels') else ""),
        f"- gate ({gate['metric']} on {gate['split']}): {gm.fmt(gate['value'], unit=True)}, previous best: {gm.fmt(gate['previous'], unit=True)}, "
        f"promoted to models/best.pt: {gate['promoted']}",
        "",
        "## Config",
        "",
        "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in cfg.items()),
        "",
        "## Dataset",
        "",
        "| stat | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in stats.items()),
        "",
        "## Plots",
        "",
        *[f"![{p}](plots/{p})" for p in PLOTS],
        "",
        "Full config: `config.json`; per-epoch metrics: `metrics.csv`; test predictions: `predictions_test.parquet`.",
        "",
    ]
    write_text(run_dir / "REPORT.md", "\n".join(lines))


def artifact_flags(run_dir: Path) -> dict[str, bool]:
    names = ["config.json", "metrics.csv", "REPORT.md", "dashboard.html", "predictions_test.parquet", "checkpoints/model.pt",
             "checkpoints/last.pt"]
    names += [f"plots/{p}" for p in PLOTS + ["error_map.png"]]
    return {n: (run_dir / n).exists() for n in names}


def link_latest(runs_dir: Path, run_dir: Path) -> None:
    """Point runs/latest at run_dir atomically (symlink swap)."""
    tmp = runs_dir / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, runs_dir / "latest")
