"""Shared by the Earth benchmarks: a config writing under a scratch folder, and the data built there."""
from __future__ import annotations

from pathlib import Path

from geolocate.config import Config


def workspace_config(config: Path, root: Path, count: int | None = None) -> Config:
    """``config`` with every path under ``root`` (and ``source.earth.count`` when given)."""
    cfg = Config.load(config)
    for k in ("data_dir", "runs_dir", "models_dir", "exports_dir"):
        setattr(cfg.paths, k, str(Path(root) / k.removesuffix("_dir")))
    if count:
        cfg.source.earth.count = count
    return cfg


def build_earth(cfg: Config) -> None:
    """The earth source, index and split, as `geolocate build-dataset`, `index` and `split` make them (no plots)."""
    from geolocate.index import build_index, make_splits
    from geolocate.sources import get_source

    get_source("earth")(cfg, Path(cfg.paths.data_dir) / "raw" / "earth")
    build_index(cfg, plot=False)
    make_splits(cfg, plot=False)


def seed_spread(values, percent: bool = False) -> str:
    """Mean ± std over seeds as the result files print it: km-like values to the unit, fractions as percent."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    return f"{100 * v.mean():.1f} ± {100 * v.std():.1f} %" if percent else f"{v.mean():,.0f} ± {v.std():,.0f}"


def shipped_answers(geo, model, feats, truths, cell_index: dict[str, int]):
    """(cell scores (N, C): the answer's ranked cells, lat, lon, the head's own probabilities (N, C)) for features
    ``feats`` (the head's input) through ``model``'s head and the predictor ``geo``'s decode-time steps (reranking,
    refinement from the run's gallery): the model as shipped, on images embedded elsewhere (shifted or held-out
    copies), and the head's answer before those steps."""
    import numpy as np
    import torch

    with torch.inference_mode():
        dec = model.head.decode(model.head(torch.as_tensor(feats)))
    probs = dec.probabilities.double().numpy()
    got = geo.answer_outputs(probs, np.asarray(feats), None if dec.point is None else dec.point.double().numpy(),
                             truths=list(truths), top_k=5)
    scores = np.zeros_like(probs)
    for i, g in enumerate(got):
        for c in g.top:
            scores[i, cell_index[c.cell]] = c.probability
    return scores, np.array([g.lat for g in got]), np.array([g.lon for g in got]), probs
