"""Torch module -> ONNX bytes -> ONNX Runtime session: the one place both are done.

Used by the embedding cache (frozen backbones run ~5x faster under ONNX
Runtime on CPU) and by the serving exports. A backbone's export is cached on
disk, keyed by its weights, so extraction builds it once, not on every call.
"""
from __future__ import annotations

import functools
import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..io import atomic_write
from ..runtime import ort_session

OPSET = 17


def to_onnx_bytes(module: nn.Module, example, input_name, output_names: list[str]) -> bytes:
    """Export ``module`` (eval mode) with a dynamic batch axis on every input and output; ``example`` and
    ``input_name`` may be tuples (a module of several inputs)."""
    examples = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    inputs = list(input_name) if isinstance(input_name, (tuple, list)) else [input_name]
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), examples, buf, input_names=inputs, output_names=list(output_names),
            dynamic_axes={**{n: {0: "batch"} for n in inputs}, **{n: {0: "batch"} for n in output_names}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    return buf.getvalue()


def weights_digest(module: nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, shapes, bytes): what its export depends on."""
    h = hashlib.sha256(f"torch {torch.__version__} opset {OPSET}".encode())
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def backbone_onnx(backbone: nn.Module, cache_dir: str | Path | None = None) -> bytes | Path:
    """The backbone as ONNX (``image`` -> ``features``): a cached file under ``cache_dir`` when given."""
    size = backbone.preprocess.size
    if cache_dir is None:
        return to_onnx_bytes(backbone, torch.zeros(2, 3, size, size), "image", ["features"])
    path = Path(cache_dir) / f"{backbone.cache_name}-{weights_digest(backbone)[:16]}.onnx"
    if not path.is_file():
        data = to_onnx_bytes(backbone, torch.zeros(2, 3, size, size), "image", ["features"])
        atomic_write(path, lambda p: p.write_bytes(data), suffix=".onnx")
    return path


@functools.lru_cache(maxsize=4)
def _cached_session(path: str, mtime_ns: int, threads: int | None):
    """One ONNX Runtime session per cached export file (building one costs ~0.4 s: more than 50 images' work)."""
    return ort_session(path, threads)


class OrtFeatures:
    """A backbone run by ONNX Runtime: ``features(x: ndarray (B,3,S,S)) -> ndarray (B,F)``.

    One session, safe to call from several worker threads at once (each call on its own thread); with a
    ``cache_dir`` the session of its cached export is reused by every later extraction in the process.
    """

    def __init__(self, backbone: nn.Module, cache_dir: str | Path | None = None, threads: int | None = 1):
        src = backbone_onnx(backbone, cache_dir)
        self.session = ort_session(src, threads) if isinstance(src, bytes) else _cached_session(str(src), src.stat().st_mtime_ns, threads)
        self.num_features = backbone.num_features
        self.preprocess = backbone.preprocess

    def features(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["features"], {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.features(x.numpy() if isinstance(x, torch.Tensor) else x))
