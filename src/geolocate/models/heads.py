"""Heads over pooled features, and the full image -> cell-logits model."""
from __future__ import annotations

import torch
from torch import nn

from .backbones import Backbone


class CellHead(nn.Module):
    """Dropout + linear layer over H3 cell classes."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(feats))

    @torch.no_grad()
    def fold_temperature(self, temperature: float) -> None:
        """Divide the logits by ``temperature`` from now on (temperature scaling baked into the weights)."""
        self.fc.weight.div_(temperature)
        self.fc.bias.div_(temperature)


class GeoModel(nn.Module):
    """Backbone + head: preprocessed images (B, 3, H, W) -> cell logits (B, C)."""

    def __init__(self, backbone: Backbone, head: CellHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def preprocess(self):
        return self.backbone.preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
