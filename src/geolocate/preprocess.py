"""A backbone's preprocessing: decode an image at the model's size, then normalise. No torch here.

One decode path serves embedding extraction, training batches, the predictor,
the server and the export checks, so a model sees the same pixels everywhere:

1. open once and read the EXIF block once (orientation and GPS from the same parse);
2. JPEG draft: the decoder itself scales by 1/2, 1/4 or 1/8 while staying at least
   ``size`` on both sides (a 12 MP photo decodes at ~500x375 instead of 4000x3000);
3. centre-crop the largest square, *then* resize it to ``size`` x ``size``: the work is
   bounded by the output, so a 1x60000 strip costs the same as a normal photo. With ``detail`` (px) the
   square first goes through ``detail`` x ``detail`` (antialiased): a low-pass at the information level of
   the imagery, so one sharper, softer or lower-resolution than the training images reaches the network alike
   (the Earth patches carry ~60 px of NASA pixels across, whatever size they are cut at). With ``exposure`` the
   small square is then scaled so its mean luminance is ``exposure`` (0..1): the same picture taken or rendered
   brighter or darker reaches the network alike (clipped highlights aside);
4. apply the EXIF orientation to the small square (a square centre crop commutes with
   the 8 EXIF orientations);
5. one table-lookup pass from uint8 HWC to normalised float32 CHW.

A training-time ``transform`` (``geolocate.augment``) sees the whole decoded image, upright, before step 3:
it is the only step that differs between training and evaluation.
"""
from __future__ import annotations

import dataclasses as dc
import functools
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .exif import image_exif
from .io import decode_image, to_rgb

# EXIF orientation tag -> the transpose that undoes it (as PIL's ImageOps.exif_transpose)
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
_ORIENTATION_TAG = 0x0112


def orient(im: Image.Image, orientation: int | None) -> Image.Image:
    method = _ORIENT.get(orientation or 1)
    return im.transpose(method) if method is not None else im


@dc.dataclass(frozen=True)
class Preprocess:
    """Centre-crop the largest square, (``detail`` > 0: through ``detail`` px,) resize to ``size``, scale to [0, 1],
    normalise with mean/std."""
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    detail: int = 0  # px: the square is first resampled to detail x detail (antialiased low-pass); 0 = off
    exposure: float = 0.0  # mean luminance (0..1) every image is scaled to; 0 = off

    def __post_init__(self):
        if not 0 <= self.detail <= self.size:
            raise ValueError(f"preprocess detail must be 0 (off) or 1..{self.size} px (the input size), got {self.detail}")
        if not 0 <= self.exposure < 1:
            raise ValueError(f"preprocess exposure must be 0 (off) or a mean luminance in (0, 1), got {self.exposure}")

    def to_dict(self) -> dict:
        return dc.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["size"]), tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]), int(d.get("detail", 0)),
                   float(d.get("exposure", 0.0)))

    @property
    def cache_suffix(self) -> str:
        """Part of a backbone's cache name: the features change with ``detail`` and ``exposure``."""
        return (f"-detail{self.detail}" if self.detail else "") + (f"-exposure{self.exposure:g}" if self.exposure else "")

    # ---- pixels ---------------------------------------------------------------
    def fit(self, im: Image.Image) -> Image.Image:
        """Centre square crop, (``detail``: through detail x detail, Lanczos; ``exposure``: scaled to its mean
        luminance,) then resize to size x size (bilinear, antialiased); a no-op at the right size without either."""
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        if self.detail:
            if (w, h) != (self.detail, self.detail):
                im = im.resize((self.detail, self.detail), Image.LANCZOS, box=(left, top, left + s, top + s), reducing_gap=3.0)
            if self.exposure:
                im = self._expose(im)
            return im.resize((self.size, self.size), Image.BILINEAR)
        if (w, h) != (self.size, self.size):
            im = im.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + s, top + s), reducing_gap=3.0)
        return self._expose(im) if self.exposure else im

    def _expose(self, im: Image.Image) -> Image.Image:
        """``im`` scaled so its mean luminance (Rec. 601) is ``exposure``, clipped to 0..255."""
        a = np.asarray(im, dtype=np.float32)
        y = float((a @ np.array([0.299, 0.587, 0.114], np.float32)).mean()) / 255.0
        return Image.fromarray(np.clip(a * (self.exposure / max(y, 1e-3)) + 0.5, 0, 255).astype(np.uint8))

    @functools.cached_property
    def _lut(self) -> np.ndarray:
        """(3, 256) float32: uint8 value -> normalised value, per channel."""
        v = np.arange(256, dtype=np.float64) / 255.0
        return np.stack([(v - m) / s for m, s in zip(self.mean, self.std)]).astype(np.float32)

    def to_array(self, im: Image.Image) -> np.ndarray:
        """(3, size, size) float32 for an RGB image already at the model's size."""
        a = np.asarray(im, dtype=np.uint8)
        lut = self._lut
        out = np.empty((3, a.shape[0], a.shape[1]), dtype=np.float32)
        for c in range(3):
            np.take(lut[c], a[:, :, c], out=out[c])
        return out

    def image_to_array(self, im: Image.Image) -> np.ndarray:
        """(3, size, size) float32 for any decoded RGB image (orientation already applied)."""
        return self.to_array(self.fit(im.convert("RGB") if im.mode != "RGB" else im))

    def load(self, source, name: str | None = None,
             transform: Callable[[Image.Image], Image.Image] | None = None) -> tuple[np.ndarray, Image.Exif]:
        """Decode ``source`` (path, bytes or PIL image) the cheap way; return (array, its EXIF).

        ``transform`` (training only) maps the upright decoded RGB image before it is cropped and resized.
        Raises :class:`geolocate.io.ImageError` naming the file for anything that is not a usable image.
        """
        if isinstance(source, Image.Image):
            im, exif = source, source.getexif()
        else:
            im = decode_image(source, name, draft=(self.size, self.size))
            exif = image_exif(im)
        rgb = to_rgb(im, transpose=False)
        if transform is not None:
            return self.to_array(self.fit(transform(orient(rgb, exif.get(_ORIENTATION_TAG))))), exif
        return self.to_array(orient(self.fit(rgb), exif.get(_ORIENTATION_TAG))), exif

    def load_array(self, source, name: str | None = None,
                   transform: Callable[[Image.Image], Image.Image] | None = None) -> np.ndarray:
        return self.load(source, name, transform)[0]

    def __call__(self, images: Sequence[Image.Image]):
        """A torch batch (B, 3, size, size) of decoded PIL images (torch imported only here)."""
        import torch

        return torch.from_numpy(np.stack([self.image_to_array(im) for im in images]))

    def batch(self, sources: Sequence, names: Sequence[str | None] | None = None) -> np.ndarray:
        """(B, 3, size, size) float32 for several inputs (raises on the first bad one)."""
        names = names or [None] * len(sources)
        return np.stack([self.load_array(s, n) for s, n in zip(sources, names)])

