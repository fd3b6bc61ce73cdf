"""Classification losses over fine-cell log-probabilities (or logits), by name; the heads add their own terms.

- ``ce``: cross-entropy with optional class weights.
- ``adjacency``: H3-adjacency-aware soft targets: ``1 - adjacency_eps`` on the true class and ``adjacency_eps``
  shared by the classes of its ring-1 neighbour cells (``h3.grid_disk``; a merged coarser class counts for the
  neighbours it contains); a class without neighbour classes keeps all the mass.
- ``geo``: haversine-smoothed soft targets (PIGEON): the target mass on class
  c is proportional to ``exp(-d(true point, centroid_c) / tau_km)``; the loss is
  ``(1 - geo_mix_ce) * soft-CE + geo_mix_ce * CE``. Distances are computed per
  batch, so memory stays O(batch x classes).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..models.outputs import haversine_torch  # noqa: F401 - re-exported


def geo_soft_targets(lat: torch.Tensor, lon: torch.Tensor, class_lat: torch.Tensor, class_lon: torch.Tensor, tau_km: float) -> torch.Tensor:
    """(B, C) target distribution from each sample's true position."""
    d = haversine_torch(lat[:, None], lon[:, None], class_lat[None, :], class_lon[None, :])
    return torch.softmax(-d / tau_km, dim=1).to(torch.float32)


class LossContext:
    """What a head's loss may need besides its output and the targets: the classification loss ``name``
    (``cell_loss``), class anchors and weights, and the weights of the heads' extra terms."""

    def __init__(self, class_lat: torch.Tensor, class_lon: torch.Tensor, class_weights: torch.Tensor | None, tau_km: float,
                 mix_ce: float, name: str = "geo", level_weight: float = 0.5, reg_weight: float = 1.0,
                 contrastive_weight: float = 1.0, neighbours: torch.Tensor | None = None, adjacency_eps: float = 0.2):
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(sorted(LOSSES))}")
        self.class_lat, self.class_lon = class_lat, class_lon
        self.class_weights, self.tau_km, self.mix_ce = class_weights, tau_km, mix_ce
        self.name, self.level_weight, self.reg_weight = name, float(level_weight), float(reg_weight)
        self.contrastive_weight = float(contrastive_weight)
        self.neighbours, self.adjacency_eps = neighbours, float(adjacency_eps)  # (C, K) class indices, -1 = none
        if name == "adjacency" and neighbours is None:
            raise ValueError("the adjacency loss needs the classes' neighbours (class_neighbours(labels))")

    def to(self, device) -> "LossContext":
        """The same context with its tensors on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LossContext(mv(self.class_lat), mv(self.class_lon), mv(self.class_weights), self.tau_km, self.mix_ce, self.name,
                           self.level_weight, self.reg_weight, self.contrastive_weight, mv(self.neighbours), self.adjacency_eps)

    def cell_loss(self, log_probs: torch.Tensor, labels: torch.Tensor, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        return LOSSES[self.name](log_probs, labels, lat, lon, self)


def ce_loss(logits, labels, lat, lon, ctx: LossContext) -> torch.Tensor:
    return F.cross_entropy(logits, labels, weight=ctx.class_weights)


def geo_loss(logits, labels, lat, lon, ctx: LossContext) -> torch.Tensor:
    q = geo_soft_targets(lat, lon, ctx.class_lat, ctx.class_lon, ctx.tau_km)
    soft = -(q * F.log_softmax(logits, dim=1)).sum(1).mean()
    if ctx.mix_ce <= 0:
        return soft
    return (1 - ctx.mix_ce) * soft + ctx.mix_ce * F.cross_entropy(logits, labels, weight=ctx.class_weights)


def adjacency_loss(logits, labels, lat, lon, ctx: LossContext) -> torch.Tensor:
    lp = F.log_softmax(logits, dim=1)
    nb = ctx.neighbours[labels]                                   # (B, K)
    valid = nb >= 0
    k = valid.sum(1)
    eps = torch.where(k > 0, ctx.adjacency_eps, 0.0)
    near = (lp.gather(1, nb.clamp(min=0)) * valid).sum(1) / k.clamp(min=1)
    return -((1 - eps) * lp.gather(1, labels[:, None]).squeeze(1) + eps * near).mean()


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"ce": ce_loss, "geo": geo_loss, "adjacency": adjacency_loss}


def class_neighbours(labels) -> torch.Tensor:
    """(C, K) for every class the classes of its ring-1 H3 neighbours (padded with -1). A neighbour cell belongs
    to the class of that cell or of its nearest coarser ancestor that is a class (merged classes)."""
    import h3

    cells = [c["cell"] for c in labels.classes]
    where = {c: i for i, c in enumerate(cells)}
    out: list[list[int]] = []
    for i, c in enumerate(cells):
        found: set[int] = set()
        for n in h3.grid_disk(c, 1):
            for r in range(h3.get_resolution(n), -1, -1):
                j = where.get(h3.cell_to_parent(n, r) if r < h3.get_resolution(n) else n)
                if j is not None:
                    if j != i:
                        found.add(j)
                    break
        out.append(sorted(found))
    k = max((len(v) for v in out), default=0)
    return torch.tensor([v + [-1] * (k - len(v)) for v in out], dtype=torch.long).reshape(len(cells), k)


def class_weights_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over present classes; absent classes get 0."""
    w = torch.where(counts > 0, 1.0 / counts.clamp(min=1).to(torch.float32), torch.zeros_like(counts, dtype=torch.float32))
    present = counts > 0
    return w / w[present].mean() if present.any() else w
