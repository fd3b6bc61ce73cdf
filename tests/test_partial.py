"""Partial fine-tuning: the backbone split, the float16 memory-mapped trunk-activation cache, and a real run whose
trained tail ends up in the model file."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from geolocate.augment import Augment
from geolocate.models import create_backbone, load_model
from geolocate.training.partial import Rows, TailModel, cached_activations


@pytest.mark.parametrize("spec", ["efficientnet_lite0", "small_cnn"])
def test_tail_of_trunk_is_the_backbone(spec):
    bb = create_backbone(spec, pretrained=spec == "efficientnet_lite0").eval()
    x = torch.randn(2, 3, bb.preprocess.size, bb.preprocess.size)
    for n in (1, 2):
        trunk, tail = bb.partial_split(n)
        with torch.no_grad():
            assert torch.allclose(tail(trunk(x)), bb(x), atol=1e-5)
        tail_ids = {id(p) for p in tail.parameters()}
        assert tail_ids and not tail_ids & {id(p) for p in trunk.parameters()}  # shared with bb, disjoint halves
        assert tail_ids <= {id(p) for p in bb.parameters()}
    with pytest.raises(ValueError, match="train.partial_blocks must be in 1.."):
        bb.partial_split(bb.num_blocks)


def test_activation_cache_is_float16_memory_mapped_and_reused(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths.append(str(tmp_path / "bad.jpg"))
    bb = create_backbone("small_cnn", pretrained=False).eval()
    trunk, tail = bb.partial_split(2)
    acts, ok = cached_activations(trunk, bb.preprocess, paths, tmp_path / "cache", "t", batch_size=2, workers=1)
    assert isinstance(acts, np.memmap) and acts.dtype == np.float16 and acts.shape == (6, 128, 14, 14)
    assert ok.tolist() == [True] * 5 + [False] and not acts[5].any()
    with torch.no_grad():
        ref = trunk(torch.from_numpy(bb.preprocess.batch(paths[:5])))
    assert np.allclose(acts[:5].astype(np.float32), ref.numpy(), atol=2e-2, rtol=1e-2)
    # the same images again: read back, nothing run
    import geolocate.runtime

    monkeypatch.setattr(geolocate.runtime, "ort_session", lambda *a, **k: pytest.fail("recomputed a cached file"))
    again, ok2 = cached_activations(trunk, bb.preprocess, paths, tmp_path / "cache", "t")
    assert np.array_equal(np.asarray(again), np.asarray(acts)) and ok2.tolist() == ok.tolist()
    monkeypatch.undo()
    # an augmented copy is another file with other values; two copies differ
    aug = Augment.from_config(domain="aerial", p=1.0)
    a0, _ = cached_activations(trunk, bb.preprocess, paths[:5], tmp_path / "cache", "t", augment=aug, copy=0)
    a1, _ = cached_activations(trunk, bb.preprocess, paths[:5], tmp_path / "cache", "t", augment=aug, copy=1)
    assert not np.allclose(a0, acts[:5]) and not np.allclose(a0, a1)
    assert len(list((tmp_path / "cache").glob("t-*.npy"))) == 6  # 3 arrays + their ok masks
    # Rows: several arrays as one, any order
    rows = Rows([acts, a0])
    got = rows.take([7, 0, 6])
    assert got.dtype == torch.float32 and torch.equal(got[0], torch.from_numpy(a0[1].astype(np.float32)))
    assert torch.equal(got[1], torch.from_numpy(acts[0].astype(np.float32))) and len(rows) == 11
    assert TailModel(tail, torch.nn.Identity())(got).shape == (3, bb.num_features)


def test_partial_finetune_trains_the_tail_into_the_model_file(trained_copy):
    from geolocate.runs.experiment import run_experiment

    cfg, _, _ = trained_copy
    cfg.train.epochs, cfg.train.min_epochs, cfg.train.patience = 3, 0, 5
    cfg.train.partial_blocks, cfg.train.partial_epochs, cfg.train.partial_copies = 1, 2, 1
    cfg.train.partial_lr_mult = 0.5
    run = run_experiment(cfg)
    s = json.loads((run / "summary.json").read_text())
    assert s["config"]["partial_blocks"] == 1 and s["config"]["partial_copies"] == 1
    phases = pl.read_csv(run / "metrics.csv")["phase"].to_list()
    assert phases == ["frozen"] * 3 + ["partial"] * 2

    ck = torch.load(run / "checkpoints" / "model.pt", weights_only=True)
    assert ck["backbone_state"] is not None
    model, _ = load_model(run / "checkpoints" / "model.pt")
    ref = create_backbone("efficientnet_lite0").eval()
    trunk_ref, tail_ref = ref.partial_split(1)
    trunk, tail = model.backbone.partial_split(1)
    assert all(torch.equal(a, b) for a, b in zip(trunk.state_dict().values(), trunk_ref.state_dict().values()))
    if s["training"]["best_phase"] == "partial":  # the kept weights are the trained tail's
        assert any(not torch.equal(a, b) for a, b in zip(tail.state_dict().values(), tail_ref.state_dict().values()))
    # the model file reproduces the run's test predictions from the images (float16 cache vs float32: near ties aside)
    preds = pl.read_parquet(run / "predictions_test.parquet")
    from geolocate.index import load_index

    df = load_index(cfg)[0].join(preds.select("id", "pred_label", "prob"), on="id")
    with torch.no_grad():
        p = model.decode(torch.from_numpy(model.preprocess.batch(df["path"].to_list()))).probabilities.numpy()
    assert (p.argmax(1) == df["pred_label"].to_numpy()).mean() >= 0.9
    assert np.abs(p.max(1) - df["prob"].to_numpy()).max() < 0.05


def test_partial_settings_are_checked_in_one_line():
    from geolocate.config import Config, ConfigError

    cfg = Config()
    cfg.train.partial_copies = 20
    with pytest.raises(ConfigError, match="train.partial_blocks must be >= 0, partial_copies in 0..16"):
        cfg.validate()
    cfg = Config()
    cfg.model.loc_scales = []
    with pytest.raises(ConfigError, match="model.loc_scales must be > 0"):
        cfg.validate()
