"""Serving: the predictor (PyTorch or ONNX Runtime engine), ONNX/TorchScript exports, snapshots, the HTTP server."""
from .predictor import CellPrediction, Geolocator, Prediction

__all__ = ["CellPrediction", "Geolocator", "Prediction"]
