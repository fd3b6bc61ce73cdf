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
from typing import NamedTuple

import numpy as np
import polars as pl
import torch

from ..catalogue import metric
from ..config import Config
from ..evaluation import evaluate, knn_predict, prior_predict
from ..evaluation.metrics import improves
from ..index.build import dataset_fingerprint
from ..geo import haversine_km
from ..index import IndexPaths, load_index
from ..io import read_json, write_json, write_parquet
from ..labels import LabelSpace
from ..models import FUSIONS, HEADS, GeoModel, backbone_for, create_fusion, create_head, is_pretrained, save_model
from ..progress import console, tagged
from ..training import Split, Trainer, embed_paths, load_checkpoint, seed_everything
from ..training import distributed as D
from ..training.embeddings import cached_embedding_view
from ..training.precision import Precision
from ..training.store import FeatureView
from ..tasks.refine import Gallery, RefineParams, choose_params, gallery_path, refine
from ..tasks.rerank import Reranking, RerankContext, Stage, answer_points, apply_reranking, choose_reranking
from ..evaluation.regions import RegionSpace
from ..training.augment import augment_for, image_batch, with_augmented_copies
from ..training.dataset import fused_features, group_views, select_views
from . import artifacts as A
from .confidence import assess_confidence
from .dashboard import write_dashboard
from .tracking import get_tracker, log_run_safely


def new_run_id(cfg: Config) -> str:
    """``<time to the microsecond>_<backbone>_<config hash>-<random>``: unique even for one config started twice at once."""
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:6]
    return (f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}_{cfg.model.backbone.replace(':', '-').replace('/', '-')}"
            f"_{digest}-{secrets.token_hex(3)}")


def _split(df: pl.DataFrame, feats: FeatureView | np.ndarray | None, name: str, lazy: bool = False,
           view_mask: np.ndarray | None = None) -> tuple[Split, np.ndarray]:
    """One split of the sample frame; ``lazy``: its features stay a view of the memory-mapped store (read per batch),
    else in memory. Multi-view samples (one frame row each): ``feats`` (G, V, F) in memory and their ``view_mask``."""
    mask = (df["split"] == name).to_numpy()
    if view_mask is not None:
        f = torch.as_tensor(feats[mask])
    else:
        f = None if feats is None else feats.select(mask) if lazy else torch.as_tensor(np.asarray(feats.select(mask)))
    s = Split(labels=torch.as_tensor(df["label"].to_numpy()[mask], dtype=torch.long),
              lat=torch.as_tensor(df["lat"].to_numpy()[mask]), lon=torch.as_tensor(df["lon"].to_numpy()[mask]),
              feats=f, paths=df["path"].to_numpy()[mask].tolist(),
              view_mask=torch.as_tensor(view_mask[mask]) if view_mask is not None else None)
    return s, mask


def as_array(feats):
    """Features for the numpy consumers (kNN, gallery): a tensor's array, or the view itself (read in blocks)."""
    return feats.numpy() if isinstance(feats, torch.Tensor) else feats


def run_experiment(cfg: Config, resume: str | Path | None = None, tracker: str | None = None) -> Path:
    """Deterministic kernels and ``train.threads`` intra-op threads (a resumed run: its own config's) for the
    run; the caller's torch settings are restored afterwards."""
    threads = Config.from_dict(read_json(Path(resume) / "config.json")).train.threads if resume else cfg.train.threads
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    was_threads = torch.get_num_threads()
    env = D.init_distributed(cfg.train.device)  # under torchrun: one rank of a data-parallel run
    D.quiet_unless_main(env)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_experiment(cfg, resume, tracker)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
        torch.set_num_threads(was_threads)


def _run_experiment(cfg: Config, resume: str | Path | None, tracker: str | None) -> Path:
    t_start = time.time()
    trk = get_tracker(tracker)  # an unusable tracker fails here, before any training
    runs_dir = Path(cfg.paths.runs_dir)
    env = D.current()
    main = env.is_main  # rank 0 writes every file, promotes and prints; the other ranks only train
    Precision(cfg.train.precision, D.device_for(cfg.train.device, env))  # a missing CUDA or fp16 on CPU: one line, before any file
    if resume:
        run_dir = Path(resume)
        cfg = Config.from_dict(read_json(run_dir / "config.json"))
        resume_state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        console.print(f"resuming {run_dir} from epoch {resume_state['epoch']} ({resume_state['phase']})", markup=False)
    else:
        run_dir = runs_dir / D.broadcast_object(new_run_id(cfg), env)
        if main:
            runs_dir.mkdir(parents=True, exist_ok=True)
            run_dir.mkdir(exist_ok=False)  # a run directory belongs to exactly one run
        resume_state = None
    run_id = run_dir.name
    if main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg.to_dict())
    seed_everything(cfg.train.seed)

    df, labels, stats = load_index(cfg)
    if "split" not in df.columns or df["split"].null_count() == df.height:
        raise FileNotFoundError("no splits: run `geolocate split` first")
    df = select_views(df.filter(pl.col("split").is_not_null()), cfg.model.views)
    space = label_space(cfg, labels)
    class_lat, class_lon, names, n_cls = space.lat, space.lon, space.places, space.num_classes

    spec = cfg.model.backbone
    pretrained = is_pretrained(spec)
    backbone = backbone_for(cfg.model, pretrained)
    cache_dir = Path(cfg.paths.data_dir) / "cache" / "embeddings"
    ids, paths = df["id"].to_list(), df["path"].to_list()
    feats = None
    if pretrained:
        feats, ok = D.main_first(env, lambda: cached_embedding_view(backbone, ids, paths, cache_dir, engine=cfg.train.embed_engine,
                                                                    device=cfg.train.device))
        if (~ok).any():
            console.print(tagged("warning", f"{(~ok).sum()} unreadable images left out of this run"))
            df, feats = df.filter(pl.Series(ok)), feats.select(ok)
            ids, paths = df["id"].to_list(), df["path"].to_list()
    # the samples: index rows, or (model.fusion) the views of each group_id, fused over their cached embeddings
    samples, frame, sample_feats, view_mask = None, df, feats, None
    if cfg.model.fusion != "none":
        if not pretrained:
            raise ValueError(f"model.fusion fuses cached embeddings of a pretrained backbone; {spec!r} trains from scratch")
        samples = group_views(df, cfg.model.views)
        frame = samples.frame
        sample_feats, view_mask = samples.gather(np.nan_to_num(np.asarray(feats, dtype=np.float32)))
        console.print(f"samples: {len(samples)} of up to {len(samples.slots)} views ({', '.join(samples.slots)}), "
                      f"{int(view_mask.sum())} images", markup=False, highlight=False)
    train, mtr = _split(frame, sample_feats, "train", lazy=True, view_mask=view_mask)
    val, mva = _split(frame, sample_feats, "val", view_mask=view_mask)
    test, mte = _split(frame, sample_feats, "test", view_mask=view_mask)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"empty split: train={len(train)} val={len(val)}; add data or change index.split_ratios")
    train_counts = np.bincount(train.labels.numpy(), minlength=n_cls)

    history: list[dict] = list(resume_state["history"]) if resume_state else []

    def on_epoch(row: dict) -> None:
        history.append(row)
        A.write_metrics_csv(run_dir / "metrics.csv", history)

    trainer = Trainer(cfg, space, train_counts, run_dir / "checkpoints", on_epoch)
    fusion = None
    if samples is not None:
        with torch.random.fork_rng():  # the head starts from the same weights with or without a fusion
            fusion = create_fusion(cfg.model.fusion, backbone.num_features, samples.slots, **FUSIONS[cfg.model.fusion].config_kwargs(cfg))
    head_in = fusion.out_features if fusion is not None else backbone.num_features
    head = create_head(cfg.model.head, head_in, space, **HEADS[cfg.model.head].config_kwargs(cfg))
    head.prepare(train.lat.numpy(), train.lon.numpy())  # a gallery head's gallery (a no-op for the others)
    model = GeoModel(backbone, head, fusion)
    finetune_epochs = cfg.train.finetune_epochs if pretrained else max(cfg.train.finetune_epochs, cfg.train.epochs)
    state: dict = {}
    augment = augment_for(cfg, stats.get("sources", {}))  # training only: copies of the train split's embeddings, fine-tuning batches
    resumed_phase = resume_state["phase"] if resume_state else None
    if pretrained and resumed_phase not in ("finetune", "partial"):
        fit_train = D.main_first(env, lambda: with_augmented_copies(train, backbone, frame["id"].to_numpy()[mtr].tolist(), train.paths,
                                                                    cache_dir, augment, cfg.augment.copies, cfg.train.embed_engine))
        state = trainer.fit_head(head, fit_train, val, resume_state, fusion=fusion)
        history[:] = state["history"]
    if fusion is not None:  # from here on every split is its fused features: what the trained head reads
        fusion.eval()
        for s in (train, val, test):
            s.feats, s.view_mask = fused_features(fusion, s), None
    partial = pretrained and cfg.train.partial_blocks > 0  # (config: not with a fusion)
    if partial:
        state = run_partial(cfg, trainer, backbone, head, frame, (train, mtr), (val, mva), (test, mte), augment,
                            resume_state if resumed_phase == "partial" else None, state)
        history[:] = state["history"]
    if finetune_epochs > 0:
        state = trainer.fit_finetune(model, train, val, lambda m, p, aug, g: image_batch(m.preprocess, p, augment if aug else None, g),
                                     epochs=finetune_epochs, backbone_lr_mult=cfg.train.finetune_lr_mult if pretrained else 1.0,
                                     resume=resume_state if resume_state and resume_state["phase"] == "finetune" else None,
                                     history=state.get("history", []), start=state.get("stopper"))
        history[:] = state["history"]
    if not main:
        return run_dir  # rank 0 evaluates and writes every artifact
    if finetune_epochs > 0:
        # features of the trained backbone for evaluation and kNN
        feats, ok = embed_paths(backbone, paths, desc="embedding (trained backbone)", engine=cfg.train.embed_engine,
                                device=cfg.train.device)
        for s, m in ((train, mtr), (val, mva), (test, mte)):
            s.feats = torch.as_tensor(np.nan_to_num(feats[m]))
    A.write_metrics_csv(run_dir / "metrics.csv", history)

    # ---- evaluation: model vs prior vs kNN on val and test -------------------
    model.eval()
    metrics, baselines = {}, {"prior": {}, "knn": {}}
    test_rows = None
    calibration = calibrate_head(cfg, head, val, test)
    split_probs, split_points = {}, {}
    for name, s in (("val", val), ("test", test)):
        if len(s):
            split_probs[name], split_points[name] = decode_split(head, s.feats, class_lat, class_lon)
    head_points = dict(split_points)  # the head's own points (its regressed ones, or the top cells' anchors)
    # a head that regresses a point answers with it only where it beats the top cell's anchor on validation
    use_head_point = bool(head.has_point) and ("val" not in split_probs or metric("median_km").better(
        _median_km(val, split_points["val"]), _median_km(val, top_anchors(split_probs["val"], class_lat, class_lon))))
    if head.has_point and not use_head_point:
        split_points = {n: top_anchors(p, class_lat, class_lon) for n, p in split_probs.items()}
        console.print("answer point: the top cell's anchor (the head's regressed point loses to it on validation)",
                      markup=False, highlight=False)
    gallery = (build_gallery(train, backbone.cache_name, n_cls)
               if len(val) and (cfg.eval.refine != "off" or "feature" in cfg.eval.rerank) else None)
    # the answer: the head's probabilities (or reranked ones), its point (or a refined one), all chosen on validation
    answers = {"plain": Answer(dict(split_probs), dict(split_points), choose_refinement(cfg, gallery, val, split_probs.get("val"),
                                                                            split_points.get("val"), class_lat, class_lon))}
    reranking = choose_rerank(cfg, train_counts, gallery, val, split_probs.get("val"), split_points.get("val"), class_lat,
                              class_lon, use_head_point)
    rerank_ctx = lambda s: RerankContext(class_lat, class_lon, train_counts, gallery, s.feats.numpy())  # noqa: E731
    if reranking is not None and reranking.stages:
        rr_probs = {n: apply_reranking(reranking.stages, p, rerank_ctx(val if n == "val" else test)) for n, p in split_probs.items()}
        if calibration.get("fitted"):
            # reranking moves probability mass: the chain ends with a temperature fit on validation, as the head's was
            from ..evaluation.calibration import fit_temperature

            t_answer = round(fit_temperature(np.log(np.clip(rr_probs["val"], 1e-300, None)), val.labels.numpy(),
                                             objective=cfg.eval.calibration_objective), 4)
            temper = Stage("temperature", {"t": t_answer})
            reranking.stages.append(temper)
            rr_probs = {n: apply_reranking([temper], p, rerank_ctx(val if n == "val" else test)) for n, p in rr_probs.items()}
            calibration["answer_temperature"] = t_answer
        rr_points = {n: answer_points(split_probs[n], rr_probs[n], rerank_ctx(val if n == "val" else test),
                                      split_points[n] if use_head_point else None)
                     for n in split_probs}
        answers["reranked"] = Answer(rr_probs, rr_points, choose_refinement(cfg, gallery, val, rr_probs.get("val"),
                                                                            rr_points.get("val"), class_lat, class_lon))
    chosen = min(answers, key=lambda k: answers[k].val_km(val))  # "plain" first: it wins ties
    candidate = answers[chosen].refinement
    shipped = candidate is not None and candidate.shipped
    reranked = chosen == "reranked"
    if reranking is not None and reranking.stages:
        console.print(f"reranking ({', '.join(s.name for s in reranking.stages)}) on validation: "
                      f"{metric('median_km').fmt(answers['reranked'].val_km(val), unit=True)} against "
                      f"{metric('median_km').fmt(answers['plain'].val_km(val), unit=True)} without; "
                      f"{'shipped' if reranked else 'not shipped'}", markup=False, highlight=False)
    ablation: dict = {"cell_anchor": {}, "head_point": {}, "refined": {}, "reranked": {}, "reranked_refined": {},
                      **{f"rerank_{k}": {} for k in (reranking.alone if reranking else ())}}
    regions = RegionSpace.from_points(class_lat, class_lon)  # country + admin1 of each class anchor
    for name, s in (("val", val), ("test", test)):
        if len(s) == 0:
            continue
        y, la, lo = s.labels.numpy(), s.lat.numpy(), s.lon.numpy()
        probs = split_probs[name]
        pred = probs.argmax(1)
        ablation["cell_anchor"][name] = evaluate(probs, y, la, lo, class_lat[pred], class_lon[pred], regions=regions)
        if head.has_point:
            ablation["head_point"][name] = evaluate(probs, y, la, lo, *head_points[name], regions=regions)
        refined = {}  # answer -> its refined points on this split
        for key, ans in answers.items():
            if key == "reranked":
                ablation[key][name] = evaluate(ans.probs[name], y, la, lo, *ans.points[name], regions=regions)
            if ans.refinement is not None:
                refined[key] = refined_points(ans.refinement, s.feats.numpy(), ans.probs[name], *ans.points[name])
                ablation["reranked_refined" if key == "reranked" else "refined"][name] = evaluate(
                    ans.probs[name], y, la, lo, *refined[key], regions=regions)
        for k, st in (reranking.alone.items() if reranking else ()):  # each stage alone at its best grid point
            p1 = apply_reranking([st], probs, rerank_ctx(s))
            ablation[f"rerank_{k}"][name] = evaluate(p1, y, la, lo, *answer_points(probs, p1, rerank_ctx(s),
                                                     split_points[name] if use_head_point else None), regions=regions)
        ans = answers[chosen]
        probs, (pt_lat, pt_lon) = ans.probs[name], ans.points[name]
        split_probs[name] = probs  # what the confidence tools (calibration sets, selective, regions) read
        pred = probs.argmax(1)
        if shipped:
            pt_lat, pt_lon = refined[chosen]
        metrics[name] = (ablation["reranked_refined" if reranked else "refined"] if shipped
                         else ablation["reranked"] if reranked else ablation["head_point" if use_head_point else "cell_anchor"])[name]
        sc, prior_lat, prior_lon = prior_predict(train.labels.numpy(), n_cls, len(s), class_lat, class_lon)
        baselines["prior"][name] = evaluate(sc, y, la, lo, prior_lat, prior_lon, regions=regions)
        sc, pla, plo = knn_predict(as_array(train.feats), train.labels.numpy(), train.lat.numpy(), train.lon.numpy(),
                                   s.feats.numpy(), n_cls, k=cfg.eval.knn_k)
        baselines["knn"][name] = evaluate(sc, y, la, lo, pla, plo, regions=regions)
        if name == "test":
            d_model = haversine_km(la, lo, pt_lat, pt_lon)
            test_rows = pl.DataFrame({
                "id": frame["id"].to_numpy()[mte], "lat": la, "lon": lo, "label": y, "pred_label": pred,
                "pred_lat": pt_lat, "pred_lon": pt_lon, "prob": probs.max(1), "error_km": d_model,
                "knn_lat": pla, "knn_lon": plo, "knn_error_km": haversine_km(la, lo, pla, plo),
                "prior_error_km": haversine_km(la, lo, prior_lat, prior_lon),
            })
    if calibration.get("fitted"):  # the confidence the answer reports: after reranking, when that ships
        from ..evaluation.calibration import ece, ece_floor

        for name, s in (("val", val), ("test", test)):
            if name in split_probs:
                calibration[f"{name}_ece_answer"] = round(ece(split_probs[name], s.labels.numpy()), 4)
                calibration[f"{name}_ece_floor"] = round(ece_floor(split_probs[name]), 4)  # a perfectly calibrated model's
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
    backbone_trained = finetune_epochs > 0 or partial
    meta = {"run_id": run_id, "metrics": {"test": metrics["test"], "val": metrics["val"]}, "dataset_fingerprint": stats["fingerprint"],
            "use_head_point": use_head_point,  # the predictor ignores a regressed point that lost to the anchors
            "sources": stats.get("sources", {}), "images": stats["images"],
            "best_val_loss": ((state.get("stopper") or {}).get("best_row") or {}).get("val_loss")}  # ensembles weigh members by it
    uses_gallery = shipped or (reranked and any(st.name == "feature" for st in reranking.stages))
    gallery_sha = gallery.save(gallery_path(model_path)) if uses_gallery else None
    if shipped:
        meta["refine"] = {"params": candidate.params.to_dict(), "features": gallery.features, "val_median_km": round(candidate.val_km, 3),
                          "gallery_sha256": gallery_sha, "gallery_size": len(gallery)}
    if reranked:  # decode-time reranking: the stages and what they read (training counts; the gallery for "feature")
        meta["rerank"] = {"stages": [st.to_dict() for st in reranking.stages], "counts": train_counts.tolist(),
                          **({"features": gallery.features, "gallery_sha256": gallery_sha, "gallery_size": len(gallery)}
                             if uses_gallery else {})}
    confidence = assess_confidence(cfg, run_dir, model_path, meta, calibration, labels["classes"], train, val, test, split_probs,
                                   None if test_rows is None else test_rows["error_km"].to_numpy(), backbone.cache_name, regions,
                                   gallery=gallery)
    save_model(model_path, model, spec, space, backbone_trained, meta)

    # the gate reads validation, like the choice of epoch; test is only reported
    gate_key, gate_split = cfg.eval.gate_metric, "val"
    gate_value = float(metrics[gate_split][gate_key])
    split_fp = dataset_fingerprint(df["id"].to_list(), df["split"].to_list())
    promoted, previous = promote_best(Path(cfg.paths.models_dir), model_path, run_id, f"{gate_split}/{gate_key}", gate_value,
                                      f"{stats['fingerprint']}/{split_fp}")
    stopper = state.get("stopper") or {}
    best_row = stopper.get("best_row") or {}
    split_counts = {k: int(v) for k, v in df.group_by("split").len().iter_rows()}
    summary = {
        "schema_version": A.SCHEMA_VERSION,
        "run_id": run_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(time.time() - t_start, 2),
        "status": "completed",
        "dataset": {"fingerprint": stats["fingerprint"], "split_fingerprint": split_fp, "images": int(df.height),
                    "samples": int(frame.height), "views": ",".join(samples.slots) if samples is not None else "",
                    "cells": n_cls, "h3_resolution": stats["h3_resolution"],
                    "splits": split_counts, "sources": stats.get("sources", {})},
        "config": {"backbone": spec, "head": cfg.model.head, "head_kwargs": dict(head.kwargs), "fusion": cfg.model.fusion,
                   "levels": [lv.name for lv in space.levels], "loss": cfg.train.loss, "epochs": cfg.train.epochs,
                   "finetune_epochs": cfg.train.finetune_epochs,
                   "lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "device": str(trainer.device),
                   "precision": cfg.train.precision, "world_size": env.world_size, "geo_tau_km": cfg.train.geo_tau_km,
                   "geo_mix_ce": cfg.train.geo_mix_ce, "seed": cfg.train.seed, "threads": torch.get_num_threads(),
                   "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
                   "monitor": cfg.train.monitor, "monitor_ema": cfg.train.monitor_ema, "patience": cfg.train.patience,
                   "min_epochs": cfg.train.min_epochs, "knn_k": cfg.eval.knn_k,
                   "partial_blocks": cfg.train.partial_blocks if partial else 0,
                   "partial_epochs": cfg.train.partial_epochs if partial else 0,
                   "partial_lr_mult": cfg.train.partial_lr_mult, "partial_copies": cfg.train.partial_copies if partial else 0,
                   "h3_resolution": cfg.index.h3_resolution, "min_cell_samples": cfg.index.min_cell_samples},
        "training": {"epochs_run": len(history), "best_epoch": best_row.get("epoch"), "best_phase": best_row.get("phase"),
                     "best_val_median_km": best_row.get("val_median_km"), "best_val_acc": best_row.get("val_top1"),
                     "best_val_loss": best_row.get("val_loss"), "best_val_geoscore": best_row.get("val_geoscore"),
                     "best_monitor": stopper.get("best"), "stopped_early": bool(state.get("stopped_early", False))},
        "metrics": metrics,
        "baselines": baselines,
        "calibration": calibration,
        **confidence,  # conformal, selective, ood, regions
        "answer_point": {"refined": shipped, "head_point": use_head_point,
                         "params": candidate.params.to_dict() if shipped else None,
                         "reranked": reranked, "rerank": None if reranking is None else reranking.to_dict(),
                         "ablation": {k: v for k, v in ablation.items() if v}},
        "gate": {"metric": gate_key, "split": gate_split, "value": gate_value, "previous": previous, "promoted": promoted},
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


def run_partial(cfg, trainer: Trainer, backbone, head, df: pl.DataFrame, train_m, val_m, test_m, augment, resume, state: dict) -> dict:
    """The ``partial`` phase: trunk activations cached once (clean for every image, ``train.partial_copies``
    augmented copies of the training images), the tail + head trained over them, then every split's features
    recomputed through the trained tail (evaluation, calibration, kNN and refinement read those)."""
    from ..training.partial import Rows, TailModel, cached_activations, tail_features

    if not hasattr(backbone, "partial_split"):
        raise ValueError(f"train.partial_blocks: backbone {cfg.model.backbone!r} has no partial_split (use efficientnet_lite0)")
    trunk, tail = backbone.partial_split(cfg.train.partial_blocks)
    cache_dir = Path(cfg.paths.data_dir) / "cache" / "activations"
    name = f"{backbone.cache_name}-trunk{cfg.train.partial_blocks}"
    paths = df["path"].to_list()
    acts, ok = cached_activations(trunk, backbone.preprocess, paths, cache_dir, name)
    if not ok.all():  # the frozen embeddings already left unreadable images out: a file that changed since
        raise ValueError(f"{int((~ok).sum())} images became unreadable between embedding and caching activations")
    (train, mtr), (val, mva), (test, mte) = train_m, val_m, test_m
    where = {m: np.flatnonzero(mask) for m, mask in (("train", mtr), ("val", mva), ("test", mte))}

    class View:  # rows of the all-images cache for one split
        def __init__(self, rows):
            self.rows, self.shape = rows, (len(rows),) + acts.shape[1:]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, idx):
            return acts[self.rows[idx]]

    train_parts, keep = [View(where["train"])], [np.ones(len(train), bool)]
    train_paths = [paths[i] for i in where["train"]]
    for k in range(cfg.train.partial_copies):
        a, okk = cached_activations(trunk, backbone.preprocess, train_paths, cache_dir, name, augment=augment, copy=k)
        train_parts.append(a)
        keep.append(okk)
    reps = 1 + cfg.train.partial_copies
    mask = torch.as_tensor(np.concatenate(keep))
    rows = Rows(train_parts)
    fit_train = Split(labels=train.labels.repeat(reps), lat=train.lat.repeat(reps), lon=train.lon.repeat(reps))
    if (~mask).any():  # unreadable augmented copies: their rows are left out
        good = torch.nonzero(mask).squeeze(1).numpy()
        rows = _Subset(rows, good)
        fit_train = Split(labels=fit_train.labels[good], lat=fit_train.lat[good], lon=fit_train.lon[good])
    model = TailModel(tail, head)
    state = trainer.fit_partial(model, rows, fit_train, Rows([View(where["val"])]), val, cfg.train.partial_epochs,
                                cfg.train.partial_lr_mult, resume=resume, history=state.get("history", []), start=state.get("stopper"))
    feats = tail_features(model, Rows([acts]))
    for s, m in ((train, mtr), (val, mva), (test, mte)):
        s.feats = feats[torch.as_tensor(m)]
    return state


class _Subset:
    def __init__(self, rows, keep: np.ndarray):
        self.rows, self.keep = rows, keep

    def __len__(self):
        return len(self.keep)

    def take(self, idx):
        return self.rows.take(self.keep[np.asarray(idx)])


def calibrate_head(cfg, head, val: Split, test: Split) -> dict:
    """Temperature scaling fit on validation and kept in the head (its temperature buffer); ECE before/after on val (and test)."""
    from ..evaluation.calibration import ece, fit_temperature, softmax

    if not cfg.eval.calibrate or len(val) == 0:
        return {"temperature": 1.0, "fitted": False}
    head.eval()
    with torch.no_grad():
        logits = {n: head.log_probs(head(s.feats)).double().numpy() for n, s in (("val", val), ("test", test)) if len(s)}
    t = fit_temperature(logits["val"], val.labels.numpy(), objective=cfg.eval.calibration_objective)
    head.set_temperature(t)
    out: dict = {"temperature": round(t, 4), "fitted": True, "objective": cfg.eval.calibration_objective}
    for n, z in logits.items():
        y = (val if n == "val" else test).labels.numpy()
        out[f"{n}_ece_before"], out[f"{n}_ece_after"] = round(ece(softmax(z), y), 4), round(ece(softmax(z, t), y), 4)
    console.print(f"calibration: temperature {t:.2f} fit on validation; val ECE {out['val_ece_before']:.3f} -> "
                  f"{out['val_ece_after']:.3f}", markup=False, highlight=False)
    return out


class Refinement(NamedTuple):
    """Refinement inside the top cells, as measured on validation."""
    gallery: Gallery
    params: RefineParams
    val_km: float   # validation median with these parameters
    shipped: bool   # it beat the cell anchors on validation (``eval.refine: auto``), or ``eval.refine`` is ``always``


class Answer(NamedTuple):
    """One way of answering: per split, the probabilities and the head's point, and the refinement measured on them."""
    probs: dict
    points: dict
    refinement: Refinement | None

    def val_km(self, val: Split) -> float:
        """Validation median of this answer as it would ship (refined when its refinement ships)."""
        if self.refinement is not None and self.refinement.shipped:
            return self.refinement.val_km
        return float(np.median(haversine_km(val.lat.numpy(), val.lon.numpy(), *self.points["val"])))


def build_gallery(train: Split, features: str, n_cls: int) -> Gallery:
    """The training embeddings + locations (+ place names): what refinement and feature reranking search."""
    from ..geo import place_names

    la, lo = train.lat.numpy(), train.lon.numpy()
    return Gallery.build(as_array(train.feats), la, lo, train.labels.numpy(), features, n_cls,
                         places=[p["label"] for p in place_names(zip(la, lo))])


def choose_refinement(cfg, gallery: Gallery | None, val: Split, val_probs, val_points,
                      class_lat: np.ndarray, class_lon: np.ndarray) -> Refinement | None:
    """The best refinement on validation (against the head's own answer point), None when ``eval.refine`` is off."""
    if cfg.eval.refine == "off" or gallery is None or val_probs is None or len(val) == 0:
        return None
    params, val_km = choose_params(gallery, val.feats.numpy(), val_probs, val.lat.numpy(), val.lon.numpy(), class_lat, class_lon,
                                   fallback=val_points)
    head_km = float(np.median(haversine_km(val.lat.numpy(), val.lon.numpy(), *val_points)))
    km = metric("median_km")
    console.print(f"answer point on validation: the head's {km.fmt(head_km, unit=True)}, refined in the top {params.top_k} cells "
                  f"(T={params.temperature}, {params.neighbours} neighbours) {km.fmt(val_km, unit=True)}", markup=False, highlight=False)
    return Refinement(gallery, params, val_km, bool(km.better(val_km, head_km) or cfg.eval.refine == "always"))


def choose_rerank(cfg, train_counts: np.ndarray, gallery: Gallery | None, val: Split, val_probs, val_points,
                  class_lat: np.ndarray, class_lon: np.ndarray, has_point: bool) -> Reranking | None:
    """The reranking stages (``eval.rerank``, in order) that improve validation, None when none are configured."""
    if not cfg.eval.rerank or val_probs is None or len(val) == 0:
        return None
    ctx = RerankContext(class_lat, class_lon, train_counts, gallery, val.feats.numpy())
    return choose_reranking(val_probs, ctx, val.lat.numpy(), val.lon.numpy(), val_points if has_point else None,
                            order=cfg.eval.rerank)


def refined_points(candidate: Refinement, feats: np.ndarray, probs: np.ndarray, pt_lat: np.ndarray, pt_lon: np.ndarray):
    """Refined answers; where no gallery item lies in the top cells, the head's own point is kept."""
    r_lat, r_lon, _ = refine(candidate.gallery, feats, probs, candidate.params, fallback=(pt_lat, pt_lon))
    return r_lat, r_lon


def top_anchors(probs: np.ndarray, class_lat: np.ndarray, class_lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) of each row's top cell's anchor: the answer point of probabilities alone."""
    top = probs.argmax(1)
    return class_lat[top].astype(np.float64), class_lon[top].astype(np.float64)


def _median_km(split: Split, points: tuple[np.ndarray, np.ndarray]) -> float:
    return float(np.median(haversine_km(split.lat.numpy(), split.lon.numpy(), *points)))


def decode_split(head, feats: torch.Tensor, class_lat: np.ndarray, class_lon: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """(calibrated probabilities, (lat, lon) of the head's answer: its regressed point, else the top cell's anchor)."""
    head.eval()
    with torch.no_grad():
        dec = head.decode(head(feats))
    probs = dec.probabilities.double().numpy()
    if dec.point is not None:
        return probs, (dec.point[:, 0].double().numpy(), dec.point[:, 1].double().numpy())
    return probs, top_anchors(probs, class_lat, class_lon)


def label_space(cfg, labels: dict) -> LabelSpace:
    """The index's classes with the coarser levels ``model.levels`` (default: one level up, when there is one)."""
    space = LabelSpace.from_dict(labels)
    res = space.h3_resolution
    wanted = cfg.model.levels or ([res - 1] if res else [])
    return space.with_levels(wanted) if wanted else space


def promote_best(models_dir: Path, model_path: Path, run_id: str, metric: str, value: float, fingerprint: str) -> tuple[bool, float | None]:
    """Copy the run's model to models/best.pt (+ best.json) only if ``metric`` improved on the current best.

    ``fingerprint`` names the dataset and its split (``<index>/<split>``). A best model measured on another
    dataset, split or metric is not comparable: it is kept as the best of its own dataset, moved to
    ``models/by-dataset/<its fingerprint>/`` (best.pt, gallery, best.json), and the new model takes
    ``models/best.pt``, with a warning naming where the old one went; ``best.json`` records what it replaced.
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
                    kept = archive_best(models_dir, old)
                    console.print(tagged("warning", f"models/best.pt ({old.get('run_id')}) was measured on another dataset, split "
                                                    f"or metric ({old.get('metric')}); it stays the best of its dataset in {kept}, "
                                                    f"and {run_id} becomes models/best.pt"))
            except (KeyError, ValueError, TypeError, AttributeError, json.JSONDecodeError):
                previous = None
        own = models_dir / "by-dataset" / fingerprint.replace("/", "_")
        if not (models_dir / "best.pt").exists() and (own / "best.json").is_file():
            # this dataset's own best, archived when another dataset took best.pt: it is the one to beat
            try:
                kept = read_json(own / "best.json")
                previous = float(kept["value"]) if kept.get("metric") == metric else None
            except (KeyError, ValueError, TypeError, json.JSONDecodeError):
                previous = None
            if previous is not None and not improves(metric, value, previous):
                _move_best(own, models_dir)  # back to models/best.pt: the best of the dataset trained last
                console.print(tagged("warning", f"{run_id} did not beat this dataset's best ({kept.get('run_id')}), "
                                                "which is models/best.pt again"))
                return False, previous
        if previous is not None and not improves(metric, value, previous):
            return False, previous
        data = model_path.read_bytes()
        gallery = gallery_path(model_path)
        if gallery.is_file():  # first the gallery best.pt pins by sha256, then best.pt
            g = gallery.read_bytes()
            atomic_write(gallery_path(models_dir / "best.pt"), lambda p: p.write_bytes(g), suffix=".npz")
        else:
            gallery_path(models_dir / "best.pt").unlink(missing_ok=True)
        atomic_write(models_dir / "best.pt", lambda p: p.write_bytes(data), suffix=".pt")
        write_json(best_json, {"run_id": run_id, "metric": metric, "value": value, "previous": previous,
                               "dataset_fingerprint": fingerprint.split("/")[0], "fingerprint": fingerprint,
                               "sha256": hashlib.sha256(data).hexdigest(),
                               "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        return True, previous


def archive_best(models_dir: Path, old: dict) -> Path:
    """Move the current best (model, gallery, best.json) to ``models/by-dataset/<fingerprint>/``; return that folder.

    Called with the promotion lock held. A folder that already holds a best of that dataset is replaced only by a
    better one of the same metric (the comparison ``promote_best`` would make); otherwise the archived copy stays."""
    fp = str(old.get("fingerprint", old.get("dataset_fingerprint", "unknown"))).replace("/", "_")
    dest = models_dir / "by-dataset" / fp
    dest.mkdir(parents=True, exist_ok=True)
    prev = dest / "best.json"
    if prev.exists():
        try:
            p = read_json(prev)
            if p.get("metric") == old.get("metric") and not improves(str(old["metric"]), float(old["value"]), float(p["value"])):
                return dest
        except (KeyError, ValueError, TypeError, json.JSONDecodeError):
            pass
    _move_best(models_dir, dest)
    return dest


def _move_best(src_dir: Path, dest_dir: Path) -> None:
    """best.pt, its gallery and best.json from one folder to another (same filesystem: each move is atomic)."""
    for name in ("best.pt", gallery_path(src_dir / "best.pt").name, "best.json"):
        src = src_dir / name
        if src.is_file():
            src.replace(dest_dir / name)

