"""Metrics and baselines."""
from .baselines import knn_predict, prior_predict
from .metrics import THRESHOLDS_KM, distance_metrics, evaluate, geoscore, topk_accuracy

__all__ = ["knn_predict", "prior_predict", "THRESHOLDS_KM", "distance_metrics", "evaluate", "geoscore", "topk_accuracy"]
