"""Torch module -> ONNX bytes -> ONNX Runtime session: the one place both are done.

Used by the embedding cache (frozen backbones run ~5x faster under ONNX
Runtime on CPU) and by the serving exports.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 17


def to_onnx_bytes(module: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str]) -> bytes:
    """Export ``module`` (eval mode) with a dynamic batch axis on every input and output."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (example,), buf, input_names=[input_name], output_names=list(output_names),
            dynamic_axes={input_name: {0: "batch"}, **{n: {0: "batch"} for n in output_names}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    return buf.getvalue()


def ort_session(source: str | Path | bytes, threads: int | None = None):
    """A CPU ONNX Runtime session over a file or bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads sleep instead of spinning: on a shared CPU (a server decoding uploads on other
    # threads) spinning took ~35% of the concurrent throughput here, and batch throughput is unchanged.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
    src = bytes(source) if isinstance(source, (bytes, bytearray)) else str(source)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


class OrtFeatures:
    """A backbone run by ONNX Runtime, called like the module: (B, 3, S, S) -> (B, F) tensor."""

    def __init__(self, backbone: nn.Module):
        size = backbone.preprocess.size
        self.session = ort_session(to_onnx_bytes(backbone, torch.zeros(2, 3, size, size), "image", ["features"]))
        self.num_features = backbone.num_features
        self.preprocess = backbone.preprocess

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(["features"], {"image": x.numpy().astype("float32", copy=False)})[0]
        return torch.from_numpy(out)
