"""The backbone's input invariances, ``model.detail_px`` (a low-pass) and ``model.exposure`` (exposure normalisation):
what they make alike, their bounds, their caches, and a run that ships them to every engine."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from geolocate.preprocess import Preprocess

PP = dict(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _patches():
    """Real Earth patches (shaded relief) cut at 112 px, at 56 px (half the pixels) and 112 px blurred sigma 1."""
    from geolocate.config import Config
    from geolocate.sources.earth import cut_patch

    ec = Config().source.earth
    ec.patch_km = 220
    out = []
    for lat, lon in [(45.0, 7.0), (55.7, 13.2), (35.0, 105.0), (-15.0, -60.0)]:
        sharp = Image.fromarray(cut_patch(ec, lat, lon, "shadedrelief", 112))
        half = Image.fromarray(cut_patch(ec, lat, lon, "shadedrelief", 56))
        out.append((sharp, half, sharp.filter(ImageFilter.GaussianBlur(1))))
    return out


def test_detail_makes_sharp_blurred_and_half_resolution_inputs_alike():
    plain, low = Preprocess(**PP), Preprocess(**PP, detail=60)
    for sharp, half, blurred in _patches():
        # mean |difference| to the sharp patch: the half-resolution cut loses most of its difference (measured
        # 0.35-0.6x), a sigma-1 blur some (0.6-0.97x: sigma 1 at 112 px is still sigma 0.5 at 60)
        for other, most in ((half, 0.7), (blurred, 0.99)):
            d_plain = np.abs(plain.image_to_array(sharp) - plain.image_to_array(other)).mean()
            d_low = np.abs(low.image_to_array(sharp) - low.image_to_array(other)).mean()
            assert d_low < most * d_plain, (d_low, d_plain)
        # what the low-pass keeps: the picture itself (close to the plain one, far from another place's)
        assert np.abs(low.image_to_array(sharp) - plain.image_to_array(sharp)).mean() < 0.05
    a, b = _patches()[:2]
    assert np.abs(low.image_to_array(a[0]) - low.image_to_array(b[0])).mean() > 0.2


def test_detail_on_real_photos_and_its_bounds(photos_dir):
    plain, low = Preprocess(**PP), Preprocess(**PP, detail=64)
    for path in sorted(photos_dir.glob("*.jpg"))[:4]:  # big phone photos: the JPEG draft, EXIF orientation, then the low-pass
        x, y = low.load_array(path), plain.load_array(path)
        assert x.shape == y.shape == (3, 224, 224) and np.isfinite(x).all()
        assert 0 < np.abs(x - y).mean() < 0.2   # the same picture (values in [-1, 1]), without its finest detail
    with pytest.raises(ValueError, match="detail must be 0"):
        Preprocess(**PP, detail=300)
    assert Preprocess.from_dict({**PP}).detail == 0                      # model files from before the option
    assert Preprocess.from_dict(Preprocess(**PP, detail=60).to_dict()).detail == 60


def test_exposure_makes_brighter_and_darker_inputs_alike():
    plain, norm = Preprocess(**PP, detail=60), Preprocess(**PP, detail=60, exposure=0.45)
    for sharp, _, _ in _patches():
        a = np.asarray(sharp, dtype=np.float32)
        for f in (0.9, 1.1):
            shifted = Image.fromarray(np.clip(a * f + 0.5, 0, 255).astype(np.uint8))
            d_plain = np.abs(plain.image_to_array(sharp) - plain.image_to_array(shifted)).mean()
            d_norm = np.abs(norm.image_to_array(sharp) - norm.image_to_array(shifted)).mean()
            assert d_norm < 0.25 * d_plain, (f, d_norm, d_plain)   # what is left: rounding and clipped highlights
        x = norm.image_to_array(sharp)  # (x + 1) / 2 is the pixel in 0..1: its mean luminance is the target
        lum = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2] + 1) / 2
        assert abs(float(lum.mean()) - 0.45) < 0.03
    with pytest.raises(ValueError, match="exposure must be 0"):
        Preprocess(**PP, exposure=1.5)
    assert Preprocess.from_dict(norm.to_dict()) == norm


def test_detail_names_its_own_embedding_cache_and_config_checks_it():
    from geolocate.config import Config, ConfigError
    from geolocate.models import create_backbone

    plain, low = create_backbone("small_cnn", pretrained=False), create_backbone("small_cnn", pretrained=False, detail=32)
    assert low.preprocess.detail == 32 and plain.preprocess.detail == 0
    assert low.cache_name != plain.cache_name and low.cache_name.startswith(plain.cache_name)
    exposed = create_backbone("small_cnn", pretrained=False, detail=32, exposure=0.4)
    assert len({plain.cache_name, low.cache_name, exposed.cache_name}) == 3
    with pytest.raises(ConfigError, match="model.detail_px"):
        Config.load(None, ["model.detail_px=-3"])
    with pytest.raises(ConfigError, match="model.exposure"):
        Config.load(None, ["model.exposure=2"])
    from geolocate.models import backbone_for

    cfg = Config.load(None, ["model.backbone=small_cnn", "model.detail_px=500"])  # more than the backbone's input
    with pytest.raises(ValueError, match=r"model.detail_px / model.exposure do not fit backbone 'small_cnn'.*1\.\.\d+ px"):
        backbone_for(cfg.model)
    cfg.model.detail_px = 24
    assert backbone_for(cfg.model).preprocess.detail == 24


def test_a_run_with_detail_and_exposure_ships_them_to_every_engine(trained_copy):
    """A run with model.detail_px and model.exposure embeds through them (its own cache), saves them in the model
    file, and the torch and ONNX predictors apply them: their answers equal the head over those pixels."""
    from geolocate.index import load_index
    from geolocate.models import create_backbone, load_model
    from geolocate.runs.experiment import run_experiment
    from geolocate.serving import Geolocator
    from geolocate.training.store import EmbeddingStore

    cfg, _, _ = trained_copy
    cfg.model.detail_px, cfg.model.exposure = 40, 0.45
    cfg.train.epochs = 3
    run = run_experiment(cfg)
    model, info = load_model(run / "checkpoints" / "model.pt")
    assert info["preprocess"]["detail"] == 40 and model.preprocess.detail == 40 and model.preprocess.exposure == 0.45
    bb = create_backbone(cfg.model.backbone, detail=40, exposure=0.45)
    store = EmbeddingStore.open(Path(cfg.paths.data_dir) / "cache" / "embeddings", bb.cache_name, bb.num_features)
    df, _, _ = load_index(cfg)
    assert set(df["id"].to_list()) <= set(store.index.ids.tolist())
    paths = df["path"].to_list()[:6]
    x_low = torch.from_numpy(Preprocess(**model.preprocess.to_dict()).batch(paths))
    with torch.inference_mode():
        ref = model.decode(x_low).probabilities.numpy()
        f_low = model.backbone(x_low).numpy()
        f_sharp = model.backbone(torch.from_numpy(Preprocess(224, model.preprocess.mean, model.preprocess.std).batch(paths))).numpy()
    assert np.abs(f_low - f_sharp).mean() > 0.05 * np.abs(f_sharp).mean()  # the options change what the head sees
    cells = [c["cell"] for c in info["labels"]["classes"]]
    for engine in ("torch", "onnx"):
        geo = Geolocator.from_pretrained(run / "checkpoints" / "model.pt", engine=engine)
        assert (geo.preprocess.detail, geo.preprocess.exposure) == (40, 0.45)
        x = geo.preprocess.batch(paths)
        assert np.array_equal(x, x_low.numpy())
        out = geo.engine.run(x)
        assert np.abs(out["features"] - f_low).max() <= 1e-3 * np.abs(f_low).max()
        assert np.abs(geo.probabilities(x) - ref).max() <= 1e-4
        # the answer from image bytes (the predictor's own decode) ranks the low-passed pixels' reranked cells
        answer = geo._rerank(ref.astype(np.float64), out["features"])
        for p, r in zip(geo.predict([Path(q).read_bytes() for q in paths]), answer):
            assert p.top[0].cell == cells[int(np.argmax(r))]
    alone = Geolocator.from_pretrained(run / "checkpoints" / "model.onnx")  # the export alone carries them in its metadata
    assert (alone.preprocess.detail, alone.preprocess.exposure) == (40, 0.45)
