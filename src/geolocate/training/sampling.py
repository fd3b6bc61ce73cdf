"""Hard-negative mining for the frozen phase: draw the training images of the cell pairs the head confuses more often.

After each epoch the head predicts the training split; every off-diagonal entry (true c, predicted c') of that
confusion is a confused pair, and both of its cells' images gain weight: an image of class c is drawn with
probability proportional to ``1 + strength * (confusions involving c) / (images of c)``. ``strength = 0`` is plain
uniform shuffling (a permutation per epoch).
"""
from __future__ import annotations

import numpy as np
import torch


def hard_negative_weights(pred: np.ndarray, labels: np.ndarray, num_classes: int, strength: float) -> np.ndarray:
    """Per-image sampling weights (mean 1) from the head's predictions ``pred`` of the images with ``labels``."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    wrong = pred != labels
    involved = (np.bincount(labels[wrong], minlength=num_classes) + np.bincount(pred[wrong], minlength=num_classes)).astype(np.float64)
    per_class = involved / np.maximum(np.bincount(labels, minlength=num_classes), 1)
    w = 1.0 + strength * per_class[labels]
    return w / w.mean()


def epoch_order(n: int, generator: torch.Generator, weights: np.ndarray | None = None) -> torch.Tensor:
    """One epoch's image order: a permutation, or ``n`` draws with replacement by ``weights``."""
    if weights is None:
        return torch.randperm(n, generator=generator)
    return torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), n, replacement=True, generator=generator)
