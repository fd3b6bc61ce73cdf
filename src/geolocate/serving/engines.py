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

from ..runtime import ort_session, session_metadata


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class OnnxEngine:
    """ONNX Runtime (CPUExecutionProvider) over an exported file or its bytes; safe to call from many threads."""

    name = "onnx"

    def __init__(self, source: str | Path | bytes, threads: int | None = 1, name: str | None = None):
        self.path = None if isinstance(source, (bytes, bytearray)) else Path(source)
        try:
            self.session = ort_session(source, threads)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise ValueError(f"{self.path or '<onnx bytes>'}: not a loadable ONNX model ({type(e).__name__}: {e})") from None
        if name:
            self.name = name
        self.metadata: dict[str, Any] = session_metadata(self.session)
        try:
            self.info = json.loads(self.metadata["geolocate_info"]) if "geolocate_info" in self.metadata else None
        except ValueError:
            self.info = None
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "probabilities" if "probabilities" in outputs else outputs[-1]
        self._softmax = self.output_name != "probabilities"

    def probabilities(self, batch) -> np.ndarray:
        x = batch.numpy() if hasattr(batch, "numpy") else batch
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return softmax(out) if self._softmax else out


class TorchEngine:
    """PyTorch eager inference; one forward at a time (the model is shared by all threads)."""

    name = "torch"

    def __init__(self, model, threads: int | None = None):
        from ..runtime import cpu_count

        self.model = model.eval()
        self.threads = threads or cpu_count()
        self._lock = threading.Lock()

    def probabilities(self, batch) -> np.ndarray:
        import torch

        x = torch.as_tensor(batch, dtype=torch.float32)
        with self._lock, torch.inference_mode():
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                return torch.softmax(self.model(x), dim=1).numpy()
            finally:
                torch.set_num_threads(before)
