"""The model file: everything needed to predict, loadable with ``weights_only=True``.

Format ``geolocate-model/2`` (a plain dict of tensors, numbers, strings, lists):
``backbone`` spec, ``backbone_state`` (None when the backbone is the frozen
pretrained one: its weights come from its package), ``head`` (registered name) and
``head_kwargs``, ``head_state``, ``num_features``, ``labels`` (the label space,
labels.json v2), ``preprocess``, ``meta`` (run id, metrics, ...), and for a multi-view model ``fusion``
(registered name, None for a single-view model), ``fusion_kwargs`` (its view slots among them) and
``fusion_state``. So any backbone x fusion x head x label space combination is rebuilt from the file alone, and
it reads its inputs with the ``preprocess`` it was trained with.

A ``geolocate-model/1`` file (linear head, labels v1, no temperature buffer) still loads.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io import atomic_write, one_line, sidecar_path, verify_sidecar  # noqa: F401 - sidecar_path re-exported
from .backbones import create_backbone
from ..labels import LabelSpace, LabelSpaceError
from ..preprocess import Preprocess
from .fusion import create_fusion
from .heads import GeoModel, create_head

FORMAT = "geolocate-model/2"
FORMATS = ("geolocate-model/1", FORMAT)


def save_model(path: str | Path, model: GeoModel, backbone_spec: str, labels: LabelSpace | dict, backbone_trained: bool,
               meta: dict | None = None) -> Path:
    state = {
        "format": FORMAT,
        "backbone": backbone_spec,
        "backbone_state": {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()} if backbone_trained else None,
        "head": model.head.name,
        "head_kwargs": dict(model.head.kwargs),
        "head_state": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
        "num_features": int(model.backbone.num_features),
        "dropout": float(model.head.kwargs.get("dropout", 0.0)),
        "labels": LabelSpace.from_dict(labels).to_dict(),
        "preprocess": model.preprocess.to_dict(),
        "meta": meta or {},
        "fusion": None,
    }
    fusion = getattr(model, "fusion", None)
    if fusion is not None:
        state.update(fusion=fusion.name, fusion_kwargs=dict(fusion.kwargs),
                     fusion_state={k: v.detach().cpu() for k, v in fusion.state_dict().items()})
    return atomic_write(path, lambda p: torch.save(state, p), suffix=".pt")


def load_model(path: str | Path) -> tuple[GeoModel, dict]:
    """(model in eval mode, the checkpoint dict without weights; ``info["labels"]`` is the v2 labels dict).

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
    if not isinstance(ck, dict) or ck.get("format") not in FORMATS:
        raise ValueError(f"{path}: not a {FORMAT} file")
    missing = [k for k in _REQUIRED if k not in ck]
    if missing:
        raise ValueError(f"{path}: a damaged {ck['format']} file: no {', '.join(missing)}")
    try:
        labels = LabelSpace.from_dict(ck["labels"], where=str(path))
    except LabelSpaceError as e:
        raise ValueError(f"{e}: a damaged model file") from None
    pp = ck["preprocess"]
    if not isinstance(pp, dict) or not {"size", "mean", "std"} <= pp.keys():
        raise ValueError(f"{path}: no usable preprocess (size, mean, std): a damaged model file")
    try:
        preprocess = Preprocess.from_dict(pp)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its preprocess {pp} is not usable ({one_line(e)}): a damaged model file") from None
    try:
        backbone = create_backbone(str(ck["backbone"]), pretrained=ck["backbone_state"] is None)
        # the pixels the head was trained on: the file's record (size, mean, std, low-pass, exposure), not whatever
        # the backbone's code (or an upgraded library behind it) defaults to today
        backbone.preprocess = preprocess
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}") from None
    except Exception as e:  # noqa: BLE001 - an optional backbone library that is missing or fails
        raise ValueError(f"{path}: cannot build its backbone {ck['backbone']!r} ({one_line(e)})") from None
    fusion = None
    if ck.get("fusion"):
        try:
            fusion = create_fusion(str(ck["fusion"]), int(ck["num_features"]), **dict(ck.get("fusion_kwargs") or {}))
            fusion.load_state_dict(dict(ck.get("fusion_state") or {}))
        except KeyError as e:
            raise ValueError(f"{path}: {e.args[0]}") from None
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: cannot build its fusion {ck['fusion']!r} ({one_line(e)})") from None
    head_name = str(ck.get("head", "linear"))
    kwargs = dict(ck.get("head_kwargs") or {"dropout": float(ck.get("dropout", 0.0))})
    try:
        head = create_head(head_name, fusion.out_features if fusion is not None else int(ck["num_features"]), labels, **kwargs)
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot build its head {head_name!r} ({one_line(e)})") from None
    head_state = dict(ck["head_state"])
    if ck["format"] == "geolocate-model/1":  # before the registry: no buffers (temperature was folded into fc)
        for k, v in head.state_dict().items():
            head_state.setdefault(k, v)
    try:
        if ck["backbone_state"] is not None:
            backbone.load_state_dict(ck["backbone_state"])
        head.load_state_dict(head_state)
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError) as e:
        raise ValueError(f"{path}: its weights do not fit its backbone {ck['backbone']!r}, head {head_name!r} and "
                         f"{labels.num_classes} classes ({one_line(e)})") from None
    model = GeoModel(backbone, head, fusion).eval()
    info = {k: v for k, v in ck.items() if k not in ("backbone_state", "head_state", "fusion_state")}
    info["labels"] = labels.to_dict()
    info.setdefault("head", head_name)
    return model, info


_REQUIRED = ("backbone", "backbone_state", "head_state", "num_features", "labels", "preprocess")
