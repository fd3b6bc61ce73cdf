"""Classification losses over fine-cell log-probabilities (or logits), by name; the heads add their own terms.

- ``ce``: cross-entropy with optional class weights.
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
                 contrastive_weight: float = 1.0):
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(sorted(LOSSES))}")
        self.class_lat, self.class_lon = class_lat, class_lon
        self.class_weights, self.tau_km, self.mix_ce = class_weights, tau_km, mix_ce
        self.name, self.level_weight, self.reg_weight = name, float(level_weight), float(reg_weight)
        self.contrastive_weight = float(contrastive_weight)

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


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"ce": ce_loss, "geo": geo_loss}


def class_weights_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over present classes; absent classes get 0."""
    w = torch.where(counts > 0, 1.0 / counts.clamp(min=1).to(torch.float32), torch.zeros_like(counts, dtype=torch.float32))
    present = counts > 0
    return w / w[present].mean() if present.any() else w
