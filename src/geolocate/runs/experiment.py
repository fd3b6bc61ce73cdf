"""One training run, end to end: index -> embeddings -> train -> evaluate -> artifacts -> best model.

``run_experiment(cfg)`` creates ``runs/<run_id>/`` and returns its path;
``run_experiment(cfg, resume=run_dir)`` continues an interrupted run from its
``checkpoints/last.pt`` with the config saved in that run.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ..config import Config
from ..evaluation import evaluate, knn_predict, prior_predict
from ..evaluation.metrics import improves
from ..index.build import dataset_fingerprint
from ..geo import haversine_km
from ..index import IndexPaths, load_index
from ..io import read_json, write_json, write_parquet
from ..models import CellHead, GeoModel, create_backbone, is_pretrained, save_model
from ..progress import console, tagged
from ..training import Split, Trainer, cached_embeddings, embed_paths, load_checkpoint, seed_everything
from ..training.augment import augment_for, image_batch, with_augmented_copies
from . import artifacts as A
from .dashboard import write_dashboard
from .tracking import get_tracker, log_run_safely


def new_run_id(cfg: Config) -> str:
    """``<time to the microsecond>_<backbone>_<config hash>-<random>``: unique even for one config started twice at once."""
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:6]
    return (f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}_{cfg.model.backbone.replace(':', '-').replace('/', '-')}"
            f"_{digest}-{secrets.token_hex(3)}")


def _split(df: pl.DataFrame, feats: np.ndarray | None, name: str) -> tuple[Split, np.ndarray]:
    mask = (df["split"] == name).to_numpy()
    s = Split(labels=torch.as_tensor(df["label"].to_numpy()[mask], dtype=torch.long),
              lat=torch.as_tensor(df["lat"].to_numpy()[mask]), lon=torch.as_tensor(df["lon"].to_numpy()[mask]),
              feats=torch.as_tensor(feats[mask]) if feats is not None else None, paths=df["path"].to_numpy()[mask].tolist())
    return s, mask


def run_experiment(cfg: Config, resume: str | Path | None = None, tracker: str | None = None) -> Path:
    """Deterministic kernels for the run; the caller's torch setting is restored afterwards."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run_experiment(cfg, resume, tracker)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _run_experiment(cfg: Config, resume: str | Path | None, tracker: str | None) -> Path:
    t_start = time.time()
    trk = get_tracker(tracker)  # an unusable tracker fails here, before any training
    runs_dir = Path(cfg.paths.runs_dir)
    if resume:
        run_dir = Path(resume)
        cfg = Config.from_dict(read_json(run_dir / "config.json"))
        resume_state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        console.print(f"resuming {run_dir} from epoch {resume_state['epoch']} ({resume_state['phase']})", markup=False)
    else:
        run_dir = runs_dir / new_run_id(cfg)
        runs_dir.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(exist_ok=False)  # a run directory belongs to exactly one run
        resume_state = None
    run_id = run_dir.name
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", cfg.to_dict())
    seed_everything(cfg.train.seed)

    df, labels, stats = load_index(cfg)
    if "split" not in df.columns or df["split"].null_count() == df.height:
        raise FileNotFoundError("no splits: run `geolocate split` first")
    df = df.filter(pl.col("split").is_not_null())
    class_lat = np.array([c["lat"] for c in labels["classes"]])
    class_lon = np.array([c["lon"] for c in labels["classes"]])
    names = [c["place"] for c in labels["classes"]]
    n_cls = labels["num_classes"]

    spec = cfg.model.backbone
    pretrained = is_pretrained(spec)
    backbone = create_backbone(spec, pretrained=pretrained)
    cache_dir = Path(cfg.paths.data_dir) / "cache" / "embeddings"
    ids, paths = df["id"].to_list(), df["path"].to_list()
    feats = None
    if pretrained:
        feats, ok = cached_embeddings(backbone, ids, paths, cache_dir, engine=cfg.train.embed_engine)
        if (~ok).any():
            console.print(tagged("warning", f"{(~ok).sum()} unreadable images left out of this run"))
            df, feats = df.filter(pl.Series(ok)), feats[ok]
            ids, paths = df["id"].to_list(), df["path"].to_list()
    train, mtr = _split(df, feats, "train")
    val, mva = _split(df, feats, "val")
    test, mte = _split(df, feats, "test")
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"empty split: train={len(train)} val={len(val)}; add data or change index.split_ratios")
    train_counts = np.bincount(train.labels.numpy(), minlength=n_cls)

    history: list[dict] = list(resume_state["history"]) if resume_state else []

    def on_epoch(row: dict) -> None:
        history.append(row)
        A.write_metrics_csv(run_dir / "metrics.csv", history)

    trainer = Trainer(cfg, class_lat, class_lon, train_counts, run_dir / "checkpoints", on_epoch)
    head = CellHead(backbone.num_features, n_cls, cfg.model.dropout)
    model = GeoModel(backbone, head)
    finetune_epochs = cfg.train.finetune_epochs if pretrained else max(cfg.train.finetune_epochs, cfg.train.epochs)
    state: dict = {}
    augment = augment_for(cfg, stats.get("sources", {}))  # training only: copies of the train split's embeddings, fine-tuning batches
    if pretrained and not (resume_state and resume_state["phase"] == "finetune"):
        fit_train = with_augmented_copies(train, backbone, df["id"].to_numpy()[mtr].tolist(), train.paths, cache_dir, augment,
                                          cfg.augment.copies, cfg.train.embed_engine)
        state = trainer.fit_head(head, fit_train, val, resume_state)
        history[:] = state["history"]
    if finetune_epochs > 0:
        state = trainer.fit_finetune(model, train, val, lambda m, p, aug, g: image_batch(m.preprocess, p, augment if aug else None, g),
                                     epochs=finetune_epochs, backbone_lr_mult=cfg.train.finetune_lr_mult if pretrained else 1.0,
                                     resume=resume_state if resume_state and resume_state["phase"] == "finetune" else None,
                                     history=state.get("history", []), start_best_km=state.get("best_km", float("inf")))
        history[:] = state["history"]
        # features of the trained backbone for evaluation and kNN
        feats, ok = embed_paths(backbone, paths, desc="embedding (trained backbone)", engine=cfg.train.embed_engine)
        for s, m in ((train, mtr), (val, mva), (test, mte)):
            s.feats = torch.as_tensor(np.nan_to_num(feats[m]))
    A.write_metrics_csv(run_dir / "metrics.csv", history)

    # ---- evaluation: model vs prior vs kNN on val and test -------------------
    model.eval()
    metrics, baselines = {}, {"prior": {}, "knn": {}}
    test_rows = None
    for name, s in (("val", val), ("test", test)):
        if len(s) == 0:
            continue
        with torch.no_grad():
            probs = torch.softmax(head(s.feats), 1).numpy()
        pred = probs.argmax(1)
        y, la, lo = s.labels.numpy(), s.lat.numpy(), s.lon.numpy()
        metrics[name] = evaluate(probs, y, la, lo, class_lat[pred], class_lon[pred])
        sc, prior_lat, prior_lon = prior_predict(train.labels.numpy(), n_cls, len(s), class_lat, class_lon)
        baselines["prior"][name] = evaluate(sc, y, la, lo, prior_lat, prior_lon)
        sc, pla, plo = knn_predict(train.feats.numpy(), train.labels.numpy(), train.lat.numpy(), train.lon.numpy(),
                                   s.feats.numpy(), n_cls, k=cfg.eval.knn_k)
        baselines["knn"][name] = evaluate(sc, y, la, lo, pla, plo)
        if name == "test":
            d_model = haversine_km(la, lo, class_lat[pred], class_lon[pred])
            test_rows = pl.DataFrame({
                "id": df["id"].to_numpy()[mte], "lat": la, "lon": lo, "label": y, "pred_label": pred,
                "pred_lat": class_lat[pred], "pred_lon": class_lon[pred], "prob": probs.max(1), "error_km": d_model,
                "knn_lat": pla, "knn_lon": plo, "knn_error_km": haversine_km(la, lo, pla, plo),
                "prior_error_km": haversine_km(la, lo, prior_lat, prior_lon),
            })
    if "test" not in metrics:  # tiny datasets: report val as the gate split
        metrics["test"], baselines["prior"]["test"], baselines["knn"]["test"] = metrics["val"], baselines["prior"]["val"], baselines["knn"]["val"]
        console.print(tagged("warning", "empty test split: test metrics repeat validation"))

    # ---- artifacts ------------------------------------------------------------
    plots = run_dir / "plots"
    A.plot_history(history, plots)
    if test_rows is not None:
        write_parquet(run_dir / "predictions_test.parquet", test_rows)
        A.plot_cdf({"model": test_rows["error_km"].to_numpy(), "kNN": test_rows["knn_error_km"].to_numpy(),
                    "prior": test_rows["prior_error_km"].to_numpy()}, plots / "geo_error_cdf.png")
        A.plot_confusion(test_rows["label"].to_numpy(), test_rows["pred_label"].to_numpy(), names, plots / "confusion_matrix.png")
    model_path = run_dir / "checkpoints" / "model.pt"
    backbone_trained = finetune_epochs > 0
    meta = {"run_id": run_id, "metrics": {"test": metrics["test"], "val": metrics["val"]}, "dataset_fingerprint": stats["fingerprint"],
            "sources": stats.get("sources", {}), "images": stats["images"]}
    save_model(model_path, model, spec, labels, cfg.model.dropout, backbone_trained, meta)

    gate_key = cfg.eval.gate_metric
    gate_value = float(metrics["test"][gate_key])
    split_fp = dataset_fingerprint(df["id"].to_list(), df["split"].to_list())
    promoted, previous = promote_best(Path(cfg.paths.models_dir), model_path, run_id, gate_key, gate_value,
                                      f"{stats['fingerprint']}/{split_fp}")
    best_row = min(history, key=lambda r: r["val_median_km"]) if history else {}
    split_counts = {k: int(v) for k, v in df.group_by("split").len().iter_rows()}
    summary = {
        "schema_version": A.SCHEMA_VERSION,
        "run_id": run_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(time.time() - t_start, 2),
        "status": "completed",
        "dataset": {"fingerprint": stats["fingerprint"], "split_fingerprint": split_fp, "images": int(df.height), "cells": n_cls, "h3_resolution": stats["h3_resolution"],
                    "splits": split_counts, "sources": stats.get("sources", {})},
        "config": {"backbone": spec, "loss": cfg.train.loss, "epochs": cfg.train.epochs, "finetune_epochs": cfg.train.finetune_epochs,
                   "lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "geo_tau_km": cfg.train.geo_tau_km,
                   "geo_mix_ce": cfg.train.geo_mix_ce, "seed": cfg.train.seed, "knn_k": cfg.eval.knn_k,
                   "h3_resolution": cfg.index.h3_resolution, "min_cell_samples": cfg.index.min_cell_samples},
        "training": {"epochs_run": len(history), "best_epoch": best_row.get("epoch"), "best_val_median_km": best_row.get("val_median_km"),
                     "best_val_acc": max((r["val_top1"] for r in history), default=None),
                     "stopped_early": state.get("bad_epochs", 0) >= cfg.train.patience},
        "metrics": metrics,
        "baselines": baselines,
        "gate": {"metric": gate_key, "value": gate_value, "previous": previous, "promoted": promoted},
    }
    A.write_report(run_dir, summary | {"artifacts": {}}, stats)
    summary["artifacts"] = A.artifact_flags(run_dir)
    write_json(run_dir / "summary.json", summary)
    write_dashboard(run_dir)  # reads summary.json; then the flags include the dashboard itself
    summary["artifacts"] = A.artifact_flags(run_dir)
    write_json(run_dir / "summary.json", summary)
    log_run_safely(trk, run_dir)
    A.link_latest(runs_dir if not resume else run_dir.parent, run_dir)
    return run_dir


def promote_best(models_dir: Path, model_path: Path, run_id: str, metric: str, value: float, fingerprint: str) -> tuple[bool, float | None]:
    """Copy the run's model to models/best.pt (+ best.json) only if ``metric`` improved on the current best.

    ``fingerprint`` names the dataset and its split (``<index>/<split>``). A best model measured on another
    dataset, split or metric is not comparable: the new model replaces it, with a warning, and
    ``best.json`` records what it replaced.
    """
    from filelock import FileLock

    from ..io import atomic_write

    models_dir.mkdir(parents=True, exist_ok=True)
    best_json = models_dir / "best.json"
    # the whole read-compare-write is one critical section: two runs finishing together cannot both "improve"
    with FileLock(str(models_dir / ".best.lock")):
        previous = None
        if best_json.exists():
            try:
                old = read_json(best_json)
                if old.get("metric") == metric and old.get("fingerprint", old.get("dataset_fingerprint")) == fingerprint:
                    previous = float(old["value"])
                else:
                    console.print(tagged("warning", f"models/best.pt ({old.get('run_id')}) was measured on another dataset, split "
                                                    f"or metric ({old.get('metric')}); replacing it with {run_id}"))
            except (KeyError, ValueError, TypeError, AttributeError, json.JSONDecodeError):
                previous = None
        if previous is not None and not improves(metric, value, previous):
            return False, previous
        data = model_path.read_bytes()
        atomic_write(models_dir / "best.pt", lambda p: p.write_bytes(data), suffix=".pt")
        write_json(best_json, {"run_id": run_id, "metric": metric, "value": value, "previous": previous,
                               "dataset_fingerprint": fingerprint.split("/")[0], "fingerprint": fingerprint,
                               "sha256": hashlib.sha256(data).hexdigest(),
                               "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        return True, previous
