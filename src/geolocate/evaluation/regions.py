"""Region answers: country + first-level region (GeoNames admin1) per class, and the region-level scores.

Each class gets the region of its anchor point (nearest GeoNames place via ``geo.place_names``); a region's
probability is the sum of its classes' probabilities. Scores (both in the metric catalogue):

- ``region_wtop5``: weighted top-5 region score: 1, 0.6, 0.4, 0.25, 0.15 for the true region at rank 1..5
  of the region answers, 0 otherwise; the true region is the one of the true location;
- ``competition``: 0.7 × weighted top-5 + 0.3 × max(0, 1 − d / 5000 km), d the error of the answer point.
"""
from __future__ import annotations

import dataclasses as dc
from typing import Iterable, Sequence

import numpy as np

TOPK_WEIGHTS = (1.0, 0.6, 0.4, 0.25, 0.15)
COMPETITION_KM = 5000.0
COMPETITION_MIX = 0.7  # weight of the region score; 1 - this goes to the distance score


def region_of(place: dict) -> tuple[str, str]:
    """(key, label) of a ``place_names`` entry: ``SE/Skane`` and ``Skane, SE`` (the country alone without admin1)."""
    cc, admin1 = str(place.get("cc") or "??"), str(place.get("admin1") or "")
    return f"{cc}/{admin1}", (f"{admin1}, {cc}" if admin1 else cc)


def regions_of_points(points: Iterable[tuple[float, float]]) -> list[str]:
    from ..geo import place_names

    return [region_of(p)[0] for p in place_names(points)]


@dc.dataclass(frozen=True)
class RegionSpace:
    keys: list[str]         # region keys (``CC/admin1``), sorted
    labels: list[str]       # display labels, same order
    of_class: np.ndarray    # (C,) region index of each class

    @classmethod
    def from_points(cls, lat: Sequence[float], lon: Sequence[float]) -> "RegionSpace":
        """Regions of the class anchors (lat, lon per class)."""
        from ..geo import place_names

        pairs = [region_of(p) for p in place_names(zip(lat, lon))]
        return cls.from_pairs(pairs)

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str]]) -> "RegionSpace":
        label = dict(pairs)
        keys = sorted(label)
        pos = {k: i for i, k in enumerate(keys)}
        return cls(keys, [label[k] for k in keys], np.array([pos[k] for k, _ in pairs], dtype=np.int64))

    def to_dict(self) -> dict:
        """For the model file's meta: the region of each class, and the labels."""
        return {"keys": list(self.keys), "labels": list(self.labels), "of_class": self.of_class.tolist()}

    @classmethod
    def from_dict(cls, d: dict, num_classes: int) -> "RegionSpace":
        keys, labels, of_class = list(d["keys"]), list(d["labels"]), np.asarray(d["of_class"], dtype=np.int64)
        if len(keys) != len(labels) or len(of_class) != num_classes or (len(of_class) and not 0 <= of_class.min() <= of_class.max() < len(keys)):
            raise ValueError(f"regions of {len(of_class)} classes over {len(keys)} regions do not fit a model of {num_classes} classes")
        return cls(keys, labels, of_class)

    def __len__(self) -> int:
        return len(self.keys)

    def probabilities(self, probs: np.ndarray) -> np.ndarray:
        """(N, R): summed class probabilities per region."""
        p = np.asarray(probs, dtype=np.float64)
        order = np.argsort(self.of_class, kind="stable")
        starts = np.searchsorted(self.of_class[order], np.arange(len(self.keys)))
        return np.add.reduceat(p[:, order], starts, axis=1)

    def top(self, probs: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """(N, k') region indices and probabilities, most probable first (k' = min(k, regions))."""
        rp = self.probabilities(probs)
        k = min(k, rp.shape[1])
        idx = np.argsort(-rp, axis=1, kind="stable")[:, :k]
        return idx, np.take_along_axis(rp, idx, axis=1)

    def index(self, keys: Sequence[str]) -> np.ndarray:
        """Region index of each key; -1 for a region no class belongs to."""
        pos = {k: i for i, k in enumerate(self.keys)}
        return np.array([pos.get(k, -1) for k in keys], dtype=np.int64)


def weighted_topk(ranked: np.ndarray, true: np.ndarray, weights: Sequence[float] = TOPK_WEIGHTS) -> np.ndarray:
    """(N,) per-row score: ``weights[r]`` when ``true`` is at rank r of ``ranked`` (N, k), else 0."""
    ranked = np.asarray(ranked)
    true = np.asarray(true)
    w = np.zeros(ranked.shape[1], dtype=np.float64)
    w[:min(len(weights), ranked.shape[1])] = weights[:ranked.shape[1]]
    hit = ranked[:, :len(w)] == true[:, None]
    return (hit * w).sum(1)  # a region appears once per row: at most one hit


def competition_scores(wtop: np.ndarray, d_km: np.ndarray) -> np.ndarray:
    """(N,) 0.7 × weighted top-5 + 0.3 × max(0, 1 − d / 5000)."""
    d = np.asarray(d_km, dtype=np.float64)
    return COMPETITION_MIX * np.asarray(wtop, dtype=np.float64) + (1 - COMPETITION_MIX) * np.maximum(0.0, 1.0 - d / COMPETITION_KM)


def region_metrics(scores: np.ndarray, regions: RegionSpace, true_lat, true_lon, d_km) -> dict:
    """``region_wtop5`` and ``competition`` of one prediction set (class scores (N, C), errors d_km of the answer point)."""
    if len(d_km) == 0:
        return {"region_wtop5": None, "competition": None}
    ranked, _ = regions.top(scores, len(TOPK_WEIGHTS))
    true = regions.index(regions_of_points(zip(true_lat, true_lon)))
    w = weighted_topk(ranked, true)
    return {"region_wtop5": float(w.mean()), "competition": float(competition_scores(w, d_km).mean())}
