"""Registered heads over pooled features, and the full image -> ``GeoOutput`` model.

A head is built by name (``create_head("hierarchical", in_features, labels, **kwargs)``, timm-style registry)
and owns three things: ``forward(features) -> GeoOutput``, ``loss(output, labels, lat, lon, ctx)`` and
``decode(output) -> Decoded`` (calibrated fine-class log-probabilities and, for heads that regress a location,
the answer point). The one decode serves validation in the training loop, evaluation, the predictor, the server
and the ONNX/TorchScript exports (:meth:`Head.export_outputs`).

``ctx`` is the training loss context (``geolocate.training.losses.LossContext``): ``ctx.cell_loss(log_probs,
labels, lat, lon)`` is the configured classification loss (ce or haversine-smoothed geo), ``ctx.level_weight``,
``ctx.reg_weight`` and ``ctx.contrastive_weight`` weight the extra terms.

Every head holds a ``temperature`` buffer (1 until calibration sets it): probabilities are
``softmax(log_probs / T)``, so calibration never changes the ranking.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..labels import FINE, LabelSpace
from ..registry import Registry
from .backbones import Backbone
from .outputs import Decoded, GeoOutput, haversine_torch, latlon_to_unit, offset_to_latlon, unit_to_latlon

HEADS = Registry("head")
register_head = HEADS.register
list_heads = HEADS.names


def create_head(name: str, in_features: int, labels: LabelSpace, **kwargs) -> "Head":
    return HEADS.get_class(name)(in_features, labels, **kwargs)


class Head(nn.Module):
    """Base: dropout + a linear layer over the fine classes; subclasses add levels, offsets or coordinates."""

    name = "linear"
    has_point = False

    def __init__(self, in_features: int, labels: LabelSpace, dropout: float = 0.2):
        super().__init__()
        self.kwargs = {"dropout": float(dropout)}
        self.num_classes = labels.num_classes
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, labels.num_classes)
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("anchor_lat", torch.as_tensor(labels.lat, dtype=torch.float32))
        self.register_buffer("anchor_lon", torch.as_tensor(labels.lon, dtype=torch.float32))

    @classmethod
    def config_kwargs(cls, cfg) -> dict:
        """This head's constructor kwargs from a run config (``cfg.model``)."""
        return {"dropout": cfg.model.dropout}

    def forward(self, feats: torch.Tensor) -> GeoOutput:
        return GeoOutput(logits={FINE: self.fc(self.dropout(feats))}, features=feats)

    def log_probs(self, out: GeoOutput) -> torch.Tensor:
        """Fine-class log-probabilities before calibration."""
        return F.log_softmax(out.logits[FINE], dim=1)

    def point(self, out: GeoOutput, log_probs: torch.Tensor) -> torch.Tensor | None:
        return None

    def prepare(self, lat, lon) -> None:
        """Called once with the training split's true locations before training (a gallery head builds its gallery)."""

    def decode(self, out: GeoOutput) -> Decoded:
        lp = self.log_probs(out)
        return Decoded(F.log_softmax(lp / self.temperature, dim=1), self.point(out, lp))

    def loss(self, out: GeoOutput, labels: torch.Tensor, lat: torch.Tensor, lon: torch.Tensor, ctx) -> torch.Tensor:
        return ctx.cell_loss(self.log_probs(out), labels, lat, lon)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The exports' outputs (after ``logits``/``probabilities``): ``point`` for heads that predict one."""
        return ("point",) if self.has_point else ()

    def export_outputs(self, out: GeoOutput) -> tuple[torch.Tensor, ...]:
        """(calibrated fine log-probabilities, probabilities[, point]): what an export returns besides features."""
        d = self.decode(out)
        return (d.log_probs, d.log_probs.exp()) + ((d.point,) if self.has_point else ())

    def anchor_point(self, log_probs: torch.Tensor) -> torch.Tensor:
        top = log_probs.argmax(1)
        return torch.stack([self.anchor_lat[top], self.anchor_lon[top]], dim=1)

    @torch.no_grad()
    def set_temperature(self, temperature: float) -> None:
        self.temperature.fill_(float(temperature))

    def probabilities(self, feats: torch.Tensor) -> torch.Tensor:
        """Features -> calibrated fine-class probabilities (the head in its current mode)."""
        return self.decode(self(feats)).probabilities


@register_head("linear")
class LinearHead(Head):
    """The flat cell classifier (what every model before the head registry was)."""


def _group_log_softmax(z: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """log-softmax of ``z`` (B, C) within the groups ``group`` (C,) assigns: z_c - logsumexp_{g(c') = g(c)} z_c'.

    Shifted by each row's max (stable unless a whole group lies ~80 nats below the row's best, where the clamp
    keeps it finite); built from scatter_add, which exports to ONNX (ScatterElements, reduction add)."""
    m = z.max(dim=1, keepdim=True).values.detach()
    e = torch.exp(z - m)
    s = torch.zeros(z.shape[0], n_groups, dtype=z.dtype, device=z.device).scatter_add(1, group.expand(z.shape[0], -1), e)
    return z - m - torch.log(s.clamp_min(1e-30)).index_select(1, group)


@register_head("hierarchical")
class HierarchicalHead(Head):
    """One linear layer per level; p(fine) = p(top level) · Π p(level | its parent level) · p(fine | its parent).

    ``mode="joint"``: that product. ``mode="mask"``: the same, then fine classes outside the ``mask_top`` most
    probable cells of the nearest coarser level get probability 0 (renormalised). The loss is the configured
    cell loss on the joint fine distribution plus ``ctx.level_weight`` × cross-entropy at every coarser level."""

    def __init__(self, in_features: int, labels: LabelSpace, dropout: float = 0.2, levels: list[str] | None = None,
                 mode: str = "joint", mask_top: int = 3):
        super().__init__(in_features, labels, dropout)
        if not labels.levels:
            raise ValueError("a hierarchical head needs a label space with coarser levels (model.levels)")
        names = list(levels) if levels else [lv.name for lv in labels.levels]
        chosen = [labels.level(n) for n in names]  # unknown names: KeyError listing the valid ones
        chosen.sort(key=lambda lv: lv.resolution)
        if mode not in ("joint", "mask"):
            raise ValueError(f"hierarchical mode must be 'joint' or 'mask', got {mode!r}")
        self.kwargs.update(levels=[lv.name for lv in chosen], mode=mode, mask_top=int(mask_top))
        self.level_names = [lv.name for lv in chosen]
        self.mode, self.mask_top = mode, int(mask_top)
        self.level_fc = nn.ModuleList(nn.Linear(in_features, len(lv)) for lv in chosen)
        self.level_sizes = [len(lv) for lv in chosen]
        for i, lv in enumerate(chosen):
            self.register_buffer(f"parent_{i}", torch.as_tensor(lv.parent, dtype=torch.long))  # fine class -> cell of level i
            if i:  # cell of level i -> its cell on level i-1 (read off any fine class below it)
                up = torch.zeros(len(lv), dtype=torch.long)
                up[torch.as_tensor(lv.parent)] = torch.as_tensor(chosen[i - 1].parent)
                self.register_buffer(f"up_{i}", up)

    @classmethod
    def config_kwargs(cls, cfg) -> dict:
        return {"dropout": cfg.model.dropout, "mode": cfg.model.hierarchy_mode, "mask_top": cfg.model.mask_top}

    def parents(self, i: int) -> torch.Tensor:
        return getattr(self, f"parent_{i}")

    def forward(self, feats: torch.Tensor) -> GeoOutput:
        x = self.dropout(feats)
        logits = {n: fc(x) for n, fc in zip(self.level_names, self.level_fc)}
        logits[FINE] = self.fc(x)
        return GeoOutput(logits=logits, features=feats)

    def level_log_probs(self, out: GeoOutput) -> list[torch.Tensor]:
        """Joint log-probabilities of every coarser level, coarse to fine."""
        lps = []
        for i, n in enumerate(self.level_names):
            z = out.logits[n]
            if i == 0:
                lps.append(F.log_softmax(z, dim=1))
            else:
                up = getattr(self, f"up_{i}")
                lps.append(lps[-1].index_select(1, up) + _group_log_softmax(z, up, self.level_sizes[i - 1]))
        return lps

    def log_probs(self, out: GeoOutput) -> torch.Tensor:
        return self._fine_log_probs(out, self.level_log_probs(out))

    def _fine_log_probs(self, out: GeoOutput, levels: list[torch.Tensor]) -> torch.Tensor:
        """The fine classes' log-probabilities from the levels' (``level_log_probs``, computed once by the caller)."""
        last = len(self.level_names) - 1
        parent = self.parents(last)
        lp_parent = levels[-1]
        lp = lp_parent.index_select(1, parent) + _group_log_softmax(out.logits[FINE], parent, self.level_sizes[last])
        if self.mode == "mask" and not self.training:
            k = min(self.mask_top, lp_parent.shape[1])
            kth = lp_parent.topk(k, dim=1).values[:, -1:]
            keep = (lp_parent >= kth).index_select(1, parent)
            lp = F.log_softmax(lp.masked_fill(~keep, -1e4), dim=1)
        return lp

    def loss(self, out, labels, lat, lon, ctx) -> torch.Tensor:
        levels = self.level_log_probs(out)
        total = ctx.cell_loss(self._fine_log_probs(out, levels), labels, lat, lon)
        if ctx.level_weight > 0:
            for i, lp in enumerate(levels):
                total = total + ctx.level_weight * F.nll_loss(lp, self.parents(i)[labels])
        return total


@register_head("offset")
class OffsetHead(Head):
    """Cell classifier + an in-cell offset per class (OSV-5M hybrid): km east/north of the class anchor on its
    tangent plane, bounded per class to ± twice the mean hexagon edge at that class's resolution (tanh), or to
    ``bound_km`` when given. Trained on the true class's offset with a haversine loss (``ctx.reg_weight`` × km /
    the class's bound). The answer is the top class's anchor moved by its offset times the top-1 probability
    (``shrink=True``): an offset is only worth following as far as the cell is likely right, since a wrong
    cell's regressor never saw this kind of image; ``shrink=False`` follows it fully."""

    has_point = True

    def __init__(self, in_features: int, labels: LabelSpace, dropout: float = 0.2, bound_km: float | None = None,
                 shrink: bool = True):
        super().__init__(in_features, labels, dropout)
        self.kwargs.update(bound_km=None if bound_km is None else float(bound_km), shrink=bool(shrink))
        self.shrink = bool(shrink)
        bounds = class_bounds_km(labels) if bound_km is None else torch.full((labels.num_classes,), float(bound_km))
        self.register_buffer("bound", bounds.to(torch.float32))
        self.offset_fc = nn.Linear(in_features, labels.num_classes * 2)
        nn.init.zeros_(self.offset_fc.weight)
        nn.init.zeros_(self.offset_fc.bias)

    def forward(self, feats: torch.Tensor) -> GeoOutput:
        x = self.dropout(feats)
        off = torch.tanh(self.offset_fc(x)).view(x.shape[0], -1, 2) * self.bound[None, :, None]
        return GeoOutput(logits={FINE: self.fc(x)}, features=feats, offset=off)

    def offset_point(self, out: GeoOutput, cls: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        off = out.offset.gather(1, cls.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1)
        if scale is not None:
            off = off * scale[:, None]
        lat, lon = offset_to_latlon(self.anchor_lat[cls], self.anchor_lon[cls], off[:, 0], off[:, 1])
        return torch.stack([lat, lon], dim=1)

    def point(self, out: GeoOutput, log_probs: torch.Tensor) -> torch.Tensor:
        top = log_probs.max(1)
        return self.offset_point(out, top.indices, top.values.exp() if self.shrink else None)

    def loss(self, out, labels, lat, lon, ctx) -> torch.Tensor:
        total = ctx.cell_loss(self.log_probs(out), labels, lat, lon)
        if ctx.reg_weight > 0:
            p = self.offset_point(out, labels)
            total = total + ctx.reg_weight * (haversine_torch(p[:, 0], p[:, 1], lat, lon) / self.bound[labels]).mean().float()
        return total


@register_head("gps")
class GpsHead(Head):
    """Cell classifier + direct coordinate regression: a unit 3-vector (any output is a valid lat/lon), trained with
    ``ctx.reg_weight`` × haversine km / ``scale_km``; the answer is the regressed point."""

    has_point = True

    def __init__(self, in_features: int, labels: LabelSpace, dropout: float = 0.2, scale_km: float = 2000.0):
        super().__init__(in_features, labels, dropout)
        self.kwargs["scale_km"] = float(scale_km)
        self.scale_km = float(scale_km)
        self.coord_fc = nn.Linear(in_features, 3)
        with torch.no_grad():  # start at the training-class mean direction, not at (0, 0)
            u = latlon_to_unit(torch.as_tensor(labels.lat), torch.as_tensor(labels.lon)).mean(0)
            self.coord_fc.weight.zero_()
            self.coord_fc.bias.copy_(u / u.norm().clamp_min(1e-6))

    def forward(self, feats: torch.Tensor) -> GeoOutput:
        x = self.dropout(feats)
        v = self.coord_fc(x)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return GeoOutput(logits={FINE: self.fc(x)}, features=feats, coords=unit_to_latlon(v))

    def point(self, out: GeoOutput, log_probs: torch.Tensor) -> torch.Tensor:
        return out.coords

    def loss(self, out, labels, lat, lon, ctx) -> torch.Tensor:
        total = ctx.cell_loss(self.log_probs(out), labels, lat, lon)
        if ctx.reg_weight > 0:
            d = haversine_torch(out.coords[:, 0], out.coords[:, 1], lat, lon)
            total = total + ctx.reg_weight * (d / self.scale_km).mean().float()
        return total


def class_bounds_km(labels: LabelSpace) -> torch.Tensor:
    """(C,) twice the mean hexagon edge at each class's own resolution: any point of its cell is within reach."""
    import h3

    res = [int(c.get("resolution", h3.get_resolution(c["cell"]))) for c in labels.classes]
    edge = {r: 2.0 * float(h3.average_hexagon_edge_length(r, unit="km")) for r in set(res)}
    return torch.tensor([edge[r] for r in res], dtype=torch.float32)


# back-compat name: the flat cell classifier
CellHead = LinearHead


class GeoModel(nn.Module):
    """Backbone [+ view fusion] + head: preprocessed images (B, 3, H, W), or multi-view samples (B, V, 3, H, W) with a
    view mask (B, V) for a model with a ``fusion`` (``geolocate.models.fusion``) -> ``GeoOutput``. A fused model
    given single images reads each as a sample whose first view is all it has."""

    def __init__(self, backbone: Backbone, head: Head, fusion: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.fusion = fusion

    @property
    def preprocess(self):
        return self.backbone.preprocess

    def forward(self, x: torch.Tensor, view_mask: torch.Tensor | None = None) -> GeoOutput:
        if x.dim() == 5:
            if self.fusion is None:
                raise ValueError("multi-view images (batch, views, 3, H, W) need a model trained with a fusion (model.fusion)")
            b, v = x.shape[:2]
            return self.head(self.fusion(self.backbone(x.flatten(0, 1)).reshape(b, v, -1), view_mask))
        return self.head(self.head_input(self.backbone(x)))

    def head_input(self, feats: torch.Tensor) -> torch.Tensor:
        """Backbone features of single images (B, F) -> what the head reads: the features themselves, or their fusion
        as one-view samples (the same numbers for ``average``/``weighted``/``attention``; slot 0 of ``concat``)."""
        return feats if self.fusion is None else self.fusion(feats[:, None])

    def decode(self, x: torch.Tensor, view_mask: torch.Tensor | None = None) -> Decoded:
        """Images -> the head's decode (calibrated probabilities, answer point)."""
        return self.head.decode(self(x, view_mask))


from . import location  # noqa: E402,F401 - registers "location_encoder" (it builds on Head)
