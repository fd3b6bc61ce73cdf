"""Geolocation metrics (each key is in the metric catalogue, ``geolocate.catalogue``, and documented in
docs/summary_schema.md, "Metric table").

- distances: haversine, R = 6371.0088 km (``geo.haversine_km``)
- accuracy within r km counts d <= r, for r in 1, 25, 200, 750, 2500
- GeoScore = mean of 5000 * exp(-d / 1492.7) (``geo.geoscore``)
- top-k accuracy over cell classes
"""
from __future__ import annotations

import numpy as np

from ..catalogue import THRESHOLDS_KM, better
from ..geo import geoscore, haversine_km, place_names

__all__ = ["THRESHOLDS_KM", "improves", "distance_metrics", "topk_accuracy", "country_accuracy", "evaluate"]


def improves(metric: str, new: float, old: float) -> bool:
    """Whether ``new`` is strictly better than ``old`` for this metric (which may name its split: ``val/median_km``);
    the direction comes from the metric catalogue (``geolocate.catalogue``)."""
    return better(metric, new, old)


def distance_metrics(d_km) -> dict:
    d = np.asarray(d_km, dtype=np.float64)
    if d.size == 0:
        return {"n": 0}
    out = {
        "n": int(d.size),
        "mean_km": float(d.mean()),
        "median_km": float(np.median(d)),
        "p90_km": float(np.percentile(d, 90)),
        "p95_km": float(np.percentile(d, 95)),
    }
    for r in THRESHOLDS_KM:
        out[f"acc_{r}km"] = float((d <= r).mean())
    out["geoscore"] = geoscore(d)
    return out


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the k highest scores."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, kth=k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def country_accuracy(true_lat, true_lon, pred_lat, pred_lon) -> float:
    """Share of predictions in the same country as the truth (nearest GeoNames place)."""
    if len(true_lat) == 0:
        return float("nan")
    t = place_names(zip(true_lat, true_lon))
    p = place_names(zip(pred_lat, pred_lon))
    return float(np.mean([a["cc"] == b["cc"] for a, b in zip(t, p)]))


def evaluate(scores: np.ndarray, labels: np.ndarray, true_lat, true_lon, pred_lat, pred_lon, countries: bool = True,
             regions=None) -> dict:
    """All metrics for one prediction set: class scores (N, C) plus predicted coordinates; with ``regions`` (a
    :class:`~geolocate.evaluation.regions.RegionSpace` of the classes) also the region scores."""
    d = haversine_km(true_lat, true_lon, pred_lat, pred_lon)
    out = {"top1_acc": topk_accuracy(scores, labels, 1), "top5_acc": topk_accuracy(scores, labels, 5)}
    out.update(distance_metrics(d))
    if countries:
        out["country_acc"] = country_accuracy(true_lat, true_lon, pred_lat, pred_lon)
    if regions is not None:
        from .regions import region_metrics

        out.update(region_metrics(scores, regions, true_lat, true_lon, d))
    return out
