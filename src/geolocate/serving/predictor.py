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
import itertools
from collections import deque
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..exif import read_exif
from ..geo import haversine_km
from ..io import ImageError, load_image, one_line
from ..models import Preprocess, load_model

ENGINES = ("torch", "onnx")

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
    """Model + labels + preprocessing behind one ``engine`` (PyTorch eager or ONNX Runtime).

    The engine's ``probabilities(batch) -> (B, C) ndarray`` is the only place the
    network runs; engines serialise their own calls, so one Geolocator can be
    shared by every thread of a server.
    """

    def __init__(self, model: torch.nn.Module | None, info: dict, engine=None, path: str | Path | None = None):
        from .export import TorchEngine

        if engine is None:
            if model is None:
                raise ValueError("Geolocator needs a model or an engine")
            engine = TorchEngine(model)
        self.engine = engine
        self.model = model.eval() if model is not None else None
        self.info = info
        self.path = Path(path) if path is not None else None
        self.classes = info["labels"]["classes"]
        self.class_lat = np.array([c["lat"] for c in self.classes])
        self.class_lon = np.array([c["lon"] for c in self.classes])
        if model is not None:
            self.preprocess = model.preprocess
        else:
            pp = info["preprocess"]
            self.preprocess = Preprocess(int(pp["size"]), tuple(pp["mean"]), tuple(pp["std"]))

    @classmethod
    def from_pretrained(cls, path: str | Path = "models/best.pt", engine: str = "torch",
                        onnx_path: str | Path | None = None, threads: int | None = None) -> "Geolocator":
        """Load a model file. ``engine="onnx"`` runs it with ONNX Runtime from ``<model>.onnx``
        (exported next to the model on first use, and again whenever the model changes);
        a path ending in ``.onnx`` is served by ONNX Runtime alone."""
        from .export import OnnxEngine, onnx_engine_for

        path = Path(path)
        engine = str(getattr(engine, "value", engine)).lower()
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
        if path.suffix.lower() == ".onnx":
            if not path.is_file():
                raise FileNotFoundError(f"model file {path} does not exist")
            eng = OnnxEngine(path, threads)
            if eng.info is None:
                raise ValueError(f"{path}: an ONNX file without geolocate metadata (export it with `geolocate export-onnx`)")
            return cls(None, eng.info, engine=eng, path=path)
        model, info = load_model(path)
        if engine == "onnx":
            eng = onnx_engine_for(model, info, path, Path(onnx_path) if onnx_path else None, threads)
            return cls(None, info, engine=eng, path=path)
        return cls(model, info, path=path)

    @property
    def engine_name(self) -> str:
        return getattr(self.engine, "name", type(self.engine).__name__)

    def model_card(self) -> dict:
        """What the model is, what it was trained on and how well it did (for /model and reports)."""
        meta = self.info.get("meta", {}) or {}
        labels = self.info["labels"]
        return {
            "backbone": self.info.get("backbone"),
            "engine": self.engine_name,
            "num_classes": int(labels.get("num_classes", len(self.classes))),
            "h3_resolution": labels.get("h3_resolution"),
            "preprocess": dict(self.info.get("preprocess", {})),
            "run_id": meta.get("run_id"),
            "training_data": {k: meta.get(k) for k in ("sources", "images", "dataset_fingerprint")},
            "metrics": meta.get("metrics", {}),
            "model_file": str(self.path) if self.path else None,
        }

    # ---- core ---------------------------------------------------------------
    def probabilities(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """(B, 3, S, S) preprocessed batch -> (B, C) class probabilities (softmax)."""
        return self.engine.probabilities(batch)

    def _prepare(self, item: ImageInput, truth: tuple[float, float] | None, name: str | None = None) -> tuple[np.ndarray | None, Prediction]:
        given = name
        if name is None:
            name = str(item) if isinstance(item, (str, Path)) else ("<upload>" if isinstance(item, (bytes, bytearray)) else "<image>")
        pred = Prediction(source=name)
        if not isinstance(item, (str, Path, bytes, bytearray, Image.Image)):
            pred.error = f"{name}: not an image input (give a path, bytes or a PIL image, not {type(item).__name__})"
            return None, pred
        try:
            im = load_image(item, name=given, draft=self.preprocess.size * 2)
            array = self.preprocess.image_to_array(im)
        except ImageError as e:
            pred.error = str(e)
            return None, pred
        except Exception as e:  # noqa: BLE001 - whatever one image does (MemoryError included) is that image's error
            pred.error = f"{name}: cannot be prepared ({one_line(e)})"
            return None, pred
        if truth is not None:
            pred.true_lat, pred.true_lon = truth
        elif isinstance(item, (str, Path, bytes, bytearray)):
            meta = read_exif(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item)
            if meta["lat"] is not None:
                pred.true_lat, pred.true_lon = meta["lat"], meta["lon"]
        return array, pred

    def predict_one(self, item: ImageInput, top_k: int = 5, name: str | None = None,
                    truth: tuple[float, float] | None = None) -> Prediction:
        """One image, decoded and run in the calling thread (what the HTTP server uses per request)."""
        _check_positive("top_k", top_k)
        return next(self._run([self._prepare(item, truth, name)], top_k))

    def _finish(self, pred: Prediction, probs: np.ndarray, top_k: int) -> Prediction:
        if not np.isfinite(probs).all():
            pred.error = (f"{pred.source}: the model gave non-finite probabilities (a corrupted model file?); "
                          "no prediction")
            return pred
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
        """Stream predictions in input order; decoding runs on threads alongside inference.

        At most two batches are decoded ahead of the model, so memory stays flat for any number of inputs.
        ``top_k`` and ``batch_size`` must be positive integers (ValueError otherwise).
        """
        _check_positive("top_k", top_k)
        _check_positive("batch_size", batch_size)
        if images is None:
            raise ValueError("images is None: give a path, bytes, a PIL image or a list of them")
        items = list(images)
        truths = list(truths) if truths is not None else [None] * len(items)
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending: deque = deque()
            todo = iter(zip(items, truths))

            def top_up() -> None:
                for args in itertools.islice(todo, 2 * batch_size - len(pending)):
                    pending.append(pool.submit(self._prepare, *args))

            top_up()
            buf: list[tuple[np.ndarray | None, Prediction]] = []
            while pending:
                buf.append(pending.popleft().result())
                top_up()
                if len(buf) == batch_size or not pending:
                    yield from self._run(buf, top_k)
                    buf = []

    def _run(self, buf, top_k: int) -> Iterator[Prediction]:
        arrays = [a for a, _ in buf if a is not None]
        try:
            probs = self.probabilities(torch.from_numpy(np.stack(arrays))) if arrays else None
        except Exception as e:  # noqa: BLE001 - one bad input must not sink the batch: run them one by one
            if len(arrays) > 1:
                for a, pred in buf:
                    yield from (self._run([(a, pred)], top_k) if a is not None else [pred])
                return
            for a, pred in buf:
                if a is not None:
                    pred.error = f"{pred.source}: inference failed ({one_line(e)})"
                yield pred
            return
        j = 0
        for a, pred in buf:
            if a is None:
                yield pred
            else:
                yield self._finish(pred, probs[j], top_k)
                j += 1

    def predict(self, images: ImageInput | Sequence[ImageInput], top_k: int = 5, batch_size: int = 32,
                truths: Sequence[tuple[float, float] | None] | None = None) -> list[Prediction]:
        """One Prediction per input, in order; an input that cannot be used has ``error`` set instead of raising."""
        if isinstance(images, (str, Path, bytes, bytearray, Image.Image)):
            images = [images]
        return list(self.predict_iter(images, top_k=top_k, batch_size=batch_size, truths=truths))


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
