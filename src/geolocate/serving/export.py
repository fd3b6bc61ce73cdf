"""ONNX and TorchScript exports of a model file, and the ONNX Runtime engine.

Both exports wrap the model so that it maps a preprocessed float batch
``image`` (B, 3, S, S) to ``logits`` and ``probabilities`` (B, C) — the same
softmax that :meth:`Geolocator.probabilities` returns — with a dynamic batch
axis. Each file carries the model's info (labels, preprocessing, run metadata)
and the sha256 of the ``.pt`` it came from, so a stale export next to a newer
model is detected and rebuilt, and an ``.onnx`` file alone is enough to serve.
"""
from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io import atomic_write, file_sha256
from ..models.onnx import ort_session, to_onnx_bytes

ONNX_FORMAT = "geolocate-onnx/1"
TORCHSCRIPT_FORMAT = "geolocate-torchscript/1"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities")
PARITY_TOL = 1e-4


class ExportError(RuntimeError):
    """An export that cannot be written or does not reproduce the PyTorch model."""


class ProbabilityModel(nn.Module):
    """GeoModel -> (logits, softmax probabilities); what both exports contain."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits, dim=1)


def _example(info: dict, batch: int = 2) -> torch.Tensor:
    size = int(info["preprocess"]["size"])
    return torch.zeros(batch, 3, size, size, dtype=torch.float32)


def onnx_bytes(model: nn.Module, info: dict, source_sha256: str | None = None) -> bytes:
    """Serialise ``model`` to ONNX (opset 17, dynamic batch) with geolocate metadata."""
    import onnx

    data = to_onnx_bytes(ProbabilityModel(model.eval()), _example(info), INPUT_NAME, list(OUTPUT_NAMES))
    proto = onnx.load_from_string(data)
    props = {"geolocate_format": ONNX_FORMAT, "geolocate_info": json.dumps(info, separators=(",", ":"))}
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
    data = onnx_bytes(model, info, file_sha256(model_path))
    diff = None
    if check:
        engine = OnnxEngine(data)
        diff = parity(model, engine.probabilities, check_batch(info, images=check_images, preprocess=model.preprocess))
        if diff > PARITY_TOL:
            raise ExportError(f"ONNX export differs from PyTorch by {diff:.2e} (> {PARITY_TOL:g}); not written")
    atomic_write(out, lambda p: p.write_bytes(data), suffix=".onnx")
    return out, diff


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
    """(module returning (logits, probabilities), info dict)."""
    extra = {"geolocate_info.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; it still works
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), json.loads(extra["geolocate_info.json"] or "{}")


def check_batch(info: dict, n: int = 4, seed: int = 0, images: list | None = None, preprocess=None) -> torch.Tensor:
    """A preprocessed batch: ``images`` (paths or bytes) when given, else deterministic smooth random images."""
    if images:
        from ..io import load_image

        if preprocess is None:
            from ..models import Preprocess

            pp = info["preprocess"]
            preprocess = Preprocess(int(pp["size"]), tuple(pp["mean"]), tuple(pp["std"]))
        return torch.from_numpy(np.stack([preprocess.image_to_array(load_image(im, draft=preprocess.size * 2)) for im in images]))
    g = torch.Generator().manual_seed(seed)
    size = int(info["preprocess"]["size"])
    low = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).contiguous()


@torch.inference_mode()
def parity(model: nn.Module, run, batch: torch.Tensor) -> float:
    """max |p_torch - p_other| over a batch; ``run(batch) -> (B, C) probabilities``."""
    ref = torch.softmax(model.eval()(batch), dim=1).numpy()
    other = np.asarray(run(batch))
    if other.shape != ref.shape:
        raise ExportError(f"export output shape {other.shape} differs from PyTorch {ref.shape}")
    return float(np.abs(ref - other).max())


def read_onnx_metadata(source: str | Path | bytes) -> dict[str, str]:
    """The metadata_props of an ONNX file (empty dict if it has none)."""
    import onnx

    proto = onnx.load_from_string(source) if isinstance(source, (bytes, bytearray)) else onnx.load(str(source), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


class TorchEngine:
    """PyTorch eager inference; one forward at a time (the model is shared by all threads)."""

    name = "torch"

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self._lock = threading.Lock()

    def probabilities(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        x = torch.as_tensor(batch, dtype=torch.float32)
        with self._lock, torch.inference_mode():
            return torch.softmax(self.model(x), dim=1).numpy()


class OnnxEngine:
    """ONNX Runtime (CPUExecutionProvider) over an exported file or its bytes."""

    name = "onnx"

    def __init__(self, source: str | Path | bytes, threads: int | None = None):
        self.path = None if isinstance(source, (bytes, bytearray)) else Path(source)
        try:
            self.session = ort_session(source, threads)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise ValueError(f"{self.path or '<onnx bytes>'}: not a loadable ONNX model ({type(e).__name__}: {e})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, Any] = dict(meta)
        self.info = json.loads(meta["geolocate_info"]) if "geolocate_info" in meta else None
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "probabilities" if "probabilities" in outputs else outputs[-1]
        self._softmax = self.output_name != "probabilities"
        self._lock = threading.Lock()

    def probabilities(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        x = batch.numpy() if isinstance(batch, torch.Tensor) else batch
        x = np.ascontiguousarray(x, dtype=np.float32)
        with self._lock:
            out = self.session.run([self.output_name], {self.input_name: x})[0]
        if self._softmax:
            e = np.exp(out - out.max(axis=1, keepdims=True))
            out = e / e.sum(axis=1, keepdims=True)
        return out


def onnx_engine_for(model: nn.Module, info: dict, model_path: Path, onnx_path: Path | None = None,
                    threads: int | None = None) -> OnnxEngine:
    """Use ``onnx_path`` (default ``model.onnx`` beside the model) when it matches the model; (re)build it otherwise.

    A directory that cannot be written (a read-only snapshot, say) gets an in-memory export instead.
    """
    onnx_path = Path(onnx_path) if onnx_path is not None else model_path.with_suffix(".onnx")
    sha = file_sha256(model_path)
    if onnx_path.is_file():
        try:
            if read_onnx_metadata(onnx_path).get("source_sha256") == sha:
                return OnnxEngine(onnx_path, threads)
        except Exception:  # noqa: BLE001 - unreadable/partial file: rebuild below
            pass
    data = onnx_bytes(model, info, sha)
    try:
        atomic_write(onnx_path, lambda p: p.write_bytes(data), suffix=".onnx")
    except OSError:
        return OnnxEngine(data, threads)
    return OnnxEngine(onnx_path, threads)
