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
        # a fused model's export: per-image backbone features + the fusion-head graph (in the metadata)
        self.threads = threads
        self._fusion_head = self.metadata.get("geolocate_fusion_head")
        self.has_views = "view_features" in self.output_names and bool(self._fusion_head)
        self._fusion_session = None
        self._fusion_lock = threading.Lock()

    def run(self, batch) -> dict[str, np.ndarray]:
        """{"probabilities": (B, C)[, "features": (B, F)][, "point": (B, 2) lat/lon][, "view_features": (B, F)]}
        for a preprocessed batch."""
        x = np.ascontiguousarray(batch.numpy() if hasattr(batch, "numpy") else batch, dtype=np.float32)
        extra = [n for n in ("features", "point", "view_features") if n in self.output_names]
        outs = self.session.run([self.output_name, *extra], {self.input_name: x})
        out = {"probabilities": softmax(outs[0]).astype(np.float32) if self._softmax else outs[0]}
        out.update(zip(extra, outs[1:]))
        return out

    def run_views(self, view_features: np.ndarray, view_mask: np.ndarray) -> dict[str, np.ndarray]:
        """A fused model's samples: backbone features of their views in slot order (B, V, F) and which slots are
        present (B, V) -> the same outputs as :meth:`run`, per sample."""
        if not self.has_views:
            raise ValueError(f"{self.path or '<onnx bytes>'}: not a fused model's export (no fusion-head graph)")
        with self._fusion_lock:
            if self._fusion_session is None:
                import base64

                self._fusion_session = ort_session(base64.b64decode(self._fusion_head), self.threads)
        names = [o.name for o in self._fusion_session.get_outputs()]
        want = ["probabilities", *[n for n in ("features", "point") if n in names]]
        outs = self._fusion_session.run(want, {"view_features": np.ascontiguousarray(view_features, dtype=np.float32),
                                               "view_mask": np.asarray(view_mask, dtype=np.float32)})
        return dict(zip(want, outs))

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
        self.has_views = getattr(model, "fusion", None) is not None

    has_features = True

    def run(self, batch) -> dict[str, np.ndarray]:
        import torch

        x = torch.as_tensor(batch, dtype=torch.float32)
        with self._lock, torch.inference_mode():
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                raw = self.model.backbone(x)
                out = self._decode(self.model.head_input(raw))
                if self.has_views:
                    out["view_features"] = raw.numpy()
                return out
            finally:
                torch.set_num_threads(before)

    def _decode(self, feats) -> dict[str, np.ndarray]:
        dec = self.model.head.decode(self.model.head(feats))
        out = {"probabilities": dec.probabilities.numpy(), "features": feats.numpy()}
        if dec.point is not None:
            out["point"] = dec.point.double().numpy()
        return out

    def run_views(self, view_features: np.ndarray, view_mask: np.ndarray) -> dict[str, np.ndarray]:
        """See :meth:`OnnxEngine.run_views`: the model's fusion, then its head."""
        import torch

        if not self.has_views:
            raise ValueError("run_views needs a model trained with a view fusion (model.fusion)")
        with self._lock, torch.inference_mode():
            fused = self.model.fusion(torch.as_tensor(view_features, dtype=torch.float32), torch.as_tensor(view_mask, dtype=torch.bool))
            return self._decode(fused)

    def probabilities(self, batch) -> np.ndarray:
        return self.run(batch)["probabilities"]
