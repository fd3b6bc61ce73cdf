"""Serving: the predictor (and, later, the HTTP server and exports)."""
from .predictor import CellPrediction, Geolocator, Prediction

__all__ = ["CellPrediction", "Geolocator", "Prediction"]
