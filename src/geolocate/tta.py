"""Test-time augmentation: deterministic views of one image, chosen per imagery domain, fused as a multi-view sample.

Only transforms the domain is invariant to are used (the same rule as training augmentation, ``geolocate.augment``):

- ``aerial`` (north-up patches): the image and five crops of ``crop`` of each side (centre and the four corners).
  Never flips, rotations or transposes: each roughly doubles the median error of the Earth model (issue 9's table).
- ``street`` (photos): the image, a centre crop and a roll of ± ``roll_deg`` degrees. No flips (mirrored roads drive
  on the other side, signs read backwards).

``tta_transforms(domain)`` gives the transforms (each maps an upright decoded RGB image to a view, before the
backbone's own crop/resize, like ``Preprocess.load(transform=...)``); the predictor fuses the views' probabilities
with its view combiner. ``domain_of(sources)`` reads the domain from a model's training sources.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
from PIL import Image

Transform = Callable[[Image.Image], Image.Image]


def _box(fx: float, fy: float, crop: float) -> Transform:
    """The ``crop`` x ``crop`` box whose top-left corner sits at (fx, fy) of the free margin, resized back."""
    def t(im: Image.Image) -> Image.Image:
        w, h = im.size
        cw, ch = max(1, round(w * crop)), max(1, round(h * crop))
        left, top = round((w - cw) * fx), round((h - ch) * fy)
        return im.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    return t


def _roll(deg: float) -> Transform:
    from .augment import roll

    return lambda im: roll(im, deg)


def _identity(im: Image.Image) -> Image.Image:
    return im


def tta_transforms(domain: str, crop: float = 0.9, roll_deg: float = 3.0) -> list[Transform]:
    if domain == "aerial":
        return [_identity] + [_box(fx, fy, crop) for fx, fy in ((0.5, 0.5), (0, 0), (1, 0), (0, 1), (1, 1))]
    if domain == "street":
        return [_identity, _box(0.5, 0.5, crop), _roll(roll_deg), _roll(-roll_deg)]
    raise ValueError(f"unknown TTA domain {domain!r}: choose aerial or street")


def domain_of(sources: Iterable[str]) -> str:
    """``aerial`` when any training source is aerial (the Earth patches), else ``street``."""
    from .sources.base import SOURCE_DOMAINS

    return "aerial" if any(SOURCE_DOMAINS.get(s, "street") == "aerial" for s in sources) else "street"
