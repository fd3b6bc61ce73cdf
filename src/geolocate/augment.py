"""Training-time augmentation of decoded images, per imagery domain. Pillow and numpy only; no torch.

An :class:`Augment` is built from the ``augment:`` config section and the domain of the data
(``aerial`` for the embedded Earth source, ``street`` for photos: folder, manifest, Mapillary). It maps a
decoded, upright RGB image to an augmented one *before* the backbone's ``Preprocess.fit`` (so blur, JPEG and
resolution act on the source pixels, as the real shifts do). Every op is drawn from one numpy Generator
seeded per (image content, augmentation spec, copy), so the same inputs give the same bytes.

The ops, in the order they run (each with probability ``augment.p``):

- geometric, only where the domain is invariant: ``rotate`` (street photos: a few degrees of camera roll);
  never for north-up aerial imagery. Nothing flips, in either domain: a mirrored aerial patch is another
  place, and a mirrored street photo drives on the other side of the road and reads its signs backwards;
- ``crop`` (a random box of ``crop_min``..1 of each side) and ``scale`` (down to ``scale_min``..1 of the pixels
  and back: the resolution of another camera or zoom level) — both keep north up;
- photometric: ``brightness``, ``contrast``, ``saturation`` (factors 1 ± strength), ``hue`` (a shift of
  ± strength of the colour circle), ``gamma`` (exponent 1 ± strength);
- ``blur`` (Gaussian, sigma up to ``blur_sigma`` px) or ``sharpen`` (unsharp, factor up to 1 + ``sharpen``),
  never both;
- ``jpeg``: re-encoding at a quality between ``jpeg_quality_min`` and 95.

Augmentation runs only in training (augmented embedding copies of *training* images for a frozen
backbone, the batches of fine-tuning); evaluation and serving never see it.
"""
from __future__ import annotations

import dataclasses as dc
import hashlib
import io
import json
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

Op = Callable[[Image.Image, np.random.Generator, "Augment"], Image.Image]
DOMAINS = ("aerial", "street")


def _factor(rng: np.random.Generator, strength: float) -> float:
    return float(rng.uniform(1.0 - strength, 1.0 + strength))


def _rotate(im: Image.Image, rng: np.random.Generator, a: "Augment") -> Image.Image:
    return roll(im, float(rng.uniform(-a.rotate_deg, a.rotate_deg)))


def roll(im: Image.Image, deg: float) -> Image.Image:
    """A roll of ``deg`` degrees, then the largest centred box without the corners it exposes, scaled back to size
    (training augmentation of street photos, and their test-time views)."""
    w, h = im.size
    out = im.rotate(deg, resample=Image.BILINEAR, expand=False)
    t = abs(np.radians(deg))
    k = 1.0 / (np.cos(t) + np.sin(t) * max(w, h) / min(w, h))  # inner box that stays inside the rotated frame
    cw, ch = max(1, round(w * k)), max(1, round(h * k))
    left, top = (w - cw) // 2, (h - ch) // 2
    return out.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch))


def _crop(im: Image.Image, rng: np.random.Generator, a: "Augment") -> Image.Image:
    w, h = im.size
    f = float(rng.uniform(a.crop_min, 1.0))
    cw, ch = max(1, round(w * f)), max(1, round(h * f))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch))


def _scale(im: Image.Image, rng: np.random.Generator, a: "Augment") -> Image.Image:
    w, h = im.size
    f = float(rng.uniform(a.scale_min, 1.0))
    small = im.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR, reducing_gap=None)
    return small.resize((w, h), Image.BILINEAR)


def _enhance(cls, strength: str) -> Op:
    """A Pillow enhancer at factor 1 +- the Augment field ``strength``."""
    def op(im: Image.Image, rng: np.random.Generator, a: "Augment") -> Image.Image:
        return cls(im).enhance(_factor(rng, getattr(a, strength)))
    return op


def _hue(im: Image.Image, rng: np.random.Generator, a: "Augment") -> Image.Image:
    hsv = np.asarray(im.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(float(rng.uniform(-a.hue, a.hue)) * 256)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _gamma(im: Image.Image, rng: np.random.Generator, a: "Augment") -> Image.Image:
    g = _factor(rng, a.gamma)
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** g + 0.5, 0, 255).astype(np.uint8)
    return im.point(lut.tolist() * 3)


def _blur_or_sharpen(im: Image.Image, rng: np.random.Generator, a: "Augment") -> Image.Image:
    if a.blur_sigma > 0 and (a.sharpen == 0 or rng.uniform() < 0.5):
        return im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, a.blur_sigma))))
    return ImageEnhance.Sharpness(im).enhance(1.0 + float(rng.uniform(0.0, a.sharpen)))


def _jpeg(im: Image.Image, rng: np.random.Generator, a: "Augment") -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(rng.integers(a.jpeg_quality_min, 96)))
    with Image.open(io.BytesIO(buf.getvalue())) as out:
        return out.convert("RGB")


# name -> (op, the domains it is valid in, whether it is on at these settings); run in this order
OPS: dict[str, tuple[Op, tuple[str, ...], Callable[["Augment"], bool]]] = {
    "rotate": (_rotate, ("street",), lambda a: a.rotate_deg > 0),
    "crop": (_crop, DOMAINS, lambda a: a.crop_min < 1),
    "scale": (_scale, DOMAINS, lambda a: a.scale_min < 1),
    "brightness": (_enhance(ImageEnhance.Brightness, "brightness"), DOMAINS, lambda a: a.brightness > 0),
    "contrast": (_enhance(ImageEnhance.Contrast, "contrast"), DOMAINS, lambda a: a.contrast > 0),
    "saturation": (_enhance(ImageEnhance.Color, "saturation"), DOMAINS, lambda a: a.saturation > 0),
    "hue": (_hue, DOMAINS, lambda a: a.hue > 0),
    "gamma": (_gamma, DOMAINS, lambda a: a.gamma > 0),
    "blur_sharpen": (_blur_or_sharpen, DOMAINS, lambda a: a.blur_sigma > 0 or a.sharpen > 0),
    "jpeg": (_jpeg, DOMAINS, lambda a: a.jpeg_quality_min < 95),
}


@dc.dataclass(frozen=True)
class Augment:
    """The strengths of every op for one domain (see the module docstring); ``seed`` salts every draw.

    Build it with :meth:`from_config`: the defaults live in ``geolocate.config.AugmentConfig``.
    """
    domain: str
    p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    gamma: float
    blur_sigma: float
    sharpen: float
    scale_min: float
    crop_min: float
    rotate_deg: float
    jpeg_quality_min: int
    seed: int

    @classmethod
    def from_config(cls, ac=None, domain: str = "street", **changes) -> "Augment":
        """From an ``AugmentConfig`` (default: the defaults), its ``domain`` unless ``auto``, then ``changes``."""
        if ac is None:
            from .config import AugmentConfig

            ac = AugmentConfig()
        fields = {f.name for f in dc.fields(cls)} - {"domain"}
        return dc.replace(cls(domain=ac.domain if ac.domain != "auto" else domain, **{k: getattr(ac, k) for k in fields}), **changes)

    @property
    def ops(self) -> list[str]:
        """The ops this domain and these strengths apply, in order."""
        return [name for name, (_, domains, on) in OPS.items() if self.domain in domains and on(self)]

    @property
    def key(self) -> str:
        """Names this augmentation in caches: changes whenever the pixels it makes could change."""
        return hashlib.sha1(json.dumps(dc.asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def seed_for(self, digest: str | None, copy: int) -> int:
        """The generator seed of copy ``copy`` of the image whose content digest is ``digest``."""
        h = hashlib.blake2b(f"{self.key}|{digest}|{copy}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little")

    def apply(self, im: Image.Image, rng: np.random.Generator) -> Image.Image:
        im = im.convert("RGB") if im.mode != "RGB" else im
        for name in self.ops:
            if rng.uniform() < self.p:
                im = OPS[name][0](im, rng, self)
        return im

    def seeded(self, seed: int) -> Callable[[Image.Image], Image.Image]:
        """``apply`` with its own generator: the transform one image gets (see ``Preprocess.load``)."""
        return lambda im: self.apply(im, np.random.default_rng(seed))
