"""Several images as one answer, with the session's tiny trained model on real pixels: multi-view samples,
sequences and ensembles through the Python API and the CLI (geolocate.tasks.combine does the arithmetic)."""
from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from geolocate import Geolocator
from geolocate.cli import app
from geolocate.tasks.combine import combine

runner = CliRunner()
PHOTO = "000_IMG_7159.jpg"    # Philadelphia, EXIF GPS
OTHER = "013_IMG_20180725_163423.jpg"


@pytest.fixture(scope="module")
def geo(trained):
    return Geolocator.from_pretrained(trained[2])


def _cells(p):
    return [(c.cell, c.probability) for c in p.top]


def test_identical_views_equal_one_view_exactly(geo, photos_dir):
    img = photos_dir / PHOTO
    fused, single = geo.predict([[img] * 4, img])
    assert fused.error is None and fused.views == [str(img)] * 4 and fused.dropped == []
    assert _cells(fused) == _cells(single)                          # the same probabilities, bit for bit
    assert (fused.lat, fused.lon, fused.point, fused.place, fused.confidence) == \
           (single.lat, single.lon, single.point, single.place, single.confidence)
    assert fused.true_lat == single.true_lat and fused.error_km == single.error_km  # EXIF truth of the views


def test_two_views_average_their_probabilities(geo, photos_dir):
    a, b = photos_dir / PHOTO, photos_dir / OTHER
    from geolocate.tasks.combine import mean_features

    fused = geo.predict([[a, b]], top_k=len(geo.classes))[0]
    out = geo.engine.run(geo.preprocess.batch([a, b]))
    pa, pb = out["probabilities"]
    # the views' mean, then the model's decode-time reranking (if it ships any) on the sample's mean features
    mean = geo._rerank(((pa.astype(np.float64) + pb) / 2)[None], mean_features(out["features"])[None])[0]
    got = {c.cell: c.probability for c in fused.top}
    assert [c.cell for c in fused.top[:3]] == [geo.classes[i]["cell"] for i in np.argsort(-mean)[:3]]
    assert [got[c["cell"]] for c in geo.classes] == pytest.approx(mean, abs=1e-6)
    assert fused.source == f"{a} + {b}"


def test_a_bad_view_is_dropped_and_named(geo, photos_dir, tmp_path):
    good, other = photos_dir / PHOTO, photos_dir / OTHER
    missing = tmp_path / "west.jpg"
    preds = geo.predict([[good, b"not a photo", missing, other], [good, other]])
    p, ref = preds
    assert p.error is None and p.views == [str(good), str(other)]
    assert len(p.dropped) == 2
    assert p.dropped[0] == "<11 bytes>: not a recognised image format"
    assert str(missing) in p.dropped[1]
    assert [c.cell for c in p.top] == [c.cell for c in ref.top]
    assert [c.probability for c in p.top] == pytest.approx([c.probability for c in ref.top], abs=1e-6)
    # every view bad: the usual error prediction, naming each view's problem; the batch goes on
    bad, ok = geo.predict([[b"", missing], good])
    assert bad.error and bad.top == [] and "none of its 2 views can be used" in bad.error and str(missing) in bad.error
    assert ok.error is None and len(ok.top) == 5


def _variant(model: Path, out: Path, swap: bool) -> Path:
    """A copy of the model file, with two classes' cells swapped (another label order) when ``swap``."""
    ck = torch.load(model, map_location="cpu", weights_only=True)
    if swap:
        cl = ck["labels"]["classes"]
        cl[0], cl[1] = cl[1], cl[0]
    torch.save(ck, out)
    return out


def test_ensemble_of_a_model_with_itself_is_the_model(trained, geo, photos_dir):
    files = [photos_dir / PHOTO, photos_dir / OTHER, photos_dir / "010_001.jpg"]
    single = geo.predict(files)
    for method in ("average", "val-median"):
        ens = Geolocator.from_pretrained([trained[2], trained[2]], ensemble=method)
        assert ens.model_card()["ensemble"]["method"] == method
        assert ens.model_card()["ensemble"]["weights"] in (None, [0.5, 0.5])
        for a, b in zip(ens.predict(files), single):
            assert _cells(a) == _cells(b) and (a.lat, a.lon, a.point) == (b.lat, b.lon, b.point)
    ranked = Geolocator.from_pretrained([trained[2], trained[2]], ensemble="rank").predict(files)
    raw = geo.engine.run(geo.preprocess.batch(files))["probabilities"]  # before any decode-time reranking (rank
    for a, p in zip(ranked, raw):                                        # scores are not probabilities to rerank)
        assert [c.cell for c in a.top] == [geo.classes[i]["cell"] for i in np.argsort(-p, kind="stable")[:len(a.top)]]
    # a multi-view sample through an ensemble still fuses its views
    fused = Geolocator.from_pretrained([trained[2], trained[2]]).predict([[files[0]] * 2])[0]
    assert [c for c, _ in _cells(fused)] == [c for c, _ in _cells(single[0])]
    assert [p for _, p in _cells(fused)] == pytest.approx([p for _, p in _cells(single[0])], rel=1e-7)  # batch of 1 vs 3


def test_models_with_other_labels_are_refused(trained, tmp_path, photos_dir):
    model = trained[2]
    other = _variant(model, tmp_path / "other.pt", swap=True)
    with pytest.raises(ValueError, match=r"label spaces differ \(class 0 is cell"):
        Geolocator.from_pretrained([model, other], engine="torch")
    with pytest.raises(ValueError, match="unknown ensemble method 'vote'"):
        Geolocator.from_pretrained([model, model], ensemble="vote")
    r = runner.invoke(app, ["predict", str(photos_dir / PHOTO), "--model", str(model), "--model", str(other), "--engine", "torch"])
    assert r.exit_code == 2 and "label spaces differ" in r.output
    # the same model file twice through the CLI answers like the model
    r1 = runner.invoke(app, ["predict", str(photos_dir / PHOTO), "--model", str(model), "--json"])
    r2 = runner.invoke(app, ["predict", str(photos_dir / PHOTO), "--model", str(model), "--model", str(model), "--json",
                             "--ensemble", "val-median"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r2.output
    a, b = json.loads(r1.stdout), json.loads(r2.stdout)
    assert a["top"] == b["top"] and (a["lat"], a["lon"]) == (b["lat"], b["lon"])


def test_cli_views_and_manifest(trained, photos_dir, tmp_path):
    model = str(trained[2])
    views = [str(photos_dir / f) for f in (PHOTO, OTHER, "010_001.jpg", "021_DSCN0010.jpg")]
    r = runner.invoke(app, ["predict", "--views", *views, "--model", model, "--json"])
    assert r.exit_code == 0, r.output
    (d,) = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert d["views"] == views and d["dropped"] == [] and len(d["top"]) == 5
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0garbage")
    r = runner.invoke(app, ["predict", "--views", views[0], str(broken), views[1], "--model", model])
    assert r.exit_code == 0, r.output
    assert "view dropped" in r.output and "broken.jpg" in r.output and "from 2 of 3 views" in r.output
    r = runner.invoke(app, ["predict", "--views", views[0], "--model", model])
    assert r.exit_code == 2 and "at least two views" in r.output
    # a manifest of groups: one answer per group, truth from its lat/lon columns
    m = tmp_path / "groups.csv"
    shutil.copy(photos_dir / PHOTO, tmp_path / "n.jpg")
    shutil.copy(photos_dir / OTHER, tmp_path / "e.jpg")
    m.write_text("group,path,view,lat,lon\nplace-1,n.jpg,N,39.95,-75.16\nplace-1,e.jpg,E,39.95,-75.16\n"
                 f"place-2,{views[2]},,,\nplace-3,gone.jpg,N,,\n")
    r = runner.invoke(app, ["predict", "--manifest", str(m), "--model", model, "--json"])
    assert r.exit_code == 3, r.output  # place-3's only view is missing: it fails, the others are predicted
    rows = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [len(x["views"]) for x in rows] == [2, 0, 0] and rows[0]["true_lat"] == 39.95 and rows[0]["error_km"] > 0
    assert rows[1]["error"] is None and rows[2]["error"] and "gone.jpg" in rows[2]["error"]
    assert "2 predicted, 1 failed" in r.output
    # as an answer CSV: one row per group, named by the group
    ok_m = tmp_path / "ok.csv"
    ok_m.write_text("\n".join(m.read_text().splitlines()[:-1]) + "\n")
    r = runner.invoke(app, ["predict", "--manifest", str(ok_m), "--model", model, "--csv", str(tmp_path / "answer.csv")])
    assert r.exit_code == 0, r.output
    assert [x.split(",")[0] for x in (tmp_path / "answer.csv").read_text().splitlines()[1:]] == ["place-1", "place-2"]
    r = runner.invoke(app, ["predict", str(photos_dir / PHOTO), "--manifest", str(m), "--model", model])
    assert r.exit_code == 2 and "not both" in r.output


def _test_sequences(cfg, n: int = 3):
    from geolocate.index.build import load_index

    df = load_index(cfg)[0].filter(pl.col("split") == "test").sort("sequence_id", "id")
    seqs = df["sequence_id"].unique(maintain_order=True).to_list()[:n]
    return [(s, [Path(p) for p in g["path"]], list(zip(g["lat"], g["lon"])))
            for s in seqs for g in [df.filter(pl.col("sequence_id") == s)]]


def test_sequence_answer_combines_its_frames(trained, geo):
    cfg = trained[0]
    seqs = _test_sequences(cfg)
    out = geo.predict_sequences(seqs, top_k=len(geo.classes), combiner="sum_logprob", combiner_params={"temperature": 2.0})
    assert [s.sequence for s in out] == [s for s, _, _ in seqs]
    for sp, (_, paths, truths) in zip(out, seqs):
        assert len(sp.frames) == len(paths) and all(f.error is None for f in sp.frames)
        from geolocate.tasks.combine import mean_features

        out_f = geo.engine.run(geo.preprocess.batch(paths))
        # the frames' evidence combined, then the model's decode-time reranking (if any) on their mean features
        expect = geo._rerank(combine("sum_logprob", out_f["probabilities"], temperature=2.0)[None],
                             mean_features(out_f["features"])[None])[0]
        got = {c.cell: c.probability for c in sp.prediction.top}
        assert sp.prediction.top[0].cell == geo.classes[int(expect.argmax())]["cell"]
        assert [got[c["cell"]] for c in geo.classes] == pytest.approx(expect, abs=1e-5)
        # each frame's own answer and its distance to the sequence's answer
        assert [f.true_lat for f in sp.frames] == [t[0] for t in truths]
        assert all(e is not None and e >= 0 for e in sp.frame_errors_km)
    # a frame that cannot be read is reported and left out; its sequence still answers
    sid, paths, truths = seqs[0]
    sp = geo.predict_sequences([(sid, [*paths, b"junk"])])[0]
    assert sp.frames[-1].error and sp.prediction.error is None and len(sp.prediction.dropped) == 1
    assert len(sp.prediction.views) == len(paths)
    assert geo.predict_sequences([("empty", [b"junk"])])[0].prediction.error == "sequence empty: none of its 1 frames can be used"


def test_cli_sequence_by_exif_time_and_by_manifest(trained, tmp_path):
    cfg, _, model = trained
    seqs = _test_sequences(cfg, 2)
    folder = tmp_path / "drive"
    folder.mkdir()
    start = dt.datetime(2024, 5, 1, 9, 0, 0)
    k = 0
    for s, (_, paths, _) in enumerate(seqs):  # two bursts an hour apart, frames 10 s apart
        for j, p in enumerate(paths):
            exif = Image.Exif()
            exif.get_ifd(0x8769)[36867] = (start + dt.timedelta(hours=s, seconds=10 * j)).strftime("%Y:%m:%d %H:%M:%S")
            with Image.open(p) as im:
                im.convert("RGB").save(folder / f"{k:03d}.jpg", exif=exif, quality=95)
            k += 1
    r = runner.invoke(app, ["predict", str(folder), "--sequence", "--sequence-gap", "300", "--model", str(model), "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [len(x["frames"]) for x in rows] == [len(p) for _, p, _ in seqs]
    assert all(x["combiner"] == "sum_logprob" and x["prediction"]["error"] is None for x in rows)
    r = runner.invoke(app, ["predict", str(folder), "--sequence", "--model", str(model)])
    assert r.exit_code == 0 and r.output.count("sequence ") >= 4 and "sum_logprob over" in r.output
    # sequence ids from a manifest, with each frame's known position
    m = tmp_path / "frames.csv"
    m.write_text("sequence_id,path,lat,lon\n" + "".join(f"{s},{p},{la},{lo}\n" for s, ps, ts in seqs for p, (la, lo) in zip(ps, ts)))
    r = runner.invoke(app, ["predict", "--manifest", str(m), "--sequence", "--model", str(model)])
    assert r.exit_code == 0, r.output
    assert "median error over its" in r.output and f"sequence {seqs[0][0]}" in r.output


def test_server_answers_with_an_ensemble(trained, geo, photos_dir):
    import httpx

    from geolocate.serving.server import create_app, serve_in_thread

    ens = Geolocator.from_pretrained([trained[2], trained[2]], ensemble="val-median")
    single = geo.predict(photos_dir / PHOTO)[0]
    with serve_in_thread(create_app(ens)) as url:
        r = httpx.post(f"{url}/predict", files={"file": (PHOTO, (photos_dir / PHOTO).read_bytes(), "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text
        d = r.json()
        assert [(c["cell"], c["probability"]) for c in d["top"]] == _cells(single)
        assert d["engine"].startswith("ensemble/val-median(")
        card = httpx.get(f"{url}/model", timeout=30).json()
        assert card["ensemble"]["members"] == [trained[2].name] * 2 and card["ensemble"]["weights"] == [0.5, 0.5]
