"""Image batches for fine-tuning: decode, backbone preprocessing, random flips."""
from __future__ import annotations

import torch



def image_batch(preprocess, paths: list[str], augment: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flips are drawn from ``generator`` (seeded per epoch by the loop), so a resumed run repeats them exactly."""
    x = torch.from_numpy(preprocess.batch(paths))
    if augment:
        flip = torch.rand(len(paths), generator=generator) < 0.5
        x[flip] = x[flip].flip(-1)
    return x
