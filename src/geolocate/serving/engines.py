"""Inference engines behind :class:`Geolocator`: ``probabilities(batch) -> (B, C) ndarray``.

- ``OnnxEngine``: ONNX Runtime over an exported file (the default; no torch import at all).
  One session, one intra-op thread per call, called concurrently by the predictor's workers.
- ``TorchEngine``: PyTorch eager, one forward at a time under a lock, with the thread count set
  explicitly for each call (the default OpenMP pool spins and fights the decode workers).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation.calibration import softmax
from ..runtime import ort_session, session_metadata


class OnnxEngine:
    """ONNX Runtime (CPUExecutionProvider) over an exported file or its bytes; safe to call from many threads."""

    name = "onnx"

    def __init__(self, source: str | Path | bytes, threads: int | None = 1):
        self.path = None if isinstance(source, (bytes, bytearray)) else Path(source)
        try:
            self.session = ort_session(source, threads)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise ValueError(f"{self.path or '<onnx bytes>'}: not a loadable ONNX model ({type(e).__name__}: {e})") from None
        self.metadata: dict[str, Any] = session_metadata(self.session)
        try:
            self.info = json.loads(self.metadata["geolocate_info"]) if "geolocate_info" in self.metadata else None
        except ValueError:
            self.info = None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_name = "probabilities" if "probabilities" in self.output_names else self.output_names[-1]
        self._softmax = self.output_name != "probabilities"
        self.has_features = "features" in self.output_names
        self.has_point = "point" in self.output_names

    def run(self, batch) -> dict[str, np.ndarray]:
        """{"probabilities": (B, C)[, "features": (B, F)][, "point": (B, 2) lat/lon]} for a preprocessed batch."""
        x = np.ascontiguousarray(batch.numpy() if hasattr(batch, "numpy") else batch, dtype=np.float32)
        extra = [n for n in ("features", "point") if n in self.output_names]
        outs = self.session.run([self.output_name, *extra], {self.input_name: x})
        out = {"probabilities": softmax(outs[0]).astype(np.float32) if self._softmax else outs[0]}
        out.update(zip(extra, outs[1:]))
        return out

    def probabilities(self, batch) -> np.ndarray:
        return self.run(batch)["probabilities"]


class TorchEngine:
    """PyTorch eager inference; one forward at a time (the model is shared by all threads)."""

    name = "torch"

    def __init__(self, model, threads: int | None = None):
        from ..runtime import cpu_count

        self.model = model.eval()
        self.threads = threads or cpu_count()
        self._lock = threading.Lock()
        self.has_point = bool(model.head.has_point)

    has_features = True

    def run(self, batch) -> dict[str, np.ndarray]:
        import torch

        x = torch.as_tensor(batch, dtype=torch.float32)
        with self._lock, torch.inference_mode():
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                feats = self.model.head_input(self.model.backbone(x))
                dec = self.model.head.decode(self.model.head(feats))
                out = {"probabilities": dec.probabilities.numpy(), "features": feats.numpy()}
                if dec.point is not None:
                    out["point"] = dec.point.double().numpy()
                return out
            finally:
                torch.set_num_threads(before)

    def probabilities(self, batch) -> np.ndarray:
        return self.run(batch)["probabilities"]
