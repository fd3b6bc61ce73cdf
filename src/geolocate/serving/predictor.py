"""The one predictor behind the Python API, the CLI and the HTTP server.

``Geolocator.from_pretrained("models/best.pt").predict(images, top_k=5)``
takes paths, bytes or PIL images (batched internally) and returns one
:class:`Prediction` per input: top-k H3 cells with place name, probability and
centroid, the predicted lat/lon, and — when the truth is known from EXIF GPS
or given — the error in km. Unreadable inputs give a Prediction with
``error`` set instead of raising, so a batch never loses the good images.
"""
from __future__ import annotations

import dataclasses as dc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..exif import read_exif
from ..geo import haversine_km
from ..io import ImageError, load_image
from ..models import load_model

ImageInput = str | Path | bytes | Image.Image


@dc.dataclass
class CellPrediction:
    cell: str
    place: str
    probability: float
    lat: float
    lon: float


@dc.dataclass
class Prediction:
    source: str
    lat: float | None = None
    lon: float | None = None
    confidence: float | None = None
    place: str | None = None
    top: list[CellPrediction] = dc.field(default_factory=list)
    true_lat: float | None = None
    true_lon: float | None = None
    error_km: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return dc.asdict(self)


class Geolocator:
    def __init__(self, model: torch.nn.Module, info: dict):
        self.model = model.eval()
        self.info = info
        self.classes = info["labels"]["classes"]
        self.class_lat = np.array([c["lat"] for c in self.classes])
        self.class_lon = np.array([c["lon"] for c in self.classes])
        self.preprocess = model.preprocess

    @classmethod
    def from_pretrained(cls, path: str | Path = "models/best.pt") -> "Geolocator":
        model, info = load_model(path)
        return cls(model, info)

    # ---- core ---------------------------------------------------------------
    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        return torch.softmax(self.model(batch), dim=1).numpy()

    def _prepare(self, item: ImageInput, truth: tuple[float, float] | None) -> tuple[np.ndarray | None, Prediction]:
        name = str(item) if isinstance(item, (str, Path)) else ("<upload>" if isinstance(item, (bytes, bytearray)) else "<image>")
        pred = Prediction(source=name)
        try:
            im = load_image(item, draft=self.preprocess.size * 2)
        except ImageError as e:
            pred.error = str(e)
            return None, pred
        if truth is not None:
            pred.true_lat, pred.true_lon = truth
        elif isinstance(item, (str, Path)):
            meta = read_exif(item)
            if meta["lat"] is not None:
                pred.true_lat, pred.true_lon = meta["lat"], meta["lon"]
        return self.preprocess.image_to_array(im), pred

    def _finish(self, pred: Prediction, probs: np.ndarray, top_k: int) -> Prediction:
        order = np.argsort(-probs)[:top_k]
        pred.top = [CellPrediction(cell=self.classes[i]["cell"], place=self.classes[i]["place"], probability=float(probs[i]),
                                   lat=float(self.class_lat[i]), lon=float(self.class_lon[i])) for i in order]
        best = pred.top[0]
        pred.lat, pred.lon, pred.confidence, pred.place = best.lat, best.lon, best.probability, best.place
        if pred.true_lat is not None:
            pred.error_km = float(haversine_km(pred.true_lat, pred.true_lon, pred.lat, pred.lon))
        return pred

    def predict_iter(self, images: Iterable[ImageInput], top_k: int = 5, batch_size: int = 32,
                     truths: Sequence[tuple[float, float] | None] | None = None) -> Iterator[Prediction]:
        """Stream predictions in input order; decoding runs on threads alongside inference."""
        items = list(images)
        truths = list(truths) if truths is not None else [None] * len(items)
        with ThreadPoolExecutor(max_workers=2) as pool:
            prepared = pool.map(lambda a: self._prepare(*a), zip(items, truths))
            buf: list[tuple[np.ndarray | None, Prediction]] = []
            for entry in prepared:
                buf.append(entry)
                if len(buf) == batch_size:
                    yield from self._run(buf, top_k)
                    buf = []
            if buf:
                yield from self._run(buf, top_k)

    def _run(self, buf, top_k: int) -> Iterator[Prediction]:
        arrays = [a for a, _ in buf if a is not None]
        probs = self.probabilities(torch.from_numpy(np.stack(arrays))) if arrays else None
        j = 0
        for a, pred in buf:
            if a is None:
                yield pred
            else:
                yield self._finish(pred, probs[j], top_k)
                j += 1

    def predict(self, images: ImageInput | Sequence[ImageInput], top_k: int = 5, batch_size: int = 32,
                truths: Sequence[tuple[float, float] | None] | None = None) -> list[Prediction]:
        if isinstance(images, (str, Path, bytes, bytearray, Image.Image)):
            images = [images]
        return list(self.predict_iter(images, top_k=top_k, batch_size=batch_size, truths=truths))
