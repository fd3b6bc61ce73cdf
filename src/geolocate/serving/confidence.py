"""What the predictor says about its own answer: region answers, the conformal cell set, the OOD flag, abstention.

:class:`Confidence` is built once per :class:`~geolocate.serving.predictor.Geolocator` from the model file's
``meta`` (written by ``runs.confidence.assess_confidence``): ``conformal`` (threshold fit on validation),
``ood`` (threshold fit on validation, gallery of training embeddings beside the model file), ``regions``
(country + admin1 of each class). A model without them still predicts: its predictions leave those fields
empty (regions are then looked up from the class anchors).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..evaluation.conformal import class_areas_km2, prediction_sets
from ..evaluation.ood import knn_distance, normalise
from ..evaluation.regions import TOPK_WEIGHTS, RegionSpace

TOP_REGIONS = len(TOPK_WEIGHTS)


def set_sentence(ps: dict | None) -> str | None:
    """"the photo is in one of these 3 cells (1,234,567 km²), with 90 % confidence"."""
    if not ps:
        return None
    n = ps["size"]
    cells = "this cell" if n == 1 else f"one of these {n} cells"
    return f"the photo is in {cells} ({ps['area_km2']:,.0f} km²), with {100 * ps['coverage']:g} % confidence"


def ood_warning(score: float, threshold: float) -> str:
    return (f"this photo is unlike the training images (out-of-distribution score {score:.3f} > {threshold:.3f}, "
            "fit on validation): treat the answer with caution")


def apply_min_confidence(pred, min_confidence: float | None):
    """Mark ``pred`` abstained when its top-1 confidence is below ``min_confidence`` (a prediction with an error
    is left alone)."""
    if min_confidence is not None and pred.error is None and pred.confidence is not None:
        pred.abstained = bool(pred.confidence < min_confidence)
    return pred


class Confidence:
    def __init__(self, classes: list[dict], meta: dict | None, gallery_feats: np.ndarray | None = None):
        meta = meta or {}
        self.classes = classes
        self.cells = [c["cell"] for c in classes]
        self._areas: np.ndarray | None = None
        self.conformal = meta.get("conformal") or None
        self.ood = meta.get("ood") if gallery_feats is not None else None
        self.gallery_feats = None if gallery_feats is None else normalise(gallery_feats)
        self._regions_meta = meta.get("regions")
        self._regions: RegionSpace | None = None

    @classmethod
    def load(cls, info: dict, classes: list[dict], model_file: Path | None, gallery=None, engine_has_features: bool = True) -> "Confidence":
        """From the model info; the OOD gallery is ``gallery`` when it is the one pinned in ``meta.ood`` (the refinement
        gallery, already loaded), else read from beside ``model_file``. A bad gallery warns and turns the flag off."""
        meta = info.get("meta") or {}
        spec = meta.get("ood")
        feats = None
        if spec and engine_has_features:
            from ..tasks.refine import shipped_gallery

            held = shipped_gallery(meta)  # the gallery the predictor already holds, when it is the one pinned here
            if gallery is not None and held is not None and held["gallery_sha256"] == spec.get("gallery_sha256"):
                feats = gallery.feats
            elif model_file is not None:
                from ..tasks.refine import Gallery, GalleryError, gallery_path

                try:
                    feats = Gallery.load(gallery_path(model_file), sha256=spec.get("gallery_sha256"), features=spec.get("features"),
                                         num_classes=len(classes)).feats
                except GalleryError as e:
                    from ..progress import console, tagged

                    console.print(tagged("warning", f"{e}; no out-of-distribution flag"), highlight=False, soft_wrap=True)
        return cls(classes, meta, feats)

    @property
    def needs_features(self) -> bool:
        return self.ood is not None

    @property
    def areas(self) -> np.ndarray:
        if self._areas is None:
            self._areas = class_areas_km2(self.cells)
        return self._areas

    @property
    def regions(self) -> RegionSpace:
        if self._regions is None:
            try:
                self._regions = RegionSpace.from_dict(self._regions_meta, len(self.classes)) if self._regions_meta else None
            except (KeyError, TypeError, ValueError):
                self._regions = None
            if self._regions is None:  # an older model: the regions of its class anchors
                self._regions = RegionSpace.from_points([c["lat"] for c in self.classes], [c["lon"] for c in self.classes])
        return self._regions

    def card(self) -> dict:
        return {"conformal": self.conformal, "ood": None if self.ood is None else {k: v for k, v in self.ood.items() if k != "gallery_sha256"}}

    def ood_scores(self, feats: np.ndarray) -> np.ndarray | None:
        """(B,) OOD scores of a batch of embeddings (None without the flag)."""
        if self.ood is None or feats is None:
            return None
        return knn_distance(self.gallery_feats, feats, int(self.ood.get("neighbours", 5)), normalised=True)

    def annotate(self, pred, probs: np.ndarray, ood_score: float | None = None) -> None:
        """Fill ``pred.regions``, ``pred.prediction_set`` and ``pred.ood`` / ``ood_score`` / ``warning``."""
        from .predictor import RegionPrediction

        p = np.asarray(probs, dtype=np.float64)[None]
        idx, rp = self.regions.top(p, TOP_REGIONS)
        pred.regions = [RegionPrediction(region=self.regions.labels[i], key=self.regions.keys[i], probability=float(q))
                        for i, q in zip(idx[0].tolist(), rp[0].tolist())]
        if self.conformal:
            thr = self.conformal.get("threshold")
            mask = prediction_sets(p, math.inf if thr is None else float(thr), self.conformal.get("score", "aps"))[0]
            members = np.flatnonzero(mask)
            members = members[np.argsort(-p[0, members], kind="stable")]
            pred.prediction_set = {"coverage": float(self.conformal["coverage"]), "size": int(len(members)),
                                   "area_km2": float(self.areas[members].sum()), "cells": [self.cells[i] for i in members]}
        if self.ood is not None and ood_score is not None and math.isfinite(ood_score):
            score, thr = float(ood_score), float(self.ood["threshold"])
            pred.ood_score, pred.ood = round(score, 6), bool(score > thr)
            if pred.ood:
                pred.warning = ood_warning(score, thr)
