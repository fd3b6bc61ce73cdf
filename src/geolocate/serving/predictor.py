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
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from ..exif import exif_metadata
from ..geo import haversine_km
from ..io import ImageError, file_sha256, one_line, verify_sidecar
from ..preprocess import Preprocess
from ..runtime import cpu_count, ordered_map

ENGINES = ("auto", "onnx", "onnx-int8", "torch")

ImageInput = str | Path | bytes | Image.Image
# a list or tuple of images: the views of one sample, in the model's slot order; a mapping view name -> image:
# the views of one sample by name (``{"N": a, "S": c}``: a fused model puts each in its slot, the others absent)
SampleInput = ImageInput | Sequence[ImageInput] | Mapping[str, ImageInput]


@dc.dataclass
class CellPrediction:
    cell: str
    place: str
    probability: float
    lat: float
    lon: float


@dc.dataclass
class RegionPrediction:
    region: str       # "Skane, SE": GeoNames admin1 and country code
    key: str          # "SE/Skane"
    probability: float  # summed over the region's cells


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
    point: str | None = None  # "refined": a training location inside the top cells; "regressed": the head's offset or
    # coordinates; "cell": the top cell's anchor
    regions: list[RegionPrediction] = dc.field(default_factory=list)  # top-5 regions (serving.confidence)
    prediction_set: dict | None = None  # conformal cell set: coverage, size, area_km2, cells (threshold fit on validation)
    ood: bool | None = None     # out-of-distribution flag (None: the model has no OOD threshold)
    ood_score: float | None = None
    warning: str | None = None  # one line for the user (the OOD warning)
    abstained: bool = False     # below --min-confidence: the answer is given but should not be used
    views: list[str] = dc.field(default_factory=list)    # a multi-view sample: the views its answer uses
    dropped: list[str] = dc.field(default_factory=list)  # views left out of it, each "name: why"

    def to_dict(self) -> dict:
        return dc.asdict(self)


@dc.dataclass
class SequencePrediction:
    """One answer for a sequence of frames (their evidence combined) and each frame's own prediction.

    ``frame_errors_km``: the distance from the sequence's answer to each frame's known position (None where unknown).
    """
    sequence: str
    prediction: Prediction
    frames: list[Prediction]
    combiner: str
    frame_errors_km: list[float | None] = dc.field(default_factory=list)

    def to_dict(self) -> dict:
        return dc.asdict(self)


class Geolocator:
    """Model + labels + preprocessing behind one ``engine`` (ONNX Runtime or PyTorch eager).

    The engine's ``probabilities(batch) -> (B, C) ndarray`` is the only place the network runs;
    one Geolocator can be shared by every thread of a server.
    """

    def __init__(self, model=None, info: dict | None = None, engine=None, path: str | Path | None = None,
                 workers: int | None = None):
        if engine is None:
            if model is None:
                raise ValueError("Geolocator needs a model or an engine")
            from .engines import TorchEngine

            engine = TorchEngine(model)
        if info is None:
            raise ValueError("Geolocator needs the model's info (labels, preprocess)")
        self.engine = engine
        self.model = model.eval() if model is not None else None
        self.info = info
        self.path = Path(path) if path is not None else None
        self.workers = workers or cpu_count()
        self.classes = info["labels"]["classes"]
        self.class_lat = np.array([c["lat"] for c in self.classes])
        self.class_lon = np.array([c["lon"] for c in self.classes])
        self.preprocess = model.preprocess if model is not None else Preprocess.from_dict(info["preprocess"])
        self._warned: set[str] = set()
        fusion = (info.get("fusion_kwargs") or {}) if info.get("fusion") else {}
        # a fused model's view slots: a multi-view sample is fused by the model's own fusion (when its engine can)
        self.fusion_slots = list(fusion.get("views") or []) if getattr(engine, "has_views", False) else []
        self.gallery, self.refine_params = self._load_gallery()
        from .confidence import Confidence

        self.confidence = Confidence.load(info, self.classes, self._model_file(), self.gallery,
                                          getattr(self.engine, "has_features", False) and hasattr(self.engine, "run"))

    def _model_file(self) -> Path | None:
        """The ``.pt`` model file beside which the gallery lives (``best.int8.onnx`` / ``best.onnx`` -> ``best.pt``)."""
        if self.path is None:
            return None
        model_file = self.path
        while model_file.suffix:
            model_file = model_file.with_suffix("")
        return model_file.with_suffix(".pt")

    def _load_gallery(self):
        """The gallery the model was trained with (for refinement and/or feature reranking), if it has one, and the
        refinement parameters; a bad gallery warns and is not used."""
        from ..tasks.refine import Gallery, GalleryError, RefineParams, gallery_path, shipped_gallery

        meta = self.info.get("meta") or {}
        spec = shipped_gallery(meta)
        if not spec or self.path is None or not getattr(self.engine, "has_features", False):
            return None, None

        model_file = self._model_file()
        try:
            g = Gallery.load(gallery_path(model_file), sha256=spec.get("gallery_sha256"), features=spec.get("features"),
                             num_classes=len(self.classes))
        except GalleryError as e:
            from ..progress import console, tagged

            console.print(tagged("warning", f"{e}; answering with cell anchors"), highlight=False, soft_wrap=True)
            return None, None
        return g, (RefineParams(**meta["refine"]["params"]) if meta.get("refine") else None)

    def _rerank(self, probs: np.ndarray, feats: np.ndarray | None) -> np.ndarray:
        """The model's decode-time reranking stages (chosen on validation when it was trained), if it has any."""
        spec = (self.info.get("meta") or {}).get("rerank")
        if not spec or not spec.get("stages"):
            return probs
        from ..tasks.rerank import RerankContext, apply_reranking

        counts = np.asarray(spec["counts"], np.float64) if spec.get("counts") is not None else None
        ctx = RerankContext(self.class_lat, self.class_lon, counts, self.gallery, None if feats is None else np.nan_to_num(feats))
        safe = np.where(np.isfinite(probs), probs, 0.0)
        out = apply_reranking(spec["stages"], safe, ctx, on_skip=self._warn_once)
        return np.where(np.isfinite(probs).all(1, keepdims=True), out, probs)  # a non-finite row stays one (an error below)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            from ..progress import console, tagged

            console.print(tagged("warning", message), highlight=False, soft_wrap=True)

    @classmethod
    def from_pretrained(cls, path: str | Path | Sequence[str | Path] = "models/best.pt", engine: str = "auto",
                        onnx_path: str | Path | None = None, threads: int | None = None,
                        workers: int | None = None, ensemble: str = "average") -> "Geolocator":
        """Load a model file (or several: an ensemble over one label space, combined by ``ensemble`` =
        average | val-median | val-loss | rank; see :mod:`geolocate.serving.ensemble`).

        ``engine="auto"`` (the default) and ``"onnx"`` run it with ONNX Runtime from ``<model>.onnx``, reused
        while its recorded sha256 matches the model (no torch import, no PyTorch model built) and exported again,
        with a parity check against PyTorch, whenever the model changes. ``"auto"`` falls back to PyTorch
        (with a warning) if the export fails its parity check; ``"onnx"`` raises. ``"torch"`` runs PyTorch eager.
        ``"onnx-int8"`` runs ``<model>.int8.onnx`` made by ``geolocate export-onnx-int8`` (which refuses to write
        one that disagrees with fp32 on held-out images). A path ending in ``.onnx`` is served by ONNX Runtime alone. ``threads``: intra-op threads per call
        (default 1 for ONNX Runtime, whose calls run on ``workers`` threads; all cores for PyTorch).
        """
        if isinstance(path, (list, tuple)):
            if len(path) > 1:
                from .ensemble import load_ensemble

                return load_ensemble(path, ensemble, engine=engine, onnx_path=onnx_path, threads=threads, workers=workers)
            if not path:
                raise ValueError("no model file given")
            path = path[0]
        path = Path(path)
        engine = str(getattr(engine, "value", engine)).lower()
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist (train one with `geolocate train`)")
        if path.suffix.lower() == ".onnx":
            from .engines import OnnxEngine

            eng = OnnxEngine(path, threads or 1)
            if eng.info is None:
                raise ValueError(f"{path}: an ONNX file without geolocate metadata (export it with `geolocate export-onnx`)")
            return cls(None, eng.info, engine=eng, path=path, workers=workers)
        if engine == "onnx-int8":
            from .export import int8_path

            q = Path(onnx_path) if onnx_path else int8_path(path)
            eng = _cached_onnx_engine(path, q, threads or 1)
            if eng is None:
                raise ValueError(f"{q}: no int8 export of {path} (or one of an older model): run `geolocate export-onnx-int8 --model {path}`")
            eng.name = "onnx-int8"
            return cls(None, eng.info, engine=eng, path=path, workers=workers)
        if engine in ("auto", "onnx"):
            eng = _cached_onnx_engine(path, Path(onnx_path) if onnx_path else path.with_suffix(".onnx"), threads or 1)
            if eng is not None:
                return cls(None, eng.info, engine=eng, path=path, workers=workers)
        from ..models import load_model

        model, info = load_model(path)
        if engine in ("auto", "onnx"):
            from .export import ExportError, build_onnx_engine

            try:
                eng = build_onnx_engine(path, Path(onnx_path) if onnx_path else path.with_suffix(".onnx"), threads or 1, model, info)
                return cls(None, info, engine=eng, path=path, workers=workers)
            except ExportError as e:
                if engine == "onnx":
                    raise
                from ..progress import console

                console.print(f"warning: {e}; using the PyTorch engine", markup=False, highlight=False)
        from .engines import TorchEngine

        return cls(model, info, engine=TorchEngine(model, threads), path=path, workers=workers)

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
            "answer_point": ({"refined": True, **meta["refine"], "gallery_loaded": self.gallery is not None}
                             if meta.get("refine") else {"refined": False}),
            "rerank": [dict(st) for st in (meta.get("rerank") or {}).get("stages", [])],
            "model_file": str(self.path) if self.path else None,
            "confidence": self.confidence.card(),
            "ensemble": self.info.get("ensemble"),
        }

    # ---- core ---------------------------------------------------------------
    def probabilities(self, batch) -> np.ndarray:
        """(B, 3, S, S) preprocessed batch -> (B, C) class probabilities (softmax)."""
        return self.engine.probabilities(batch)

    def _prepare(self, item: SampleInput, truth: tuple[float, float] | None,
                 name: str | Sequence[str | None] | None = None) -> tuple[np.ndarray | list[np.ndarray] | None, Prediction]:
        """Decode one input (EXIF read once, in the same parse) into its array and a Prediction to fill.

        A list or tuple of images is one multi-view sample: its arrays (the views that decode) and one Prediction
        whose ``views``/``dropped`` say which were used; ``name`` may then be the sample's label or one name per view.
        """
        if isinstance(item, Mapping):
            return self._prepare_named_views(item, truth, name)
        if isinstance(item, (list, tuple)):
            return self._prepare_views(item, truth, name)
        given = name
        if name is None:
            name = str(item) if isinstance(item, (str, Path)) else ("<upload>" if isinstance(item, (bytes, bytearray)) else "<image>")
        pred = Prediction(source=name)
        if not isinstance(item, (str, Path, bytes, bytearray, Image.Image)):
            pred.error = f"{name}: not an image input (give a path, bytes or a PIL image, not {type(item).__name__})"
            return None, pred
        try:
            if self.tta:
                views = [self.preprocess.load(item, name=given, transform=t) for t in self._tta_transforms()]
                array, exif = [v for v, _ in views], views[0][1]
            else:
                array, exif = self.preprocess.load(item, name=given)
        except ImageError as e:
            pred.error = str(e)
            return None, pred
        except Exception as e:  # noqa: BLE001 - whatever one image does (MemoryError included) is that image's error
            pred.error = f"{name}: cannot be prepared ({one_line(e)})"
            return None, pred
        if truth is not None:
            pred.true_lat, pred.true_lon = truth
        elif not isinstance(item, Image.Image):
            meta = exif_metadata(exif)
            if meta["lat"] is not None:
                pred.true_lat, pred.true_lon = meta["lat"], meta["lon"]
        return array, pred

    def _prepare_named_views(self, item: Mapping, truth, name) -> tuple[list[np.ndarray] | None, Prediction]:
        """A sample given as {view name: image}: a fused model's slots by name (others absent); any other model
        reads the views in the mapping's order."""
        keys = [str(k) for k in item]
        if not self.fusion_slots:
            return self._prepare_views(list(item.values()), truth, name)
        unknown = [k for k in keys if k not in self.fusion_slots]
        label = name if isinstance(name, str) else " + ".join(str(v) for v in item.values())
        if unknown:
            return None, Prediction(source=label, error=f"{label}: view(s) {', '.join(unknown)} are not among the model's "
                                                        f"slots ({', '.join(self.fusion_slots)})")
        order = sorted(range(len(keys)), key=lambda i: self.fusion_slots.index(keys[i]))
        values = list(item.values())
        arrays, pred = self._prepare_views([values[i] for i in order], truth, name)
        if isinstance(arrays, ViewArrays):  # each decoded view's slot: by its name, not its position in the mapping
            arrays.slots = [self.fusion_slots.index(keys[order[i]]) for i in arrays.slots]
        return arrays, pred

    def _prepare_views(self, items: Sequence, truth, name) -> tuple[list[np.ndarray] | None, Prediction]:
        names = list(name) if isinstance(name, (list, tuple)) else [None] * len(items)
        if len(names) != len(items):
            raise ValueError(f"{len(names)} names for a sample of {len(items)} views")
        parts = []
        for it, n in zip(items, names):
            if isinstance(it, (list, tuple)):
                shown = n or f"view {len(parts) + 1}"
                parts.append((None, Prediction(source=shown, error=f"{shown}: a view must be one image, not a list")))
            else:
                parts.append(self._prepare(it, truth, n))
        label = name if isinstance(name, str) else " + ".join(p.source for _, p in parts)
        pred = Prediction(source=label, views=[p.source for a, p in parts if a is not None],
                          dropped=[p.error for a, p in parts if a is None])
        known = [p for a, p in parts if a is not None and p.true_lat is not None]
        if known:  # the given truth, else the first view with EXIF GPS
            pred.true_lat, pred.true_lon = known[0].true_lat, known[0].true_lon
        arrays = ViewArrays(x for a, _ in parts if a is not None for x in (a if isinstance(a, list) else [a]))  # TTA: views of views
        arrays.slots = [i for i, (a, _) in enumerate(parts) if a is not None]   # each decoded view's place in the sample
        arrays.per_view = [a if isinstance(a, list) else [a] for a, _ in parts if a is not None]  # each view's TTA views
        arrays.given = len(items)
        if not items:
            pred.error = f"{label or '<sample>'}: a sample with no views"
        elif not arrays:
            pred.error = f"{label}: none of its {len(items)} views can be used ({'; '.join(pred.dropped)})"
        elif self.fusion_slots and len(items) > len(self.fusion_slots):
            pred.error = (f"{label}: {len(items)} views, but the model fuses at most {len(self.fusion_slots)} "
                          f"(its view slots {', '.join(self.fusion_slots)}, in that order)")
            return None, pred
        return arrays or None, pred

    def predict_one(self, item: SampleInput, top_k: int = 5, name: str | Sequence[str | None] | None = None,
                    truth: tuple[float, float] | None = None) -> Prediction:
        """One image (or a list of views of one sample), decoded and run in the calling thread (the HTTP server's path)."""
        _check_positive("top_k", top_k)
        return self._run([self._prepare(item, truth, name)], top_k)[0]

    def _finish(self, pred: Prediction, probs: np.ndarray, top_k: int, point: tuple | None = None,
                regressed: np.ndarray | None = None, ood_score: float | None = None) -> Prediction:
        if not np.isfinite(probs).all():
            pred.error = (f"{pred.source}: the model gave non-finite probabilities (a corrupted model file?); "
                          "no prediction")
            return pred
        order = np.argsort(-probs)[:top_k]
        pred.top = [CellPrediction(cell=self.classes[i]["cell"], place=self.classes[i]["place"], probability=float(probs[i]),
                                   lat=float(self.class_lat[i]), lon=float(self.class_lon[i])) for i in order]
        best = pred.top[0]
        pred.lat, pred.lon, pred.confidence, pred.place, pred.point = best.lat, best.lon, best.probability, best.place, "cell"
        if regressed is not None and np.isfinite(regressed).all():  # the head's own answer point (offset / coordinates)
            from ..geo import place_name

            pred.lat, pred.lon, pred.point = float(regressed[0]), float(regressed[1]), "regressed"
            pred.place = place_name(pred.lat, pred.lon)
        if point is not None and point[2] >= 0:
            pred.lat, pred.lon, pred.point = float(point[0]), float(point[1]), "refined"
            if self.gallery.places is not None:
                pred.place = str(self.gallery.places[point[2]])
        if pred.true_lat is not None:
            pred.error_km = float(haversine_km(pred.true_lat, pred.true_lon, pred.lat, pred.lon))
        self.confidence.annotate(pred, probs, ood_score)
        return pred

    # the registered combiner (geolocate.tasks.combine) fusing the views of one sample; features are averaged
    view_combiner = "mean_prob"
    # test-time augmentation (geolocate.tta): each image becomes the views its domain allows, fused like a sample
    tta = False

    def _tta_transforms(self):
        from ..tta import domain_of, tta_transforms

        if getattr(self, "_tta", None) is None:
            self._tta = tta_transforms(domain_of(((self.info.get("meta") or {}).get("sources") or {}).keys()))
        return self._tta

    @property
    def _wants_features(self) -> bool:
        """Whether the answer reads the features (refinement, feature reranking, the OOD score) and the engine has them."""
        return (self.gallery is not None or self.confidence.needs_features) and getattr(self.engine, "has_features", False)

    def _forward(self, arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(probabilities (N, C), features (N, F) when refinement or the OOD score use them, else None, the head's
        point (N, 2) when it predicts one, else None) of N arrays."""
        wants = self._wants_features
        if hasattr(self.engine, "run") and (wants or getattr(self.engine, "has_point", False)):
            out = self.engine.run(np.stack(arrays))
            return out["probabilities"], out.get("features") if wants else None, out.get("point")
        return self.probabilities(np.stack(arrays)), None, None

    def _evidence(self, buf: list[tuple]) -> tuple[list[int], np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """Run the samples of ``buf`` that decoded: (their indices, probabilities (n, C), features (n, F) or None,
        head points (n, 2) or None).

        A multi-view sample's views are fused into one row (``view_combiner``, mean features, spherical mean of the
        points). An inference failure sets that sample's ``error``; one bad sample never sinks the others (they
        are rerun one by one).
        """
        idx = [i for i, (a, _) in enumerate(buf) if a is not None]
        if not idx:
            return [], None, None, None
        if self.fusion_slots and any(isinstance(buf[i][0], ViewArrays) for i in idx):
            try:
                return (idx, *self._fused_evidence([buf[i][0] for i in idx]))
            except Exception as e:  # noqa: BLE001 - as below: one by one, each failure its sample's error
                if len(idx) > 1:
                    return self._one_by_one(buf, idx)
                buf[idx[0]][1].error = f"{buf[idx[0]][1].source}: inference failed ({one_line(e)})"
                return [], None, None, None
        groups = [[buf[i][0]] if isinstance(buf[i][0], np.ndarray) else list(buf[i][0]) for i in idx]
        try:
            probs, feats, points = self._forward([v for g in groups for v in g])
        except Exception as e:  # noqa: BLE001 - one bad input must not sink the batch: run them one by one
            if len(idx) > 1:
                return self._one_by_one(buf, idx)
            buf[idx[0]][1].error = f"{buf[idx[0]][1].source}: inference failed ({one_line(e)})"
            return [], None, None, None
        return (idx, *self._combine_runs([len(g) for g in groups], probs, feats, points))

    def _combine_runs(self, counts: list[int], probs: np.ndarray, feats: np.ndarray | None,
                      points: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Consecutive runs of ``counts`` rows (a sample's views, or its test-time views) as one row each: the
        probabilities by ``view_combiner``, mean features, spherical mean of the points."""
        if all(c == 1 for c in counts):
            return probs, feats, points
        from ..tasks.combine import combine, mean_features, mean_points

        bounds = np.cumsum([0] + list(counts))
        spans = list(zip(bounds[:-1], bounds[1:]))
        return (np.stack([combine(self.view_combiner, probs[s:e]) for s, e in spans]),
                None if feats is None else np.stack([mean_features(feats[s:e]) for s, e in spans]),
                None if points is None else np.stack([mean_points(points[s:e]) for s, e in spans]))

    def _one_by_one(self, buf: list[tuple], idx: list[int]):
        """:meth:`_evidence` of each sample alone (after a batch failed): the failures become their samples' errors."""
        parts = [(i, self._evidence([buf[i]])) for i in idx]
        ok = [(i, r) for i, r in parts if r[0]]
        if not ok:
            return [], None, None, None
        cat = lambda k: None if ok[0][1][k] is None else np.concatenate([r[k] for _, r in ok])  # noqa: E731
        return [i for i, _ in ok], cat(1), cat(2), cat(3)

    def _fused_evidence(self, samples: list) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """A fused model's (probabilities, features, points) of samples (single arrays, a single image's TTA views,
        or :class:`ViewArrays`): every array through the backbone once, each sample's views placed in their slots
        (the order they were given) and fused by the model's own fusion, then its head. With TTA, the sample is
        fused once per test-time transform (transform ``t`` of every view in its slot) and those answers are
        combined like the views of a plain model's sample (:meth:`_combine_runs`)."""
        def layout(x) -> tuple[list[int], list[list[np.ndarray]]]:  # (slots, each view's arrays: one per transform)
            if isinstance(x, ViewArrays):
                return x.slots, x.per_view
            return [0], [[x] if isinstance(x, np.ndarray) else list(x)]  # one image (a list: its TTA views)

        layouts = [layout(x) for x in samples]
        flat, where = [], []  # every array once; where[j][v][t]: the row of sample j's view v under transform t
        for _, per_view in layouts:
            w = []
            for arrs in per_view:
                w.append(list(range(len(flat), len(flat) + len(arrs))))
                flat.extend(arrs)
            where.append(w)
        raw = self.engine.run(np.stack(flat))["view_features"]
        slots = len(self.fusion_slots)
        runs = [max(len(a) for a in per_view) for _, per_view in layouts]  # fused rows per sample: one per transform
        rows = [(j, t) for j, n in enumerate(runs) for t in range(n)]
        vf = np.zeros((len(rows), slots, raw.shape[1]), np.float32)
        mask = np.zeros((len(rows), slots), bool)
        for r, (j, t) in enumerate(rows):
            for slot, w in zip(layouts[j][0], where[j]):
                vf[r, slot], mask[r, slot] = raw[w[min(t, len(w) - 1)]], True
        fused = self.engine.run_views(vf, mask)
        return self._combine_runs(runs, fused["probabilities"], fused.get("features") if self._wants_features else None,
                                  fused.get("point"))

    def _answer(self, preds: list[Prediction], probs: np.ndarray, feats: np.ndarray | None, top_k: int,
                regressed: np.ndarray | None = None) -> list[Prediction]:
        """Fill each Prediction from its row of probabilities (features: the refined answer point and the OOD score;
        ``regressed``: the head's own point)."""
        if regressed is not None and not (self.info.get("meta") or {}).get("use_head_point", True):
            regressed = None  # the head's regressed point lost to the top cell's anchor on validation
        before = probs
        probs = self._rerank(probs, feats)
        if regressed is not None:  # the head regressed its top cell's point: where reranking changed the top cell, no point
            changed = np.isfinite(before).all(1) & (probs.argmax(1) != before.argmax(1))
            regressed = np.where(changed[:, None], np.nan, regressed)
        points = self._refine(feats, probs) if feats is not None and self.gallery is not None and self.refine_params else None
        ood = self.confidence.ood_scores(feats)
        return [self._finish(p, probs[j], top_k, None if points is None else points[j],
                             None if regressed is None else regressed[j], None if ood is None else float(ood[j]))
                for j, p in enumerate(preds)]

    def _run(self, buf: list[tuple], top_k: int) -> list[Prediction]:
        idx, probs, feats, points = self._evidence(buf)
        if idx:
            self._answer([buf[i][1] for i in idx], probs, feats, top_k, points)
        return [pred for _, pred in buf]


    def _refine(self, feats: np.ndarray, probs: np.ndarray) -> list[tuple[float, float, int]]:
        from ..tasks.refine import refine

        safe = np.where(np.isfinite(probs), probs, 0.0)
        la, lo, idx = refine(self.gallery, np.nan_to_num(feats), safe, self.refine_params, self.class_lat, self.class_lon)
        return list(zip(la.tolist(), lo.tolist(), idx.tolist()))

    def answer_outputs(self, probs: np.ndarray, features: np.ndarray | None = None, points: np.ndarray | None = None,
                       truths: Sequence[tuple[float, float] | None] | None = None, top_k: int = 5,
                       names: Sequence[str] | None = None) -> list[Prediction]:
        """Predictions from model outputs computed elsewhere (a benchmark that embeds shifted images itself, say):
        the head's calibrated probabilities (N, C), the features it read (N, F) and its own points (N, 2), through
        exactly the decode-time steps :meth:`predict` applies (reranking, refinement, confidence, place names)."""
        _check_positive("top_k", top_k)
        probs = np.asarray(probs, np.float64)
        preds = [Prediction(source=names[i] if names else f"row {i}") for i in range(len(probs))]
        for p, t in zip(preds, truths if truths is not None else itertools.repeat(None)):
            if t is not None:
                p.true_lat, p.true_lon = t
        return self._answer(preds, probs, None if features is None else np.asarray(features, np.float32), top_k,
                            None if points is None else np.asarray(points, np.float64))

    def predict_iter(self, images: Iterable[SampleInput], top_k: int = 5, batch_size: int = 32,
                     truths: Sequence[tuple[float, float] | None] | None = None) -> Iterator[Prediction]:
        """Stream predictions in input order (an input that is a list of images is one multi-view sample).

        Each of ``self.workers`` threads decodes a whole batch and runs it through the engine (ONNX Runtime
        sessions run concurrently; PyTorch serialises its forwards), at most ``workers + 1`` batches in
        flight, so memory stays flat for any number of inputs.
        """
        _check_positive("top_k", top_k)
        _check_positive("batch_size", batch_size)
        items = iter(images)
        pairs = zip(items, truths if truths is not None else itertools.repeat(None))

        def batches():
            while chunk := list(itertools.islice(pairs, batch_size)):
                yield chunk

        def work(chunk):
            return self._run([self._prepare(item, truth) for item, truth in chunk], top_k)

        for preds in ordered_map(work, batches(), self.workers):
            yield from preds

    def predict(self, images: SampleInput | Sequence[SampleInput], top_k: int = 5, batch_size: int = 32,
                truths: Sequence[tuple[float, float] | None] | None = None) -> list[Prediction]:
        """One Prediction per input, in order; an input that cannot be used has ``error`` set instead of raising.

        ``predict([[n, e, s, w], img5])``: a list entry that is itself a list is one sample seen from several views;
        its views' probabilities are fused (``view_combiner``), views that do not decode are left out and named in
        its ``dropped``.
        """
        if images is None:
            raise ValueError("images is None: give a path, bytes, a PIL image or a list of them")
        if isinstance(images, (str, Path, bytes, bytearray, Image.Image, Mapping)):
            images = [images]
        return list(self.predict_iter(images, top_k=top_k, batch_size=batch_size, truths=truths))

    # ---- sequences ------------------------------------------------------------
    def predict_sequences_iter(self, sequences: Mapping[str, Sequence[SampleInput]] | Iterable[tuple], top_k: int = 5,
                               batch_size: int = 32, combiner: str = "sum_logprob",
                               combiner_params: Mapping | None = None) -> Iterator[SequencePrediction]:
        """One :class:`SequencePrediction` per sequence, in order: each frame's prediction and one answer for all.

        ``sequences``: ``{id: frames}``, or ``(id, frames)`` / ``(id, frames, truths)`` tuples where ``truths`` gives
        each frame's known (lat, lon) or None (else the frame's EXIF GPS is used).

        The frames' probabilities are combined by the registered ``combiner`` (``geolocate.tasks.combine``; default
        ``sum_logprob``: the cell the frames agree on) and their features averaged for the refinement step.
        Frames that cannot be used are reported in their own Prediction and left out of the sequence's answer.
        """
        from ..tasks.combine import combine, get_combiner, mean_features, mean_points

        _check_positive("top_k", top_k)
        _check_positive("batch_size", batch_size)
        get_combiner(combiner)
        params = dict(combiner_params or {})
        pairs = sequences.items() if isinstance(sequences, Mapping) else sequences

        def work(entry) -> SequencePrediction:
            sid, frames, truths = (*entry, None) if len(entry) == 2 else entry
            frames = list(frames)
            truths = list(truths) if truths is not None else [None] * len(frames)
            if len(truths) != len(frames):
                raise ValueError(f"sequence {sid}: {len(truths)} truths for {len(frames)} frames")
            preds, rows_p, rows_f, rows_pt = [], [], [], []
            for s in range(0, len(frames), batch_size):
                buf = [self._prepare(f, t) for f, t in zip(frames[s:s + batch_size], truths[s:s + batch_size])]
                idx, probs, feats, points = self._evidence(buf)
                if idx:
                    self._answer([buf[i][1] for i in idx], probs, feats, top_k, points)
                    ok = [j for j, i in enumerate(idx) if buf[i][1].error is None]
                    rows_p.append(probs[ok])
                    if feats is not None:
                        rows_f.append(feats[ok])
                    if points is not None:
                        rows_pt.append(points[ok])
                preds.extend(p for _, p in buf)
            seq = Prediction(source=str(sid), views=[p.source for p in preds if p.error is None],
                             dropped=[p.error for p in preds if p.error is not None])
            used = np.concatenate(rows_p) if rows_p else np.zeros((0, len(self.classes)))
            if len(used) == 0:
                seq.error = f"sequence {sid}: none of its {len(frames)} frames can be used"
                return SequencePrediction(str(sid), seq, preds, combiner, [None] * len(preds))
            p = combine(combiner, used, **params)[None]
            f = mean_features(np.concatenate(rows_f))[None] if rows_f else None
            pt = mean_points(np.concatenate(rows_pt))[None] if rows_pt else None
            self._answer([seq], p, f, top_k, pt)
            errs = [None if (q.true_lat is None or seq.error) else float(haversine_km(q.true_lat, q.true_lon, seq.lat, seq.lon))
                    for q in preds]
            return SequencePrediction(str(sid), seq, preds, combiner, errs)

        yield from ordered_map(work, pairs, self.workers)

    def predict_sequences(self, sequences, top_k: int = 5, batch_size: int = 32, combiner: str = "sum_logprob",
                          combiner_params: Mapping | None = None) -> list[SequencePrediction]:
        """``predict_sequences({"drive-1": [f1, f2, ...], ...})``: see :meth:`predict_sequences_iter`."""
        return list(self.predict_sequences_iter(sequences, top_k, batch_size, combiner, combiner_params))


class ViewArrays(list):
    """The decoded views of one multi-view sample (TTA's views of each view included), with ``slots`` (the place
    of each decoded view among the sample's given views), ``per_view`` (each decoded view's arrays: itself, then
    TTA's extra views of it) and ``given`` (how many views the sample had)."""
    slots: list[int]
    per_view: list[list[np.ndarray]]
    given: int


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _cached_onnx_engine(model_path: Path, onnx_path: Path, threads: int):
    """The ONNX engine of ``onnx_path`` if it was exported from exactly this model file, else None (no torch)."""
    sha = file_sha256(model_path)
    verify_sidecar(model_path, sha)  # a model that does not match its promotion record is refused, whatever engine
    if not onnx_path.is_file():
        return None
    from .engines import OnnxEngine

    try:
        eng = OnnxEngine(onnx_path, threads)
    except ValueError:
        return None  # unreadable or partial: rebuilt by the caller
    if eng.info is None or not eng.has_features or eng.metadata.get("source_sha256") != sha:
        return None  # another model's, or an export from before the features output: rebuilt by the caller
    return eng
