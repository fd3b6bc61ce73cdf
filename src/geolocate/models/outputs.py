"""What every head returns (``GeoOutput``) and what its decode gives (``Decoded``).

``GeoOutput`` holds named tensors: ``logits[level]`` (``"cell"`` is the fine level; coarser levels are named
after the label space's levels, e.g. ``"r0"``), the optional ``offset`` (B, C, 2) in km east/north of each class
anchor, the optional ``coords`` (B, 2) lat/lon in degrees, the pooled ``features`` it was computed from, and the
optional ``embedding`` (B, d) of heads that align images with something else (``location_encoder``).
"""
from __future__ import annotations

import dataclasses as dc
import math

import torch

from ..geo import EARTH_RADIUS_KM, KM_PER_DEG


@dc.dataclass
class GeoOutput:
    logits: dict[str, torch.Tensor]
    features: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    coords: torch.Tensor | None = None
    embedding: torch.Tensor | None = None  # (B, d) an image embedding a head's loss aligns with something (location_encoder)

    def map(self, fn) -> "GeoOutput":
        """The same outputs with ``fn`` applied to every tensor (e.g. ``lambda t: t.float().cpu()``)."""
        f = lambda t: None if t is None else fn(t)  # noqa: E731
        return GeoOutput({k: fn(v) for k, v in self.logits.items()}, f(self.features), f(self.offset), f(self.coords),
                         f(self.embedding))

    @staticmethod
    def cat(outs: list["GeoOutput"]) -> "GeoOutput":
        """Batches of outputs joined along the batch axis."""
        first = outs[0]
        c = lambda get: None if get(first) is None else torch.cat([get(o) for o in outs])  # noqa: E731
        return GeoOutput({k: torch.cat([o.logits[k] for o in outs]) for k in first.logits}, c(lambda o: o.features),
                         c(lambda o: o.offset), c(lambda o: o.coords), c(lambda o: o.embedding))

    def take(self, rows) -> "GeoOutput":
        """The same outputs for ``rows`` (a slice or an index tensor) of the batch."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return GeoOutput({k: v[rows] for k, v in self.logits.items()}, pick(self.features), pick(self.offset), pick(self.coords),
                         pick(self.embedding))



@dc.dataclass
class Decoded:
    """One decode, shared by validation, evaluation, the predictor and the exports.

    ``probabilities`` (B, C): calibrated fine-class probabilities (the ranking of cells); ``point`` (B, 2) lat/lon
    of the answer when the head predicts one (offset or coordinates), else None (the top cell's anchor)."""
    log_probs: torch.Tensor
    point: torch.Tensor | None = None

    @property
    def probabilities(self) -> torch.Tensor:
        return self.log_probs.exp()


# ---- a local tangent plane around an anchor: (east, north) km <-> lat/lon ----------------------------------
def offset_to_latlon(lat0: torch.Tensor, lon0: torch.Tensor, east_km: torch.Tensor, north_km: torch.Tensor):
    """The point ``east_km``/``north_km`` from (lat0, lon0) on the anchor's equirectangular tangent plane."""
    lat = (lat0 + north_km / KM_PER_DEG).clamp(-90.0, 90.0)
    coslat = torch.cos(lat0 * (math.pi / 180.0)).clamp(min=1e-3)
    lon = lon0 + east_km / (KM_PER_DEG * coslat)
    return lat, torch.remainder(lon + 180.0, 360.0) - 180.0


def latlon_to_offset(lat0: torch.Tensor, lon0: torch.Tensor, lat: torch.Tensor, lon: torch.Tensor):
    """The inverse of :func:`offset_to_latlon`: (east, north) km of (lat, lon) from the anchor."""
    dlon = torch.remainder(lon - lon0 + 180.0, 360.0) - 180.0
    coslat = torch.cos(torch.deg2rad(lat0)).clamp(min=1e-3)
    return dlon * KM_PER_DEG * coslat, (lat - lat0) * KM_PER_DEG


def unit_to_latlon(v: torch.Tensor) -> torch.Tensor:
    """(B, 3) unit vectors -> (B, 2) lat/lon degrees."""
    x, y, z = v.unbind(-1)
    deg = 180.0 / math.pi  # (rad2deg does not export to ONNX opset 17)
    return torch.stack([torch.atan2(z, torch.sqrt(x * x + y * y)) * deg, torch.atan2(y, x) * deg], dim=-1)


def latlon_to_unit(lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
    la, lo = torch.deg2rad(lat), torch.deg2rad(lon)
    return torch.stack([torch.cos(la) * torch.cos(lo), torch.cos(la) * torch.sin(lo), torch.sin(la)], dim=-1)


def haversine_torch(lat1: torch.Tensor, lon1: torch.Tensor, lat2: torch.Tensor, lon2: torch.Tensor) -> torch.Tensor:
    """Distance in km (degrees in, broadcasting like numpy); differentiable (float64 inside)."""
    lat1, lon1, lat2, lon2 = (torch.deg2rad(t.to(torch.float64)) for t in (lat1, lon1, lat2, lon2))
    a = torch.sin((lat2 - lat1) / 2) ** 2 + torch.cos(lat1) * torch.cos(lat2) * torch.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(a.clamp(1e-18, 1)))


HALF_CIRCUMFERENCE_KM = math.pi * EARTH_RADIUS_KM
