"""Honest confidence for one run: reliability, conformal cell sets, selective prediction, the OOD flag, regions.

``assess_confidence`` is called once by the experiment after the evaluation, before the model file is
written. Everything that is chosen (the conformal threshold, the OOD threshold) is fit on validation; test is
only reported. It returns the ``summary.json`` sections and adds to the model's ``meta`` what the predictor
needs (``conformal``, ``ood``, ``regions``); the OOD score needs the training embeddings, so when refinement
did not already write the gallery beside the model file, this writes it (``<model>.gallery.npz``).

Plots (``plots/``): ``reliability.png``, ``conformal_recall_area.png``, ``selective.png``, ``ood_scores.png``;
REPORT.md and the dashboard show them (``report_lines``, ``PLOTS``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..catalogue import metric
from ..evaluation import conformal as C
from ..evaluation import ood as O
from ..evaluation.calibration import ece, softmax
from ..evaluation.regions import RegionSpace
from ..evaluation.selective import THRESHOLDS, selective_curve, selective_table
from ..io import save_figure

PLOTS = {"reliability.png": "Reliability before/after temperature scaling",
         "conformal_recall_area.png": "Conformal cell sets: recall vs area (test)",
         "selective.png": "Selective prediction: coverage vs accuracy and median km (test)",
         "ood_scores.png": "Out-of-distribution score (kNN cosine distance)"}
OOD_SCORE = "knn_cosine"


def _key(x: float) -> str:
    return f"{x:g}"


def assess_confidence(cfg, run_dir: Path, model_path: Path, meta: dict, calibration: dict, classes: list[dict],
                      train, val, test, split_probs: dict, test_error_km: np.ndarray | None, features: str,
                      regions: RegionSpace | None = None, gallery=None) -> dict:
    """The summary sections ``conformal``, ``selective``, ``ood``; ``meta`` gains ``conformal``, ``ood``, ``regions``.

    ``gallery``: the training-embedding gallery the run already built (for refinement), reused for the OOD score;
    built here only when there is none."""
    from ..tasks.refine import Gallery, gallery_path, shipped_gallery

    plots = Path(run_dir) / "plots"
    ev = cfg.eval
    rep = "test" if len(test) and "test" in split_probs else "val"   # the split reported on (val only when test is empty)
    rep_split = test if rep == "test" else val
    p_val, y_val = split_probs["val"], val.labels.numpy()
    p_rep, y_rep = split_probs[rep], rep_split.labels.numpy()
    out: dict = {}

    # ---- reliability ------------------------------------------------------------
    t = float(calibration.get("temperature", 1.0))
    rel = {n: (split_probs[n], (val if n == "val" else test).labels.numpy()) for n in ("val", "test") if n in split_probs}
    plot_reliability({n: (_uncalibrated(p, t), p, y) for n, (p, y) in rel.items()}, t, plots / "reliability.png")

    # ---- conformal cell sets ----------------------------------------------------------
    areas = C.class_areas_km2([c["cell"] for c in classes])
    thr = C.calibrate(p_val, y_val, ev.conformal_coverage, ev.conformal_score)
    finite = math.isfinite(thr)
    out["conformal"] = {
        "score": ev.conformal_score, "coverage_target": ev.conformal_coverage, "threshold": thr if finite else None,
        "calibration_n": int(len(y_val)), "split": rep,
        "result": C.set_summary(C.prediction_sets(p_rep, thr, ev.conformal_score), y_rep, areas),
        "targets": {_key(r["target"]): {k: v for k, v in r.items() if k != "target"}
                    for r in C.operating_points(p_val, y_val, p_rep, y_rep, areas, ev.conformal_score)},
    }
    meta["conformal"] = {"score": ev.conformal_score, "coverage": ev.conformal_coverage, "threshold": thr if finite else None,
                         "calibration_n": int(len(y_val))}
    plot_recall_area(C.area_to_cover(p_rep, y_rep, areas), out["conformal"]["targets"], float(areas.sum()),
                     plots / "conformal_recall_area.png", rep)

    # ---- selective prediction ----------------------------------------------------------
    conf, correct = p_rep.max(1), p_rep.argmax(1) == y_rep
    err = np.asarray(test_error_km) if rep == "test" and test_error_km is not None else np.full(len(y_rep), np.nan)
    # fixed thresholds, and those answering 80 / 50 / 20 % of validation (a weak model is never 50 % sure)
    at_val = np.round(np.quantile(p_val.max(1), [0.2, 0.5, 0.8], method="higher"), 3)
    thresholds = sorted({*THRESHOLDS, *at_val.tolist()})
    out["selective"] = {"split": rep, "confidence": "top-1 cell probability (calibrated)",
                        "thresholds": {_key(r["threshold"]): {k: v for k, v in r.items() if k != "threshold"}
                                       for r in selective_table(conf, correct, err, thresholds)}}
    plot_selective(selective_curve(conf, correct, err), plots / "selective.png", rep)

    # ---- out-of-distribution flag ---------------------------------------------------------
    if train.feats is not None and len(train) and val.feats is not None:
        shipped = shipped_gallery(meta)
        if shipped:  # the gallery refinement (or feature reranking) ships is already written beside the model
            sha, size = shipped["gallery_sha256"], shipped["gallery_size"]
            if gallery is None:
                gallery = Gallery.load(gallery_path(model_path), sha256=sha)
        else:
            if gallery is None:
                from .experiment import as_array

                gallery = Gallery.build(as_array(train.feats), train.lat.numpy(), train.lon.numpy(), train.labels.numpy(),
                                        features, len(classes))
            sha, size = gallery.save(gallery_path(model_path)), len(gallery)
        k = ev.ood_neighbours
        s_val = O.knn_distance(gallery.feats, val.feats.numpy(), k)
        s_test = O.knn_distance(gallery.feats, test.feats.numpy(), k) if len(test) and test.feats is not None else np.array([])
        ood_t = O.fit_threshold(s_val, ev.ood_quantile)
        out["ood"] = {"score": OOD_SCORE, "neighbours": k, "quantile": ev.ood_quantile, "threshold": ood_t,
                      "val_flagged": float((s_val > ood_t).mean()),
                      "test_flagged": float((s_test > ood_t).mean()) if len(s_test) else None,
                      "val_median_score": float(np.median(s_val)),
                      "test_median_score": float(np.median(s_test)) if len(s_test) else None}
        meta["ood"] = {"score": OOD_SCORE, "neighbours": k, "quantile": ev.ood_quantile, "threshold": ood_t,
                       "gallery_sha256": sha, "gallery_size": size, "features": features}
        plot_ood({"val": s_val, "test": s_test}, ood_t, plots / "ood_scores.png")
    if regions is not None:
        meta["regions"] = regions.to_dict()
        out["regions"] = {"count": len(regions), "classes": len(classes)}
    return out


def _uncalibrated(p: np.ndarray, t: float) -> np.ndarray:
    """The probabilities before temperature scaling: softmax(T · log p) (the same up to the probabilities that
    underflowed)."""
    return softmax(np.log(np.clip(np.asarray(p, np.float64), 1e-300, None)) * t)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, count) per equal-width bin of the top-1 confidence (the bins of ``ece``)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    cnt = np.bincount(idx, minlength=bins)
    mc = np.bincount(idx, conf, minlength=bins) / np.maximum(cnt, 1)
    acc = np.bincount(idx, correct.astype(float), minlength=bins) / np.maximum(cnt, 1)
    return mc, acc, cnt


# ---- plots ------------------------------------------------------------------------------
def _plt():
    from .artifacts import _plt as plt

    return plt()


def plot_reliability(splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], temperature: float, path: Path) -> Path:
    """One panel per split: accuracy vs confidence per bin, before and after scaling, with the diagonal."""
    plt = _plt()
    fig, axes = plt.subplots(1, max(len(splits), 1), figsize=(5.2 * max(len(splits), 1), 4.4), squeeze=False)
    for ax, (name, (before, after, y)) in zip(axes[0], splits.items()):
        ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=0.8, label="perfect calibration")
        for probs, label, colour in ((before, "before", "#d95f02"), (after, f"after (T={temperature:.2f})", "#1b9e77")):
            mc, acc, cnt = reliability_bins(probs, y)
            m = cnt > 0
            ax.plot(mc[m], acc[m], marker="o", color=colour, label=f"{label}: ECE {ece(probs, y):.3f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 confidence")
        ax.set_ylabel("top-1 accuracy")
        ax.set_title(f"Reliability ({name}, n={len(y)})")
        ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)


def plot_recall_area(area_needed: np.ndarray, targets: dict, total_km2: float, path: Path, split: str) -> Path:
    """Share of images whose true cell is inside the most probable cells of total area <= A, against A; the
    conformal sets at each target coverage (threshold fit on validation) marked on it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    a = np.sort(np.maximum(area_needed, 1.0))
    ax.step(a, np.arange(1, len(a) + 1) / max(len(a), 1), where="post", label="most probable cells first")
    for key, r in targets.items():
        if r.get("mean_area_km2") is not None and r.get("coverage") is not None:
            ax.scatter([max(r["mean_area_km2"], 1.0)], [r["coverage"]], color="#d95f02", zorder=3)
            ax.annotate(f"{float(key):.0%}", (max(r["mean_area_km2"], 1.0), r["coverage"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
    ax.scatter([], [], color="#d95f02", label="conformal sets (target coverage; mean area)")
    ax.axvline(total_km2, color="#ccc", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("area of the answer (km², log scale)")
    ax.set_ylabel(f"recall: true cell inside ({split})")
    ax.set_title("Recall vs area of the cell set")
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def plot_selective(curve: dict, path: Path, split: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(curve["coverage"], curve["top1_acc"], color="#1b9e77", label=metric("top1_acc").label)
    ax.set_xlabel(f"coverage: share of {split} images answered (most confident first)")
    ax.set_ylabel(metric("top1_acc").label)
    ax.set_xlim(0, 1.02)
    ax2 = ax.twinx()
    km = np.asarray(curve["median_km"], dtype=float)
    if np.isfinite(km).any():
        ax2.plot(curve["coverage"], km, color="grey", ls="--", label=metric("median_km").label)
    ax2.set_ylabel(metric("median_km").label)
    ax.set_title("Selective prediction")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
    return save_figure(fig, path)


def plot_ood(scores: dict[str, np.ndarray], threshold: float, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    allv = np.concatenate([s for s in scores.values() if len(s)] + [[threshold]])
    bins = np.linspace(0, max(float(allv.max()) * 1.05, 1e-3), 40)
    for name, s in scores.items():
        if len(s):
            ax.hist(s, bins=bins, alpha=0.55, label=f"{name} (n={len(s)})")
    ax.axvline(threshold, color="#b00020", lw=1.2, label=f"threshold {threshold:.3f} (fit on val)")
    ax.set_xlabel("mean cosine distance to the nearest training images")
    ax.set_ylabel("images")
    ax.set_title("Out-of-distribution score")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# ---- REPORT.md ------------------------------------------------------------------------------
def _km2(v) -> str:
    return "–" if v is None else f"{v:,.0f} km²"


def confidence_label(k: str) -> str:
    v = 100 * float(k)
    return f"{v:.0f}%" if v == round(v) else f"{v:.1f}%"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def report_lines(summary: dict) -> list[str]:
    """The REPORT.md section "Honest confidence" (empty for a summary without it)."""
    cf, sel, ood = summary.get("conformal"), summary.get("selective"), summary.get("ood")
    if not (cf or sel or ood):
        return []
    lines = ["## Honest confidence", ""]
    cal = summary.get("calibration") or {}
    if cal.get("fitted"):
        lines += [f"Reliability of the top-1 confidence before and after temperature scaling (T={cal['temperature']:.2f}, "
                  "fit on validation): `plots/reliability.png`.", ""]
    if cf:
        r = cf["result"]
        thr = "∞ (every cell)" if cf["threshold"] is None else f"{cf['threshold']:.4f}"
        lines += [f"**Conformal cell sets** ({cf['score']} score, threshold {thr} fit on {cf['calibration_n']} validation images "
                  f"for {cf['coverage_target']:.0%} coverage): on {cf['split']} the true cell is in the set for "
                  f"{_pct(r.get('coverage'))} of {r['n']} images; mean set {r['mean_cells']:.1f} cells "
                  f"(median {r['median_cells']:.0f}), mean area {_km2(r['mean_area_km2'])} (median {_km2(r['median_area_km2'])}).", "",
                  "| target coverage | coverage | mean cells | mean area |", "|---:|---:|---:|---:|",
                  *(f"| {float(k):.0%} | {_pct(v.get('coverage'))} | {v['mean_cells']:.1f} | {_km2(v['mean_area_km2'])} |"
                    for k, v in cf["targets"].items()), ""]
    if sel:
        km = metric("median_km")
        lines += [f"**Selective prediction** (`geolocate predict --min-confidence P`; confidence = {sel['confidence']}), "
                  f"{sel['split']} split:", "",
                  "| min confidence | answered | coverage | top-1 acc | median km |", "|---:|---:|---:|---:|---:|",
                  *(f"| {confidence_label(k)} | {v['answered']} | {_pct(v['coverage'])} | {_pct(v['top1_acc'])} | {km.fmt(v['median_km'])} |"
                    for k, v in sel["thresholds"].items()), ""]
    if ood:
        lines += [f"**Out-of-distribution flag**: mean cosine distance to the {ood['neighbours']} nearest training images; "
                  f"threshold {ood['threshold']:.4f} = the {ood['quantile']:.0%} quantile of validation scores. Flagged: "
                  f"{_pct(ood['val_flagged'])} of validation, {_pct(ood['test_flagged'])} of test.", ""]
    lines += [f"![{name}](plots/{name})" for name in PLOTS] + [""]
    return lines
