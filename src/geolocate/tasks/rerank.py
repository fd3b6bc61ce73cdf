"""Decode-time reranking of the cell probabilities: registered stages, chosen on validation, applied in order.

Every stage maps calibrated probabilities ``(n, C)`` to probabilities ``(n, C)``; the answer (top cells, the
anchor or refined point, the conformal set) is then read from the reranked ones. Stages:

- ``prior``: logit adjustment by the training cell frequencies, ``p'(c) ∝ p(c) · (n_c + 1)^alpha``. ``alpha > 0``
  leans towards the cells with many training photos (the answer is more often right where photos are dense),
  ``alpha < 0`` lifts the rare cells a class-imbalanced head under-predicts.
- ``smooth``: top-k geographic smoothing. Inside each query's ``k`` most probable cells,
  ``p'(c) = sum_j p(j) · exp(-d(c, j) / tau_km)`` (distances between the cells' anchors), rescaled to the mass
  those cells had: a cell surrounded by probable neighbours beats an isolated one of similar probability.
- ``feature``: feature-based reranking inside the top ``k`` cells, gated. For a query whose top probability is
  below ``gate`` (the uncertain ones, where the tail errors come from), ``p'(c) ∝ p(c) · exp(beta · s(c))`` with
  ``s(c)`` the highest cosine similarity between the query embedding and the training gallery items of cell ``c``
  (the same gallery refinement uses), rescaled to the top-k mass. Confident queries are left alone.
- ``temperature``: appended to a kept chain, ``softmax(log p / t)`` with ``t`` fit on validation, so the confidence
  the reranked answer reports stays calibrated (ranking unchanged).

Choice (:func:`choose_reranking`, validation only): the stages run greedily in order. ``prior`` and ``smooth``
are kept with the grid point of lowest validation median when it beats the current one by more than
``MIN_GAIN``; ``feature`` is kept with the grid point of lowest validation p90 when it beats the current p90 by
more than ``MIN_GAIN`` **and** does not raise the median (the gate the tail tool must pass). Each stage's best
grid point alone is recorded too (kept or not), for the ablation. Probability mass
outside the reranked cells never moves, so reranking can change which of the top cells wins but never invents
a cell the model gave no probability.
"""
from __future__ import annotations

import dataclasses as dc
from typing import Callable, Sequence

import numpy as np

from ..geo import haversine_km
from ..registry import Registry
from .refine import Gallery, best_in_cells, top_cells

RERANKERS = Registry("reranker")
DEFAULT_ORDER = ("prior", "smooth", "feature")
MIN_GAIN = 0.005  # a stage must improve its validation objective by more than 0.5 % to be kept


@dc.dataclass
class RerankContext:
    """What the stages may read besides the probabilities."""
    class_lat: np.ndarray
    class_lon: np.ndarray
    counts: np.ndarray | None = None     # training images per class (prior)
    gallery: Gallery | None = None       # training embeddings (feature)
    feats: np.ndarray | None = None      # the queries' embeddings (feature), (n, F)


class Reranker:
    """A registered stage: ``grid`` of parameter dicts, ``apply``; ``prepare`` caches per-query work shared by
    every grid point (e.g. gallery similarities)."""
    name: str
    objective = "median_km"     # "median_km": kept when it lowers the median; "p90_km": lowers p90, median not worse
    needs: tuple[str, ...] = ()
    grid: tuple[dict, ...] = ()

    @classmethod
    def available(cls, ctx: RerankContext) -> bool:
        return all(getattr(ctx, n) is not None for n in cls.needs)

    @classmethod
    def prepare(cls, probs: np.ndarray, ctx: RerankContext) -> object:
        return None

    @classmethod
    def apply(cls, probs: np.ndarray, ctx: RerankContext, state: object = None, **params) -> np.ndarray:
        raise NotImplementedError


def _put_top(probs: np.ndarray, top: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``probs`` with the ``top`` cells' mass redistributed in proportion to ``scores`` (>= 0, per row)."""
    out = probs.copy()
    mass = np.take_along_axis(probs, top, 1)
    total = mass.sum(1, keepdims=True)
    s = np.maximum(scores, 0.0)
    ssum = s.sum(1, keepdims=True)
    new = np.where(ssum > 0, s / np.where(ssum > 0, ssum, 1.0) * total, mass)
    np.put_along_axis(out, top, new, 1)
    return out


@RERANKERS.register("prior")
class PriorRerank(Reranker):
    needs = ("counts",)
    grid = tuple({"alpha": a} for a in (-1.0, -0.5, -0.25, 0.25, 0.5, 1.0))

    @classmethod
    def apply(cls, probs, ctx, state=None, alpha: float = 0.0):
        w = (np.asarray(ctx.counts, np.float64) + 1.0) ** float(alpha)
        p = probs * w[None, :]
        s = p.sum(1, keepdims=True)
        return np.where(s > 0, p / np.where(s > 0, s, 1.0), probs)


@RERANKERS.register("smooth")
class SmoothRerank(Reranker):
    grid = tuple({"k": k, "tau_km": t} for k in (5, 10, 20) for t in (100.0, 250.0, 500.0, 1000.0))

    @classmethod
    def apply(cls, probs, ctx, state=None, k: int = 10, tau_km: float = 250.0):
        top = top_cells(probs, k)
        la, lo = ctx.class_lat[top], ctx.class_lon[top]                                  # (n, k)
        d = haversine_km(la[:, :, None], lo[:, :, None], la[:, None, :], lo[:, None, :])  # (n, k, k)
        mass = np.take_along_axis(probs, top, 1)
        return _put_top(probs, top, np.einsum("nij,nj->ni", np.exp(-d / float(tau_km)), mass))


@RERANKERS.register("feature")
class FeatureRerank(Reranker):
    objective = "p90_km"
    needs = ("gallery", "feats")
    K_MAX = 10
    grid = tuple({"k": k, "beta": b, "gate": g} for k in (3, 5, 10) for b in (2.0, 5.0, 10.0, 20.0) for g in (0.3, 0.5, 1.0))

    @classmethod
    def prepare(cls, probs, ctx):
        """(the top ``K_MAX`` cells per query, most probable first; the best cosine similarity in each)."""
        return cell_similarity(ctx.gallery, ctx.feats, top_cells(probs, cls.K_MAX))

    @classmethod
    def apply(cls, probs, ctx, state=None, k: int = 5, beta: float = 10.0, gate: float = 0.5):
        top, sim = state if state is not None else cls.prepare(probs, ctx)
        k = min(k, top.shape[1])
        top, sim = top[:, :k], sim[:, :k]
        # a cell with no gallery item (cannot happen for a model's own training gallery) gets its row's worst similarity
        worst = np.where(np.isfinite(sim), sim, np.inf).min(1, keepdims=True)
        sim = np.where(np.isfinite(sim), sim, np.where(np.isfinite(worst), worst, 0.0))
        mass = np.take_along_axis(probs, top, 1)
        logits = np.log(np.clip(mass, 1e-300, None)) + float(beta) * sim
        scores = np.exp(logits - logits.max(1, keepdims=True))
        out = _put_top(probs, top, scores)
        gated = probs.max(1) < float(gate)
        return np.where(gated[:, None], out, probs)


@RERANKERS.register("temperature")
class TemperatureRerank(Reranker):
    """Not chosen from a grid: appended to a kept chain with ``t`` fit on validation (the run's calibration
    objective), because reranking moves probability mass and with it the confidence the answer reports.
    ``p' = softmax(log p / t)``: the ranking never changes."""
    grid = ()

    @classmethod
    def apply(cls, probs, ctx, state=None, t: float = 1.0):
        alive = (probs > 0).any(1, keepdims=True)  # a row with no mass at all (a failed input) is left as it is
        z = np.where(probs > 0, np.log(np.clip(probs, 1e-300, None)) / float(t), -np.inf)  # no mass stays none
        z = np.where(alive, z, 0.0)
        e = np.exp(z - z.max(1, keepdims=True))
        return np.where(alive, e / e.sum(1, keepdims=True), probs)


def cell_similarity(gallery: Gallery, feats: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``top``, the highest cosine similarity of each query to the gallery items of each of its ``top`` cells;
    -inf where a cell has none), searched cell by cell (:func:`geolocate.tasks.refine.best_in_cells`)."""
    cos, _ = best_in_cells(gallery, feats, top, 1)
    return top, cos[..., 0].astype(np.float64)


@dc.dataclass(frozen=True)
class Stage:
    name: str
    params: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "params": dict(self.params)}


def apply_reranking(stages: Sequence[Stage | dict], probs: np.ndarray, ctx: RerankContext,
                    on_skip: Callable[[str], None] | None = None) -> np.ndarray:
    """``probs`` through each stage in order; a stage whose inputs are missing (e.g. no gallery) is skipped and
    reported to ``on_skip``."""
    out = np.asarray(probs, np.float64)
    for st in stages:
        st = st if isinstance(st, Stage) else Stage(st["name"], st["params"])
        R = RERANKERS.get_class(st.name)
        if not R.available(ctx):
            if on_skip is not None:
                on_skip(f"reranking stage {st.name!r} skipped: it needs {', '.join(R.needs)}")
            continue
        out = R.apply(out, ctx, None, **st.params)
    return out


def answer_points(before: np.ndarray, after: np.ndarray, ctx: RerankContext,
                  head_points: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The answer point after reranking: the head's own point where the top cell did not change (it regressed
    that cell's point), else the new top cell's anchor."""
    top = after.argmax(1)
    la, lo = ctx.class_lat[top].astype(np.float64), ctx.class_lon[top].astype(np.float64)
    if head_points is not None:
        same = top == before.argmax(1)
        la = np.where(same, head_points[0], la)
        lo = np.where(same, head_points[1], lo)
    return la, lo


@dc.dataclass
class Reranking:
    """The chain chosen on validation and what each stage measured there."""
    stages: list[Stage]
    val: dict            # name -> {"params", "median_km", "p90_km", "kept"} for the chain's steps
    alone: dict          # name -> the stage's best grid point applied alone (for the ablation; kept or not)

    def to_dict(self) -> dict:
        return {"stages": [s.to_dict() for s in self.stages], "validation": self.val,
                "alone": {k: v.to_dict() for k, v in self.alone.items()}}


def _errors(before, after, ctx, true_lat, true_lon, head_points) -> tuple[float, float]:
    d = haversine_km(true_lat, true_lon, *answer_points(before, after, ctx, head_points))
    return float(np.median(d)), float(np.percentile(d, 90))


def _best_stage(name: str, base_probs, cur_probs, ctx, true_lat, true_lon, head_points, cur: tuple[float, float]):
    """(Stage, its probabilities, (median, p90), admissible) of the best grid point of ``name``: the best
    admissible one (it beats ``cur`` as the stage's objective asks), else the best by the objective alone."""
    R = RERANKERS.get_class(name)
    state = R.prepare(cur_probs, ctx)
    best = None
    for params in R.grid:
        p = R.apply(cur_probs, ctx, state, **params)
        med, p90 = _errors(base_probs, p, ctx, true_lat, true_lon, head_points)
        if R.objective == "median_km":
            ok, key = med < cur[0] * (1 - MIN_GAIN), med
        else:  # the tail tool: p90 must drop, the median must not rise
            ok, key = (p90 < cur[1] * (1 - MIN_GAIN) and med <= cur[0]), p90
        if best is None or (ok, -key) > (best[0], -best[1]):
            best = (ok, key, Stage(name, params), p, (med, p90))
    return best[2], best[3], best[4], best[0]


def choose_reranking(probs: np.ndarray, ctx: RerankContext, true_lat: np.ndarray, true_lon: np.ndarray,
                     head_points: tuple[np.ndarray, np.ndarray] | None = None,
                     order: Sequence[str] = DEFAULT_ORDER) -> Reranking:
    """The chain of stages (in ``order``) that improves the validation errors, each with its best grid point;
    ``probs``, ``ctx.feats`` and the truths are the **validation** split's. Stages whose inputs are missing
    are left out."""
    for name in order:
        if not RERANKERS.get_class(name).grid:  # an unknown name lists the known ones
            raise ValueError(f"reranking stage {name!r} is not chosen from a grid (it is fit after the chain)")
    probs = np.asarray(probs, np.float64)
    base = _errors(probs, probs, ctx, true_lat, true_lon, head_points)
    cur_p, cur = probs, base
    stages, val, alone = [], {"none": {"median_km": round(base[0], 3), "p90_km": round(base[1], 3)}}, {}
    for name in order:
        if not RERANKERS[name].available(ctx):
            continue
        solo = _best_stage(name, probs, probs, ctx, true_lat, true_lon, head_points, base)
        alone[name] = solo[0]
        stage, p, errs, ok = solo if cur_p is probs else _best_stage(name, probs, cur_p, ctx, true_lat, true_lon, head_points, cur)
        if not ok:
            val[name] = {"kept": False, "best_params": dict(stage.params), "median_km": round(errs[0], 3), "p90_km": round(errs[1], 3)}
            continue
        cur_p, cur = p, errs
        stages.append(stage)
        val[name] = {"kept": True, "params": dict(stage.params), "median_km": round(cur[0], 3), "p90_km": round(cur[1], 3)}
    return Reranking(stages, val, alone)
