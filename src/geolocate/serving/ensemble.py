"""Ensembles: several model files over one label space answer as one :class:`Geolocator`.

``Geolocator.from_pretrained(["a.pt", "b.pt"], ensemble="val-median")`` (or ``geolocate predict --model a.pt
--model b.pt``) loads every member with its own engine and wraps them in an :class:`EnsembleEngine`, which has the
engine interface (``run(batch) -> {"probabilities", "features"}``), so batching, the CLI and the server work
unchanged. Members must share the label space (the same cells in the same order) and the preprocessing (one
decoded input feeds every member); anything else is refused with one line naming the models.

The probabilities are combined by :data:`geolocate.tasks.combine.ENSEMBLE_METHODS` (``average``, ``val-median``
and ``val-loss`` weighted averages, ``rank`` fusion). The answer point is refined with the first member that has
a refinement gallery: its features, the ensemble's probabilities; that member's decode-time reranking stages
(``geolocate.tasks.rerank``) apply to the averaged probabilities, and not to rank fusion's scores.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..tasks.combine import ENSEMBLE_METHODS, combine, ensemble_weights, same_label_space


class EnsembleEngine:
    def __init__(self, engines: Sequence, method: str, weights: np.ndarray | None = None, feature_member: int | None = None):
        if method not in ENSEMBLE_METHODS:
            raise ValueError(f"unknown ensemble method {method!r}: choose one of {', '.join(ENSEMBLE_METHODS)}")
        self.engines = list(engines)
        self.method = method
        self.combiner = ENSEMBLE_METHODS[method][0]
        self.weights = weights
        self.feature_member = feature_member
        self.name = f"ensemble/{method}({', '.join(getattr(e, 'name', type(e).__name__) for e in self.engines)})"

    @property
    def has_features(self) -> bool:
        return self.feature_member is not None and bool(getattr(self.engines[self.feature_member], "has_features", False))

    def run(self, batch) -> dict[str, np.ndarray]:
        outs = [e.run(batch) if hasattr(e, "run") else {"probabilities": e.probabilities(batch)} for e in self.engines]
        stacked = np.stack([o["probabilities"] for o in outs], axis=1)  # (B, members, C)
        out = {"probabilities": np.stack([combine(self.combiner, row, self.weights) for row in stacked])}
        if self.has_features:
            out["features"] = outs[self.feature_member]["features"]
        return out

    def probabilities(self, batch) -> np.ndarray:
        return self.run(batch)["probabilities"]


def load_ensemble(paths: Sequence[str | Path], method: str = "average", **kw):
    """A Geolocator over several model files (see the module docstring); ``kw`` go to each member's from_pretrained."""
    from .predictor import Geolocator

    if method not in ENSEMBLE_METHODS:
        raise ValueError(f"unknown ensemble method {method!r}: choose one of {', '.join(ENSEMBLE_METHODS)}")
    if kw.get("onnx_path"):
        raise ValueError("onnx_path names one model's export; an ensemble finds each member's beside its model file")
    paths = [Path(p) for p in paths]
    members = [Geolocator.from_pretrained(p, **kw) for p in paths]
    first = members[0]
    for p, m in zip(paths[1:], members[1:]):
        why = same_label_space(first.classes, m.classes)
        if why:
            raise ValueError(f"{p} cannot join an ensemble with {paths[0]}: their label spaces differ ({why}); "
                             "ensemble only models trained on the same cells")
        if m.preprocess != first.preprocess:
            raise ValueError(f"{p} cannot join an ensemble with {paths[0]}: they preprocess differently "
                             f"({m.preprocess.size} px vs {first.preprocess.size} px, or other mean/std)")
    weight_source = ENSEMBLE_METHODS[method][1]
    weights = ensemble_weights([m.info.get("meta") for m in members], [str(p) for p in paths], weight_source)
    ref = next((i for i, m in enumerate(members) if m.gallery is not None), None)
    engine = EnsembleEngine([m.engine for m in members], method, weights, ref)
    base = members[ref if ref is not None else 0]
    info = dict(base.info)
    if method == "rank" and (info.get("meta") or {}).get("rerank"):
        # rank fusion gives rank scores, not probabilities: the member's decode-time reranking does not apply
        info["meta"] = {k: v for k, v in info["meta"].items() if k != "rerank"}
    info["ensemble"] = {"method": method, "members": [str(p) for p in paths],
                        "weights": None if weights is None else [round(float(w), 6) for w in weights],
                        "refined_with": None if ref is None else str(paths[ref])}
    geo = Geolocator(None, info, engine=engine, path=base.path if ref is not None else None, workers=kw.get("workers"))
    geo.members = members
    return geo
