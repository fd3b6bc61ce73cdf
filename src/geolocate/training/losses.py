"""Losses over cell logits, by name.

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

from ..geo import EARTH_RADIUS_KM


def haversine_torch(lat1: torch.Tensor, lon1: torch.Tensor, lat2: torch.Tensor, lon2: torch.Tensor) -> torch.Tensor:
    """Distance in km (degrees in, broadcasting like numpy)."""
    lat1, lon1, lat2, lon2 = (torch.deg2rad(t.to(torch.float64)) for t in (lat1, lon1, lat2, lon2))
    a = torch.sin((lat2 - lat1) / 2) ** 2 + torch.cos(lat1) * torch.cos(lat2) * torch.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(a.clamp(0, 1)))


def geo_soft_targets(lat: torch.Tensor, lon: torch.Tensor, class_lat: torch.Tensor, class_lon: torch.Tensor, tau_km: float) -> torch.Tensor:
    """(B, C) target distribution from each sample's true position."""
    d = haversine_torch(lat[:, None], lon[:, None], class_lat[None, :], class_lon[None, :])
    return torch.softmax(-d / tau_km, dim=1).to(torch.float32)


class LossContext:
    """What a loss may need besides logits and labels."""

    def __init__(self, class_lat: torch.Tensor, class_lon: torch.Tensor, class_weights: torch.Tensor | None, tau_km: float, mix_ce: float):
        self.class_lat, self.class_lon = class_lat, class_lon
        self.class_weights, self.tau_km, self.mix_ce = class_weights, tau_km, mix_ce


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
