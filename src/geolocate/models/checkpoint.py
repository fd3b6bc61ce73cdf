"""The model file: everything needed to predict, loadable with ``weights_only=True``.

Format ``geolocate-model/1`` (a plain dict of tensors, numbers, strings, lists):
``backbone`` spec, ``backbone_state`` (None when the backbone is the frozen
pretrained one: its weights come from its package), ``head_state``,
``num_features``, ``dropout``, ``labels`` (labels.json content: classes with
cell, centroid, place name), ``preprocess``, ``meta`` (run id, metrics, ...).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..io import atomic_write
from .backbones import create_backbone
from .heads import CellHead, GeoModel

FORMAT = "geolocate-model/1"


def save_model(path: str | Path, model: GeoModel, backbone_spec: str, labels: dict, dropout: float,
               backbone_trained: bool, meta: dict | None = None) -> Path:
    state = {
        "format": FORMAT,
        "backbone": backbone_spec,
        "backbone_state": {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()} if backbone_trained else None,
        "head_state": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
        "num_features": int(model.backbone.num_features),
        "dropout": float(dropout),
        "labels": labels,
        "preprocess": model.preprocess.to_dict(),
        "meta": meta or {},
    }
    return atomic_write(path, lambda p: torch.save(state, p), suffix=".pt")


def load_model(path: str | Path) -> tuple[GeoModel, dict]:
    """(model in eval mode, the checkpoint dict without weights)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (train one with `geolocate train`)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"{path}: not a loadable geolocate model ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    backbone = create_backbone(ck["backbone"], pretrained=ck["backbone_state"] is None)
    if ck["backbone_state"] is not None:
        backbone.load_state_dict(ck["backbone_state"])
    head = CellHead(ck["num_features"], ck["labels"]["num_classes"], ck["dropout"])
    head.load_state_dict(ck["head_state"])
    model = GeoModel(backbone, head).eval()
    info = {k: v for k, v in ck.items() if k not in ("backbone_state", "head_state")}
    return model, info
