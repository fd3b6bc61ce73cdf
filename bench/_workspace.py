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
