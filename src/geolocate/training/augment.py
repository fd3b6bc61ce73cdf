"""Image batches for fine-tuning: decode, backbone preprocessing, random flips."""
from __future__ import annotations

import numpy as np
import torch

from ..io import load_image


def image_batch(preprocess, paths: list[str], augment: bool) -> torch.Tensor:
    x = preprocess([load_image(p, draft=preprocess.size * 2) for p in paths])
    if augment:
        flip = torch.from_numpy(np.random.rand(len(paths)) < 0.5)
        x[flip] = x[flip].flip(-1)
    return x
