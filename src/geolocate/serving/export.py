"""ONNX and TorchScript exports of a model file, and the ONNX Runtime engine.

Both exports wrap the model so that it maps a preprocessed float batch
``image`` (B, 3, S, S) to ``logits`` and ``probabilities`` (B, C) and ``features`` (B, F) — the same
softmax that :meth:`Geolocator.probabilities` returns — with a dynamic batch
axis. Each file carries the model's info (labels, preprocessing, run metadata)
and the sha256 of the ``.pt`` it came from, so a stale export next to a newer
model is detected and rebuilt, and an ``.onnx`` file alone is enough to serve.
"""
from __future__ import annotations

import base64

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..io import atomic_write, file_sha256  # noqa: F401 - file_sha256 re-exported
from ..models.onnx import to_onnx_bytes
from .engines import OnnxEngine, TorchEngine  # noqa: F401 - re-exported: engines used to live here

ONNX_FORMAT = "geolocate-onnx/2"  # /2: a third output, the backbone features (for refinement)
TORCHSCRIPT_FORMAT = "geolocate-torchscript/1"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities", "features")  # of a linear head; output_names(model) for any head
PARITY_TOL = 1e-4


class ExportError(RuntimeError):
    """An export that cannot be written or does not reproduce the PyTorch model."""


def output_names(model: nn.Module) -> list[str]:
    """The exports' outputs: ``logits`` (calibrated fine log-probabilities), ``probabilities``, the head's own
    (``point`` for heads that predict a location), ``features`` (what the head reads); a model with a view fusion
    adds ``view_features`` (the backbone's, per image: what the fusion reads)."""
    return ["logits", "probabilities", *model.head.output_names, "features",
            *(["view_features"] if getattr(model, "fusion", None) is not None else [])]


class ProbabilityModel(nn.Module):
    """GeoModel -> the head's decode (:meth:`Head.export_outputs`) + pooled backbone features; what both exports contain."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.model.backbone(x)
        feats = self.model.head_input(raw)
        extra = (raw,) if self.model.fusion is not None else ()
        return (*self.model.head.export_outputs(self.model.head(feats)), feats, *extra)


class FusionHeadModel(nn.Module):
    """A fused model's fusion + head: (view features (B, V, F), view mask (B, V), 1 = present) -> the same outputs
    as :class:`ProbabilityModel` (``features`` = the fused features). The second graph of a fused model's ONNX
    export: the predictor runs every view through the main graph, then fuses a sample's views here."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, view_features: torch.Tensor, view_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fused = self.model.fusion(view_features, view_mask > 0.5)
        return (*self.model.head.export_outputs(self.model.head(fused)), fused)


FUSION_HEAD_PROP = "geolocate_fusion_head"  # metadata property: the fusion-head graph, base64 ONNX
FUSION_INPUTS = ("view_features", "view_mask")


def fusion_head_onnx(model: nn.Module) -> bytes:
    """The fusion + head graph of a fused model (dynamic batch; the views are the model's slots)."""
    from ..models.onnx import to_onnx_bytes

    fusion = model.fusion
    example = (torch.zeros(2, len(fusion.views), fusion.in_features), torch.ones(2, len(fusion.views)))
    return to_onnx_bytes(FusionHeadModel(model.eval()), example, FUSION_INPUTS, output_names(model)[:-1])


def _example(info: dict, batch: int = 2) -> torch.Tensor:
    size = int(info["preprocess"]["size"])
    return torch.zeros(batch, 3, size, size, dtype=torch.float32)


def onnx_bytes(model: nn.Module, info: dict, source_sha256: str | None = None) -> bytes:
    """Serialise ``model`` to ONNX (opset 17, dynamic batch) with geolocate metadata."""
    import onnx

    data = to_onnx_bytes(ProbabilityModel(model.eval()), _example(info), INPUT_NAME, output_names(model))
    proto = onnx.load_from_string(data)
    props = {"geolocate_format": ONNX_FORMAT, "geolocate_info": json.dumps(info, separators=(",", ":"))}
    if getattr(model, "fusion", None) is not None:  # one file: the fusion-head graph travels in the metadata
        props[FUSION_HEAD_PROP] = base64.b64encode(fusion_head_onnx(model)).decode("ascii")
    if source_sha256:
        props["source_sha256"] = source_sha256
    onnx.helper.set_model_props(proto, props)
    proto.producer_name = "geolocate"
    return proto.SerializeToString()


def export_onnx(model_path: str | Path, out: str | Path | None = None, check: bool = True,
                check_images: list | None = None) -> tuple[Path, float | None]:
    """Write ``out`` (default: the model path with ``.onnx``) atomically; return (path, max |Δp| on a check batch).

    The check batch is ``check_images`` (paths, preprocessed like the predictor does) or synthetic images."""
    from ..models import load_model

    model_path = Path(model_path)
    out = Path(out) if out is not None else model_path.with_suffix(".onnx")
    model, info = load_model(model_path)
    data, _, diff = checked_onnx(model, info, model_path, check, check_images)
    atomic_write(out, lambda p: p.write_bytes(data), suffix=".onnx")
    return out, diff


def checked_onnx(model: nn.Module, info: dict, model_path: Path, check: bool = True, check_images: list | None = None,
                 threads: int | None = 1) -> tuple[bytes, OnnxEngine | None, float | None]:
    """(ONNX bytes of ``model`` pinned to ``model_path``'s sha256, their engine, max |Δp| against PyTorch).

    With ``check``, raises :class:`ExportError` when ONNX Runtime does not reproduce PyTorch within ``PARITY_TOL``."""
    data = onnx_bytes(model, info, file_sha256(model_path))
    if not check:
        return data, None, None
    engine = OnnxEngine(data, threads)
    batch = check_batch(info, images=check_images, preprocess=model.preprocess)
    diff = parity(model, engine.probabilities, batch)
    if diff > PARITY_TOL:
        raise ExportError(f"ONNX export of {model_path} differs from PyTorch by {diff:.2e} (> {PARITY_TOL:g}); not written")
    km = point_parity(model, lambda x: engine.run(x)["point"], batch)
    if km > POINT_TOL_KM:
        raise ExportError(f"ONNX export of {model_path}: its answer point differs from PyTorch by {km:.3f} km (> {POINT_TOL_KM:g}); not written")
    if getattr(model, "fusion", None) is not None:
        fdiff = fusion_parity(model, engine)
        if fdiff > PARITY_TOL:
            raise ExportError(f"ONNX export of {model_path}: its view fusion differs from PyTorch by {fdiff:.2e} "
                              f"(> {PARITY_TOL:g}); not written")
        diff = max(diff, fdiff)
    return data, engine, diff


@torch.inference_mode()
def fusion_parity(model: nn.Module, engine, n: int = 5, seed: int = 0) -> float:
    """max |p_torch - p_onnx| of the fusion-head graph on random view features with every kind of view mask."""
    fusion = model.fusion
    g = torch.Generator().manual_seed(seed)
    v = len(fusion.views)
    x = torch.randn(n, v, fusion.in_features, generator=g)
    mask = torch.rand(n, v, generator=g) > 0.4
    mask[:, 0] |= ~mask.any(1)  # never a sample with no view
    mask[0] = True
    ref = model.eval().head.decode(model.head(fusion(x, mask))).probabilities.numpy()
    other = engine.run_views(x.numpy(), mask.numpy())["probabilities"]
    return float(np.abs(ref - other).max())


def export_torchscript(model_path: str | Path, out: str | Path | None = None, check: bool = True,
                       check_images: list | None = None) -> tuple[Path, float | None]:
    """Trace to TorchScript (``model.torchscript.pt`` by default); the info travels as an extra file."""
    from ..models import load_model

    model_path = Path(model_path)
    out = Path(out) if out is not None else model_path.with_suffix(".torchscript.pt")
    model, info = load_model(model_path)
    wrapper = ProbabilityModel(model).eval()
    extra = {"geolocate_info.json": json.dumps(info), "geolocate_format": TORCHSCRIPT_FORMAT,
             "source_sha256": file_sha256(model_path)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates TorchScript in favour of torch.export; it still works
        traced = torch.jit.trace(wrapper, (_example(info),), check_trace=False)
        traced = torch.jit.freeze(traced.eval())
        atomic_write(out, lambda p: torch.jit.save(traced, str(p), _extra_files=extra), suffix=".pt")
    diff = None
    if check:
        loaded = load_torchscript(out)[0]
        diff = parity(model, lambda x: loaded(x)[1].numpy(), check_batch(info, images=check_images, preprocess=model.preprocess))
        if diff > PARITY_TOL:
            out.unlink(missing_ok=True)
            raise ExportError(f"TorchScript export differs from PyTorch by {diff:.2e} (> {PARITY_TOL:g}); removed")
    return out, diff


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """(module returning (logits, probabilities, features), info dict)."""
    extra = {"geolocate_info.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; it still works
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), json.loads(extra["geolocate_info.json"] or "{}")


def check_batch(info: dict, n: int = 4, seed: int = 0, images: list | None = None, preprocess=None) -> torch.Tensor:
    """A preprocessed batch: ``images`` (paths or bytes) when given, else deterministic smooth random images."""
    if images:
        from ..preprocess import Preprocess

        return torch.from_numpy((preprocess or Preprocess.from_dict(info["preprocess"])).batch(images))
    g = torch.Generator().manual_seed(seed)
    size = int(info["preprocess"]["size"])
    low = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).contiguous()


@torch.inference_mode()
def parity(model: nn.Module, run, batch: torch.Tensor) -> float:
    """max |p_torch - p_other| over a batch (``run(batch) -> (B, C) probabilities``), through the head's decode."""
    with torch.no_grad():
        ref = model.eval().head.decode(model(batch)).probabilities.numpy()
    other = np.asarray(run(batch))
    if other.shape != ref.shape:
        raise ExportError(f"export output shape {other.shape} differs from PyTorch {ref.shape}")
    return float(np.abs(ref - other).max())


def point_parity(model: nn.Module, run, batch: torch.Tensor) -> float:
    """max great-circle km between the PyTorch and the export's answer points (0 for heads without one)."""
    if not model.head.has_point:
        return 0.0
    from ..geo import haversine_km

    with torch.no_grad():
        ref = model.eval().head.decode(model(batch)).point.double().numpy()
    other = np.asarray(run(batch), dtype=np.float64)
    if other.shape != ref.shape:
        raise ExportError(f"export point shape {other.shape} differs from PyTorch {ref.shape}")
    return float(haversine_km(ref[:, 0], ref[:, 1], other[:, 0], other[:, 1]).max())


POINT_TOL_KM = 0.05


def read_onnx_metadata(source: str | Path | bytes) -> dict[str, str]:
    """The metadata_props of an ONNX file (empty dict if it has none)."""
    import onnx

    proto = onnx.load_from_string(source) if isinstance(source, (bytes, bytearray)) else onnx.load(str(source), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def build_onnx_engine(model_path: Path, onnx_path: Path, threads: int | None = 1, model=None, info=None) -> OnnxEngine:
    """Export ``model_path`` to ``onnx_path`` (atomically), check parity with PyTorch, return its engine.

    Raises :class:`ExportError` when ONNX Runtime does not reproduce PyTorch within ``PARITY_TOL``.
    A directory that cannot be written (a read-only snapshot, say) gets an in-memory export instead.
    """
    from ..models import load_model

    if model is None:
        model, info = load_model(model_path)
    data, engine, _ = checked_onnx(model, info, model_path, threads=threads)
    try:
        atomic_write(onnx_path, lambda p: p.write_bytes(data), suffix=".onnx")
    except OSError:
        return engine
    engine.path = onnx_path  # the session already built from these bytes serves: no second load from the file
    return engine


# ---- int8 ----------------------------------------------------------------------------------
INT8_FORMAT = "geolocate-onnx-int8/1"
INT8_MIN_TOP1 = 0.90    # share of held-out images whose top-1 cell the int8 model keeps
INT8_MIN_COSINE = 0.97  # mean cosine between int8 and fp32 logits on those images


def int8_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".int8.onnx")


def export_onnx_int8(model_path: str | Path, calibration: list, holdout: list, out: str | Path | None = None,
                     min_top1: float = INT8_MIN_TOP1, min_cosine: float = INT8_MIN_COSINE) -> tuple[Path, dict]:
    """Static int8 quantisation (QDQ, per-channel weights, min-max activations from ``calibration`` images) of the
    ONNX export, written only if it agrees with fp32 on the ``holdout`` images: top-1 agreement >= ``min_top1`` and
    mean cosine of the centred logits >= ``min_cosine``. Returns (path, the measured gate). Raises :class:`ExportError` otherwise.

    Calibrate on training images and gate on others (the CLI uses the index's train and val splits).
    """
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..models import load_model
    from ..preprocess import Preprocess

    model_path = Path(model_path)
    out = Path(out) if out is not None else int8_path(model_path)
    if not calibration or not holdout:
        raise ExportError("int8 export needs calibration images and held-out images to measure agreement on")
    model, info = load_model(model_path)
    sha = file_sha256(model_path)
    fp32 = onnx_bytes(model, info, sha)
    pp = Preprocess.from_dict(info["preprocess"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([pp.batch(calibration[i:i + 16]) for i in range(0, len(calibration), 16)])

        def get_next(self):
            b = next(self._batches, None)
            return None if b is None else {INPUT_NAME: b}

    with tempfile.TemporaryDirectory(prefix="geolocate-int8-") as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "fp32.onnx").write_bytes(fp32)
        quant_pre_process(str(tmp / "fp32.onnx"), str(tmp / "pre.onnx"), skip_symbolic_shape=True)
        # every quantisable op: Conv alone (fp32 adds/pooling between int8 convs) measured cosine 0.93, all ops 0.98
        quantize_static(str(tmp / "pre.onnx"), str(tmp / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        proto = onnx.load(str(tmp / "int8.onnx"))
    x = pp.batch(holdout)
    ref_logits = OnnxEngine(fp32).session.run(["logits"], {INPUT_NAME: x})[0]
    q = onnx.helper
    props = {"geolocate_format": INT8_FORMAT, "geolocate_info": json.dumps(info, separators=(",", ":")), "source_sha256": sha}
    fusion_head = read_onnx_metadata(fp32).get(FUSION_HEAD_PROP)
    if fusion_head:  # a fused model's fusion + head stay fp32 (a small graph over pooled features)
        props[FUSION_HEAD_PROP] = fusion_head
    q.set_model_props(proto, props)
    data = proto.SerializeToString()
    q_logits = OnnxEngine(data).session.run(["logits"], {INPUT_NAME: x})[0]
    # cosine of the logits about their own mean: the exported logits are log-probabilities, whose common offset
    # (about -log C) would otherwise read ~1.0 whatever the cells' order
    ref_c, q_c = ref_logits - ref_logits.mean(1, keepdims=True), q_logits - q_logits.mean(1, keepdims=True)
    cos = (ref_c * q_c).sum(1) / (np.linalg.norm(ref_c, axis=1) * np.linalg.norm(q_c, axis=1) + 1e-12)
    gate = {"images": int(len(x)), "top1_agreement": float((ref_logits.argmax(1) == q_logits.argmax(1)).mean()),
            "mean_logits_cosine": float(cos.mean()), "min_top1": min_top1, "min_cosine": min_cosine}
    if gate["top1_agreement"] < min_top1 or gate["mean_logits_cosine"] < min_cosine:
        raise ExportError(f"int8 model disagrees with fp32 on {len(x)} held-out images (top-1 agreement "
                          f"{gate['top1_agreement']:.3f} < {min_top1} or logits cosine {gate['mean_logits_cosine']:.3f} < "
                          f"{min_cosine}); not written")
    props["int8_gate"] = json.dumps(gate)
    q.set_model_props(proto, props)
    data = proto.SerializeToString()
    atomic_write(out, lambda p: p.write_bytes(data), suffix=".onnx")
    return out, gate
