"""Multi-view samples: Earth views (N/E/S/W around a place), grouping rows into samples, the datasets over them,
the fusion registry, the trainer's DataLoader path, and a fused run end to end through the model file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from conftest import tiny_config
from geolocate.config import Config, ConfigError
from geolocate.geo import haversine_km
from geolocate.labels import LabelSpace
from geolocate.models import FUSIONS, CellHead, create_fusion, load_model
from geolocate.training import Split, Trainer
from geolocate.training.dataset import (FeatureDataset, ViewImageDataset, feature_loader, group_views, select_views,
                                        sequential_batches)


def views_config(root: Path, **overrides):
    base = {"source.earth.views": 4, "source.earth.imagery": "[shadedrelief]", "source.earth.heldout_imagery": "''"}
    return tiny_config(root, **(base | overrides))


# ---- the Earth source ------------------------------------------------------------------------------------------

def test_earth_views_are_one_sample_in_one_sequence_and_split(tmp_path):
    from geolocate.index import build_index, load_index, make_splits
    from geolocate.sources import get_source, read_records
    from geolocate.sources.earth import VIEW_BEARINGS, plan_patches, view_cuts

    cfg = views_config(tmp_path, **{"source.earth.count": 160, "index.min_cell_samples": 1})
    ec = cfg.source.earth
    plans = plan_patches(ec)
    assert len(plans) == 40  # 160 images = 40 places x 4 views in one rendering
    lat, lon = plans[0][2], plans[0][3]
    cuts = view_cuts(ec, lat, lon)
    assert [c[0] for c in cuts] == list(VIEW_BEARINGS)
    for v, clat, clon in cuts:  # each view centre lies half a patch from the place, towards its bearing
        assert haversine_km(lat, lon, clat, clon) == pytest.approx(ec.patch_km / 2, rel=1e-6)
    assert cuts[0][1] > lat > cuts[2][1]
    assert haversine_km(lat, lon, *view_cuts(Config.from_dict({"source": {"earth": {"views": 4, "view_offset_km": 30}}}).source.earth,
                                              lat, lon)[1][1:]) == pytest.approx(30, rel=1e-6)

    get_source("earth")(cfg, tmp_path / "raw")
    recs = list(read_records(Path(cfg.paths.data_dir) / "records" / "earth.jsonl"))
    assert len(recs) == 160 and len({r.path for r in recs}) == 160
    by_group: dict[str, list] = {}
    for r in recs:
        by_group.setdefault(r.group_id, []).append(r)
    assert len(by_group) == 40
    for g, rows in by_group.items():
        assert sorted(r.view for r in rows) == ["E", "N", "S", "W"]
        assert len({(r.lat, r.lon, r.sequence_id) for r in rows}) == 1       # labelled by the place's centre
        assert {r.id for r in rows} == {f"{g}-{v}" for v in "NESW"}
        assert {r.view: r.heading for r in rows} == VIEW_BEARINGS
    # the four patches differ (they are cut around the place, not at it)
    from PIL import Image
    pix = [np.asarray(Image.open(r.path), dtype=np.float32) for r in by_group[recs[0].group_id]]
    assert min(np.abs(a - b).mean() for i, a in enumerate(pix) for b in pix[i + 1:]) > 1.0

    build_index(cfg, plot=False)
    make_splits(cfg, plot=False)
    df, _, _ = load_index(cfg)
    assert df.group_by("group_id").agg(pl.col("split").n_unique())["split"].max() == 1
    assert df["split"].n_unique() == 3
    samples = group_views(df)
    assert len(samples) == 40 and samples.slots == ["N", "E", "S", "W"] and samples.mask.all()
    assert set(samples.frame["id"].to_list()) == set(by_group)


def test_views_default_is_one_patch_per_place(tmp_path):
    cfg = tiny_config(tmp_path)
    assert cfg.source.earth.views == 1 and cfg.model.fusion == "none"
    with pytest.raises(ConfigError, match="source.earth.views must be 1 or 4"):
        Config.load(None, ["source.earth.views=3"])
    with pytest.raises(ConfigError, match="model.fusion must be 'none' or one of"):
        Config.load(None, ["model.fusion=median"])
    with pytest.raises(ConfigError, match="cached embeddings only"):
        Config.load(None, ["model.fusion=average", "train.finetune_epochs=2"])


# ---- grouping rows into samples --------------------------------------------------------------------------------

def frame(rows):
    return pl.DataFrame(rows, schema={"id": pl.Utf8, "view": pl.Utf8, "group_id": pl.Utf8, "label": pl.Int64, "lat": pl.Float64,
                                      "lon": pl.Float64, "split": pl.Utf8, "sequence_id": pl.Utf8, "path": pl.Utf8}, orient="row")


def test_group_views_places_rows_in_slots_and_refuses_bad_samples():
    df = frame([("a-N", "N", "a", 0, 1.0, 2.0, "train", "s1", "pa"), ("a-W", "W", "a", 0, 1.0, 2.0, "train", "s1", "pw"),
                ("b-E", "E", "b", 1, 3.0, 4.0, "val", "s2", "pe"), ("c", None, None, 2, 5.0, 6.0, "test", "s3", "pc")])
    s = group_views(df)
    assert s.slots == ["N", "E", "W"] and s.frame["id"].to_list() == ["a", "b", "c"]
    assert s.rows.tolist() == [[0, -1, 1], [-1, 2, -1], [3, -1, -1]]
    assert s.frame["label"].to_list() == [0, 1, 2] and s.frame["split"].to_list() == ["train", "val", "test"]
    assert s.frame["path"].to_list() == ["pa", "pe", "pc"]
    feats, mask = s.gather(np.arange(4, dtype=np.float32)[:, None] + 1)
    assert feats[..., 0].tolist() == [[1, 0, 2], [0, 3, 0], [4, 0, 0]] and mask.sum() == 4
    # slots named by the config; other views left out
    s2 = group_views(df, ["W", "N"])
    assert s2.slots == ["W", "N"] and s2.rows.tolist() == [[1, 0], [3, -1]]
    assert select_views(df, ["N"])["id"].to_list() == ["a-N", "c"]
    # no view anywhere: one slot, one row per sample (the single-view path)
    plain = group_views(df.with_columns(pl.lit(None, pl.Utf8).alias("view"), pl.lit(None, pl.Utf8).alias("group_id")))
    assert plain.slots == [""] and plain.rows.tolist() == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="sample 'a' has more than one image of view 'N'"):
        group_views(df.with_columns(pl.Series("view", ["N", "N", "E", None])))
    with pytest.raises(ValueError, match="sample 'a': its views are in different splits"):
        group_views(df.with_columns(pl.Series("split", ["train", "val", "val", "test"])))


# ---- the fusion registry ---------------------------------------------------------------------------------------

def perturbed(name: str, f: int, views) -> torch.nn.Module:
    """A fusion whose learnable parameters are random (not the average it starts as)."""
    fu = create_fusion(name, f, views)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fu.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return fu.eval()


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_masked_views_contribute_nothing(name):
    views, f = ["N", "E", "S", "W"], 6
    fu = perturbed(name, f, views)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, f, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    y = fu(x, mask)
    assert y.shape == (5, fu.out_features) and torch.isfinite(y).all()
    junk = torch.where(mask[..., None], x, torch.full_like(x, float("nan")))
    assert torch.equal(fu(junk, mask), y)
    assert torch.equal(fu(torch.where(mask[..., None], x, 1e6 * torch.randn(x.shape, generator=g)), mask), y)
    # fewer views than slots: the missing slots are absent
    assert torch.equal(fu(x[:, :2], mask[:, :2]), fu(x, mask & torch.tensor([True, True, False, False])))
    # the fusion's record rebuilds it
    again = create_fusion(name, f, **fu.kwargs).eval()
    again.load_state_dict(fu.state_dict())
    assert torch.equal(again(x, mask), y)


@pytest.mark.parametrize("name", sorted(set(FUSIONS) - {"concat"}))
def test_identical_views_fuse_to_that_view_exactly(name):
    fu = perturbed(name, 7, ["N", "E", "S", "W"])
    one = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fu(one[:, None].expand(3, 4, 7).contiguous()), one)
    assert torch.equal(fu(one[:, None]), one)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(fu(one[:, None].expand(3, 4, 7).contiguous(), mask), one)


def test_view_dropout_leaves_views_out_while_training_only():
    fu = create_fusion("average", 1, list("NESW"), view_dropout=0.5)
    x = torch.arange(4.0).view(1, 4, 1).expand(2000, 4, 1)
    mask = torch.ones(2000, 4, dtype=torch.bool)
    mask[:1000, 1:] = False  # half the samples have one view: it is never dropped
    torch.manual_seed(0)
    y = fu.train()(x, mask)[:, 0]
    assert torch.equal(y[:1000], torch.zeros(1000))
    kept = fu.drop_views(mask[1000:])
    assert kept.any(1).all() and 0.4 < kept.float().mean() < 0.6
    assert y[1000:].unique().numel() > 4  # means of different subsets
    assert torch.equal(fu.eval()(x, mask)[1000:, 0], torch.full((1000,), 1.5))
    with pytest.raises(ValueError, match=r"view_dropout must be in \[0, 1\), got 1.0"):
        create_fusion("weighted", 1, ["N"], view_dropout=1.0)


def test_each_fusion_computes_what_it_says():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    m = mask[..., None].float()
    mean = (x * m).sum(1) / m.sum(1)
    assert torch.allclose(create_fusion("average", 5, ["a", "b", "c"])(x, mask), mean, atol=1e-6)
    w = create_fusion("weighted", 5, ["a", "b", "c"])
    with torch.no_grad():
        w.slot_logits.copy_(torch.tensor([0.0, np.log(3.0), -50.0]))
    # slots a:b weigh 1:3 where both are present; c (weight ~0) only counts where it is the only view
    assert torch.allclose(w(x, mask)[0], (x[0, 0] + 3 * x[0, 1]) / 4, atol=1e-5)
    assert torch.allclose(w(x, mask)[1], x[1, 0], atol=1e-5)
    att = create_fusion("attention", 5, ["a", "b", "c"]).eval()
    assert torch.allclose(att(x, mask), mean, atol=1e-6)  # starts as the average
    cat = create_fusion("concat", 5, ["a", "b", "c"])
    assert cat.out_features == 15 and torch.equal(cat(x, mask).view(4, 3, 5), x * m)
    with pytest.raises(KeyError, match="unknown fusion 'max': choose one of attention, average, concat, weighted"):
        create_fusion("max", 5, ["a"])
    with pytest.raises(ValueError, match=r"has 3 view slots \(a, b, c\), got 4 views"):
        cat(torch.zeros(1, 4, 5))


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_a_fused_model_goes_through_its_file_and_onnx(name, tmp_path):
    """GeoModel with a fusion: multi-view images, single images (one-view samples), the model file, the ONNX export."""
    from geolocate.models import GeoModel, create_backbone, create_head, save_model
    from geolocate.serving.export import PARITY_TOL, check_batch, export_onnx

    ls = LabelSpace.from_anchors([10, -20, 45], [5, 30, -70])
    bb = create_backbone("small_cnn", pretrained=False)
    torch.manual_seed(0)
    fu = perturbed(name, bb.num_features, list("NESW"))
    model = GeoModel(bb, create_head("linear", fu.out_features, ls), fu).eval()
    x = check_batch({"preprocess": bb.preprocess.to_dict()}, n=3)
    views = torch.stack([x, x.flip(-1), x.flip(-2), x], dim=1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    path = save_model(tmp_path / "m.pt", model, "small_cnn", ls, backbone_trained=True)
    loaded, info = load_model(path)
    assert info["fusion"] == name and type(loaded.fusion) is type(fu)
    with torch.no_grad():
        assert torch.allclose(model.decode(views, mask).probabilities, loaded.decode(views, mask).probabilities, atol=1e-6)
        one = loaded.decode(x).probabilities   # a single image is a sample of its first view
        first_only = torch.tensor([[1, 0, 0, 0]] * 3, dtype=torch.bool)
        assert torch.allclose(one, loaded.decode(views, first_only).probabilities, atol=1e-6)
        if name != "concat":  # one view fused is that view: the head reads the backbone's features unchanged
            assert torch.allclose(one, loaded.head.decode(loaded.head(loaded.backbone(x))).probabilities, atol=1e-6)
    _, diff = export_onnx(path)
    assert diff <= PARITY_TOL


# ---- the datasets and the trainer --------------------------------------------------------------------------------

def test_feature_dataset_yields_samples_and_batches():
    feats = torch.arange(24.0).view(4, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    ds = FeatureDataset(feats, mask, torch.tensor([0, 1, 2, 3]),
                        torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), ["a", "b", "c", "d"])
    one = ds[2]
    assert one["features"].shape == (3, 2) and one["view_mask"].tolist() == [True, True, True] and one["id"] == "c"
    assert int(one["targets"]["label"]) == 2
    batches = list(feature_loader(ds, [torch.tensor([3, 1]), torch.tensor([0])]))
    assert [b["id"] for b in batches] == [["d", "b"], ["a"]]
    assert torch.equal(batches[0]["features"], feats[[3, 1]]) and batches[0]["targets"]["label"].tolist() == [3, 1]
    assert torch.equal(batches[0]["view_mask"], mask[[3, 1]])
    assert [len(b) for b in sequential_batches(10, 4)] == [4, 4, 2]


def toy_splits(v: int, seed: int = 0, noise: float = 1.0):
    """Features of 4 classes (V views each: the class mean plus per-view noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 8, generator=g)

    def split(n):
        y = torch.randint(0, 4, (n,), generator=g)
        x = centres[y][:, None] + noise * torch.randn(n, v, 8, generator=g)
        lat = torch.zeros(n, dtype=torch.float64)
        return Split(labels=y, lat=lat, lon=(10.0 * y).double(), feats=x, view_mask=torch.ones(n, v, dtype=torch.bool))
    return split(96), split(40)


def toy_trainer(tmp_path, **train):
    cfg = Config()
    cfg.train.epochs, cfg.train.min_epochs, cfg.train.batch_size = 6, 0, 16
    for k, val in train.items():
        setattr(cfg.train, k, val)
    labels = LabelSpace.from_anchors(np.zeros(4), 10.0 * np.arange(4.0))
    return Trainer(cfg, labels, np.ones(4), tmp_path), labels


@pytest.mark.parametrize("hard_negatives", [0.0, 1.0])
def test_one_view_through_the_dataloaders_gives_todays_numbers(tmp_path, hard_negatives):
    train, val = toy_splits(1)
    trainer, labels = toy_trainer(tmp_path, hard_negatives=hard_negatives)
    torch.manual_seed(0)
    plain_head = CellHead(8, labels, 0.2)
    plain = trainer.fit_head(plain_head, Split(train.labels, train.lat, train.lon, train.feats[:, 0]),
                             Split(val.labels, val.lat, val.lon, val.feats[:, 0]))
    torch.manual_seed(0)
    fused_head = CellHead(8, labels, 0.2)
    fused = trainer.fit_head(fused_head, train, val, fusion=create_fusion("average", 8, ["N"]))
    assert fused["history"] == [{**r, "seconds": f["seconds"]} for r, f in zip(plain["history"], fused["history"])]
    assert all(torch.equal(a, b) for a, b in zip(plain_head.state_dict().values(), fused_head.state_dict().values()))


def test_fusing_four_noisy_views_beats_one(tmp_path):
    train, val = toy_splits(4, seed=5, noise=1.5)
    trainer, labels = toy_trainer(tmp_path, epochs=30, lr=0.03, monitor="val_top1", monitor_ema=0.0)
    one = trainer.fit_head(CellHead(8, labels, 0.0), Split(train.labels, train.lat, train.lon, train.feats[:, 0]),
                           Split(val.labels, val.lat, val.lon, val.feats[:, 0]))
    for name in ("average", "attention"):
        four = trainer.fit_head(CellHead(8, labels, 0.0), train, val, fusion=create_fusion(name, 8, list("NESW")))
        assert four["stopper"]["best_row"]["val_top1"] > one["stopper"]["best_row"]["val_top1"] + 0.05
    with pytest.raises(ValueError, match="train with a fusion"):
        trainer.fit_head(CellHead(8, labels, 0.0), train, val)


# ---- a fused run, end to end -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    from geolocate.index import build_index, make_splits
    from geolocate.runs.experiment import run_experiment
    from geolocate.sources import get_source

    root = tmp_path_factory.mktemp("views")
    cfg = views_config(root, **{"source.earth.count": 320, "model.fusion": "attention", "train.epochs": 12,
                                "train.min_epochs": 0, "eval.refine": "off", "eval.rerank": []})
    get_source("earth")(cfg, Path(cfg.paths.data_dir) / "raw" / "earth")
    build_index(cfg, plot=False)
    make_splits(cfg, plot=False)
    return cfg, run_experiment(cfg)


def test_fused_run_trains_on_samples_and_its_model_file_rebuilds_the_fusion(fused_run):
    from geolocate.index import load_index

    cfg, run_dir = fused_run
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["config"]["fusion"] == "attention"
    assert s["dataset"]["images"] == 320 and s["dataset"]["samples"] == 80 and s["dataset"]["views"] == "N,E,S,W"
    pred = pl.read_parquet(run_dir / "predictions_test.parquet")
    assert pred.height == s["metrics"]["test"]["n"] and pred["id"].str.contains("-[NESW]$").sum() == 0
    model, info = load_model(run_dir / "checkpoints" / "model.pt")
    assert info["fusion"] == "attention" and info["fusion_kwargs"] == {"views": ["N", "E", "S", "W"], "view_dropout": 0.25, "hidden": 128,
                                                                "input_dropout": 0.0, "max_score": 0.5}
    assert model.fusion is not None and model.fusion.slot_bias.abs().sum() > 0  # trained, and saved with its weights
    # the loaded model on the test samples' four images gives the run's answers
    df, _, _ = load_index(cfg)
    samples = group_views(df)
    ds = ViewImageDataset(df["path"].to_list(), samples, model.preprocess)
    where = {k: i for i, k in enumerate(samples.frame["id"].to_list())}
    items = [ds[where[k]] for k in pred["id"].to_list()]
    with torch.no_grad():
        probs = model.decode(torch.stack([it["images"] for it in items]), torch.stack([it["view_mask"] for it in items])).probabilities
    assert all(it["images"].shape == (4, 3, 224, 224) and it["view_mask"].all() for it in items)
    assert np.allclose(probs.max(1).values.numpy(), pred["prob"].to_numpy(), atol=2e-3)
    assert (probs.argmax(1).numpy() == pred["pred_label"].to_numpy()).mean() >= 0.9
    # a view whose file is gone is masked out, not fatal
    first = samples.rows[where[pred["id"][0]], 0]
    ds.paths[first] = str(Path(cfg.paths.data_dir) / "missing.jpg")
    assert ds[where[pred["id"][0]]]["view_mask"].tolist() == [False, True, True, True]


def test_tta_on_a_fused_sample_fuses_each_transform_of_its_views_then_combines_them(fused_run):
    """With TTA a fused model's sample is fused once per test-time transform (that transform of every view, each
    in its slot, a missing one masked), and those answers are combined with the view combiner: the same as the
    model itself on each transform's images."""
    from geolocate.index import load_index
    from geolocate.serving import Geolocator
    from geolocate.tasks.combine import combine
    from geolocate.tta import tta_transforms

    cfg, run_dir = fused_run
    model_path = run_dir / "checkpoints" / "model.pt"
    df, _, _ = load_index(cfg)
    samples = group_views(df)
    paths = df["path"].to_list()
    groups = [[paths[r] for r in samples.rows[i]] for i in range(3)]
    model, _ = load_model(model_path)
    geo = Geolocator.from_pretrained(model_path, engine="torch")
    plain = geo.predict(groups, top_k=3)
    geo.tta = True
    got = geo.predict(groups + [groups[0][:1] + [None, groups[0][2], groups[0][3]]], top_k=3)
    transforms = tta_transforms("aerial")
    for g, p, before in zip(groups + [groups[0]], got, plain + [plain[0]]):
        mask = torch.tensor([[True, False, True, True]]) if p is got[-1] else torch.ones(1, 4, dtype=torch.bool)
        per_t = []
        for t in transforms:
            images = torch.from_numpy(np.stack([model.preprocess.load(v, transform=t)[0] for v in g]))
            with torch.no_grad():
                per_t.append(model.decode(images[None], mask).probabilities[0].double().numpy())
        expect = combine(geo.view_combiner, np.stack(per_t))
        assert p.error is None and [c.cell for c in p.top] == [geo.classes[i]["cell"] for i in np.argsort(-expect)[:3]]
        assert p.confidence == pytest.approx(float(expect.max()), abs=2e-3)
        assert p.confidence != pytest.approx(before.confidence, abs=1e-6) or p is got[-1]  # the transforms did change it
    assert len(got[-1].dropped) == 1 and len(got[-1].views) == 3


@pytest.mark.parametrize("engine", ["onnx", "torch"])
def test_the_predictor_fuses_a_samples_views_with_the_models_own_fusion(fused_run, engine, tmp_path):
    """``Geolocator.predict([[N, E, S, W], ...])`` with a fused model answers as the run did on its test samples (the
    views fused by the trained fusion, not their probabilities averaged); a missing view is masked, not fatal; a
    sample with more views than the model has slots is refused with one line."""
    from geolocate.index import load_index
    from geolocate.serving import Geolocator

    cfg, run_dir = fused_run
    model_path = run_dir / "checkpoints" / "model.pt"
    pred = pl.read_parquet(run_dir / "predictions_test.parquet")
    df, _, _ = load_index(cfg)
    samples = group_views(df)
    where = {k: i for i, k in enumerate(samples.frame["id"].to_list())}
    paths = df["path"].to_list()
    groups = [[paths[r] for r in samples.rows[where[k]]] for k in pred["id"].to_list()]
    geo = Geolocator.from_pretrained(model_path, engine=engine)
    assert geo.fusion_slots == ["N", "E", "S", "W"]
    got = geo.predict(groups, top_k=3)
    assert all(p.error is None and len(p.views) == 4 for p in got)
    labels = [geo.classes.index(next(c for c in geo.classes if c["cell"] == p.top[0].cell)) for p in got]
    assert np.mean(np.array(labels) == pred["pred_label"].to_numpy()) >= 0.9
    assert np.allclose([p.confidence for p in got], pred["prob"].to_numpy(), atol=2e-3)
    # averaging the views' probabilities instead (what a model without a fusion does) answers differently
    geo.fusion_slots = []
    averaged = geo.predict(groups, top_k=3)
    assert not np.allclose([p.confidence for p in averaged], pred["prob"].to_numpy(), atol=2e-3)
    geo.fusion_slots = ["N", "E", "S", "W"]
    # the same through the model itself, with one view gone: masked in its slot
    model, _ = load_model(model_path)
    ds = ViewImageDataset(paths, samples, model.preprocess)
    item = ds[where[pred["id"][0]]]
    with torch.no_grad():
        ref = model.decode(item["images"][None], torch.tensor([[True, False, True, True]])).probabilities[0].numpy()
    gone = list(groups[0])
    gone[1] = str(tmp_path / "missing.jpg")
    (p,) = geo.predict([gone], top_k=3)
    assert p.error is None and len(p.dropped) == 1 and "missing.jpg" in p.dropped[0] and len(p.views) == 3
    assert p.top[0].cell == geo.classes[int(ref.argmax())]["cell"]
    assert p.confidence == pytest.approx(float(ref.max()), abs=2e-3)
    (bad,) = geo.predict([groups[0] + groups[1][:1]])
    assert bad.error and "5 views, but the model fuses at most 4 (its view slots N, E, S, W" in bad.error
    # by name: each view in its own slot whatever the order given, the missing one absent
    named = geo.predict({"W": groups[0][3], "N": groups[0][0], "S": groups[0][2]}, top_k=3)[0]
    assert named.error is None and named.top[0].cell == p.top[0].cell
    assert named.confidence == pytest.approx(p.confidence, abs=1e-6)
    (odd,) = geo.predict([{"N": groups[0][0], "up": groups[0][1]}])
    assert odd.error and "view(s) up are not among the model's slots (N, E, S, W)" in odd.error
