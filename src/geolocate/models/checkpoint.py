"""The model file: everything needed to predict, loadable with ``weights_only=True``.

Format ``geolocate-model/1`` (a plain dict of tensors, numbers, strings, lists):
``backbone`` spec, ``backbone_state`` (None when the backbone is the frozen
pretrained one: its weights come from its package), ``head_state``,
``num_features``, ``dropout``, ``labels`` (labels.json content: classes with
cell, centroid, place name), ``preprocess``, ``meta`` (run id, metrics, ...).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io import atomic_write, one_line, sidecar_path, verify_sidecar  # noqa: F401 - sidecar_path re-exported
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
    """(model in eval mode, the checkpoint dict without weights).

    Every way a file can be wrong (not a model, a model whose parts do not fit together, bytes that differ from
    the sha256 its sidecar ``<model>.json`` records) is a ValueError with one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (train one with `geolocate train`)")
    verify_sidecar(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"{path}: not a loadable geolocate model ({one_line(e)})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    missing = [k for k in _REQUIRED if k not in ck]
    if missing:
        raise ValueError(f"{path}: a damaged {FORMAT} file: no {', '.join(missing)}")
    labels = ck["labels"]
    classes = labels.get("classes") if isinstance(labels, dict) else None
    n_cls = labels.get("num_classes") if isinstance(labels, dict) else None
    if not isinstance(classes, list) or not isinstance(n_cls, int) or len(classes) != n_cls or n_cls < 1:
        raise ValueError(f"{path}: its labels list {len(classes) if isinstance(classes, list) else 'no'} classes "
                         f"but declare {n_cls!r}: a damaged model file")
    if not all(isinstance(c, dict) and _CLASS_KEYS <= c.keys() for c in classes):
        raise ValueError(f"{path}: a class without {', '.join(sorted(_CLASS_KEYS))}: a damaged model file")
    pp = ck["preprocess"]
    if not isinstance(pp, dict) or not {"size", "mean", "std"} <= pp.keys():
        raise ValueError(f"{path}: no usable preprocess (size, mean, std): a damaged model file")
    try:
        backbone = create_backbone(str(ck["backbone"]), pretrained=ck["backbone_state"] is None)
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}") from None
    except Exception as e:  # noqa: BLE001 - an optional backbone library that is missing or fails
        raise ValueError(f"{path}: cannot build its backbone {ck['backbone']!r} ({one_line(e)})") from None
    try:
        if ck["backbone_state"] is not None:
            backbone.load_state_dict(ck["backbone_state"])
        head = CellHead(int(ck["num_features"]), n_cls, float(ck["dropout"]))
        head.load_state_dict(ck["head_state"])
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError) as e:
        raise ValueError(f"{path}: its weights do not fit its backbone {ck['backbone']!r} and {n_cls} classes "
                         f"({one_line(e)})") from None
    model = GeoModel(backbone, head).eval()
    info = {k: v for k, v in ck.items() if k not in ("backbone_state", "head_state")}
    return model, info


_CLASS_KEYS = frozenset({"cell", "lat", "lon", "place"})
_REQUIRED = ("backbone", "backbone_state", "head_state", "num_features", "dropout", "labels", "preprocess")


