"""Training-time augmentation in the pipeline: the run's :class:`~geolocate.augment.Augment`, fine-tuning batches,
and augmented embedding copies of the training split for a frozen backbone. Never used for evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..augment import Augment
from ..progress import console, tagged
from .embeddings import cached_embedding_view, cached_embeddings
from .loop import Split
from .store import FeatureView


def augment_for(cfg, sources: Iterable[str] = ()) -> Augment:
    """The run's augmentation: ``cfg.augment`` in its own domain, or (``auto``) in the domain of the indexed
    ``sources`` (default: ``cfg.source.name``): aerial as soon as one of them is, since street-only ops
    (rotations) would corrupt north-up imagery while aerial ones are safe for photos."""
    from ..sources.base import SOURCE_DOMAINS

    domains = {SOURCE_DOMAINS.get(s, "street") for s in (list(sources) or [cfg.source.name])}
    return Augment.from_config(cfg.augment, "aerial" if "aerial" in domains else "street")


def image_batch(preprocess, paths: list[str], augment: Augment | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fine-tuning batch; with ``augment``, each image's seed is drawn from ``generator`` (seeded per epoch by the
    loop), so a resumed run repeats the augmentation exactly. Without it: exactly the evaluation pixels."""
    if augment is None:
        return torch.from_numpy(preprocess.batch(paths))
    seeds = torch.randint(0, 2**62, (len(paths),), generator=generator).tolist()
    return torch.from_numpy(np.stack([preprocess.load_array(p, transform=augment.seeded(s)) for p, s in zip(paths, seeds)]))


def with_augmented_copies(train: Split, backbone, ids: Sequence[str], paths: Sequence[str], cache_dir: str | Path,
                          augment: Augment, copies: int, engine: str = "onnx") -> Split:
    """``train`` followed by ``copies`` augmented embeddings of each of its images (same labels and positions).

    ``ids``/``paths`` are the training split's own, in its order; copies of unreadable images are left out.
    """
    if copies <= 0:
        return train
    lazy = isinstance(train.feats, FeatureView)  # features in the memory-mapped store: the copies stay there too
    feats, keep = [train.feats], [torch.ones(len(train), dtype=torch.bool)]
    for k in range(copies):
        if lazy:
            f, ok = cached_embedding_view(backbone, ids, paths, cache_dir, engine=engine, augment=augment, copy=k)
            feats.append(f)
        else:
            f, ok = cached_embeddings(backbone, ids, paths, cache_dir, engine=engine, augment=augment, copy=k)
            feats.append(torch.as_tensor(np.nan_to_num(f)))
        keep.append(torch.as_tensor(ok))
    mask = torch.cat(keep)
    if (~mask).any():
        console.print(tagged("warning", f"{int((~mask).sum())} augmented copies unreadable: left out"))
    rep = lambda t: t.repeat(copies + 1)[mask]  # noqa: E731
    all_feats = FeatureView.concat(feats).select(mask.numpy()) if lazy else torch.cat(feats)[mask]
    return Split(labels=rep(train.labels), lat=rep(train.lat), lon=rep(train.lon), feats=all_feats, paths=None)
