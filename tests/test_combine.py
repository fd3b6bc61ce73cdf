"""Evidence combination and grouping on hand-made cases (no model): geolocate.tasks.combine, serving.grouping."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from PIL import Image

from geolocate.serving.grouping import manifest_groups, time_sequences
from geolocate.tasks.combine import COMBINERS, combine, ensemble_weights, mean_features, register_combiner, same_label_space


def _probs(n: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(c), size=n).astype(np.float32)


def test_identical_rows_give_back_the_row_exactly():
    p = _probs(1, 37)
    for v in (1, 2, 3, 4, 7):
        out = combine("mean_prob", np.repeat(p, v, 0))
        assert out.dtype == np.float32 and np.array_equal(out, p[0])
    f = np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32)
    assert np.array_equal(mean_features(np.repeat(f, 3, 0)), f[0])
    # equal weights that are not 1/V are the same average
    assert np.array_equal(combine("mean_prob", np.repeat(p, 2, 0), [0.3, 0.3]), p[0])
    # rank fusion keeps the order of a lone (or repeated) member
    assert np.array_equal(np.argsort(-combine("rank", np.repeat(p, 2, 0)), kind="stable"), np.argsort(-p[0], kind="stable"))


def test_combiners_are_distributions_and_weighted_mean_is_right():
    p = _probs(3, 11, seed=2)
    for name in COMBINERS:
        out = combine(name, p)
        assert out.shape == (11,) and (out >= 0).all() and out.sum() == pytest.approx(1.0, abs=1e-6)
    w = np.array([1.0, 2.0, 1.0])
    assert combine("mean_prob", p, w) == pytest.approx((p * w[:, None]).sum(0) / 4, abs=1e-7)


def test_sum_logprob_picks_the_cell_all_frames_agree_on():
    # frame 1 is sure of cell 0, frames 2 and 3 prefer cell 1; only cell 2 is plausible in every frame
    p = np.array([[0.95, 0.00, 0.05],
                  [0.00, 0.60, 0.40],
                  [0.00, 0.60, 0.40]])
    assert combine("mean_prob", p).argmax() == 1
    agreed = combine("sum_logprob", p, floor=1e-4)
    assert agreed.argmax() == 2
    # the product of the clipped frames, renormalised: exactly what the combiner says it computes
    expect = np.prod(np.maximum(p, 1e-4), axis=0)
    assert agreed == pytest.approx(expect / expect.sum(), rel=1e-9)
    # tempering: temperature V is the geometric mean, flatter than the plain sum
    flat = combine("sum_logprob", p, floor=1e-4, temperature=3)
    assert flat.argmax() == 2 and flat.max() < agreed.max()


def test_bad_combiner_input_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown combiner 'median'"):
        combine("median", _probs(2, 3))
    with pytest.raises(ValueError, match="2 weights for 3"):
        combine("mean_prob", _probs(3, 3), [1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        combine("mean_prob", _probs(2, 3), [1, -1])
    with pytest.raises(ValueError, match="at least one row"):
        combine("mean_prob", np.zeros((0, 3)))
    with pytest.raises(ValueError, match="temperature > 0"):
        combine("sum_logprob", _probs(2, 3), temperature=0)
    with pytest.raises(ValueError, match="already registered"):
        register_combiner("mean_prob")(lambda p, w: p[0])


def test_ensemble_weights_and_label_space_check():
    metas = [{"metrics": {"val": {"median_km": 100.0, "loss": 2.0}}}, {"metrics": {"val": {"median_km": 300.0, "loss": 3.0}}}]
    assert ensemble_weights(metas, ["a", "b"], "val_median") == pytest.approx([0.75, 0.25])
    assert ensemble_weights(metas, ["a", "b"], "val_loss") == pytest.approx([np.e / (np.e + 1), 1 / (np.e + 1)])
    assert ensemble_weights(metas, ["a", "b"], None) is None
    with pytest.raises(ValueError, match="b.pt: no validation loss"):
        ensemble_weights([metas[0], {"metrics": {"val": {}}}], ["a.pt", "b.pt"], "val_loss")
    a = [{"cell": "x"}, {"cell": "y"}]
    assert same_label_space(a, [{"cell": "x"}, {"cell": "y"}]) is None
    assert same_label_space(a, [{"cell": "y"}, {"cell": "x"}]) == "class 0 is cell x vs y"
    assert same_label_space(a, a[:1]) == "2 vs 1 classes"


def test_time_sequences_split_at_gaps_and_folders(tmp_path):
    a, b = tmp_path / "drive-a", tmp_path / "drive-b"
    paths = [a / "1.jpg", a / "2.jpg", a / "3.jpg", a / "4.jpg", b / "1.jpg", a / "0.jpg", b / "2.jpg"]
    times = [100.0, 130.0, 500.0, 520.0, 110.0, None, 140.0]
    seqs, untimed = time_sequences(paths, gap_s=60, times=times)
    assert [(g.id, [p.name for p in g.paths]) for g in seqs] == [
        (f"{a}#1", ["1.jpg", "2.jpg"]), (f"{a}#2", ["3.jpg", "4.jpg"]),
        (f"{b}#1", ["1.jpg", "2.jpg"]), (str(a / "0.jpg"), ["0.jpg"])]
    assert untimed == [a / "0.jpg"]
    # a larger gap joins the two bursts of drive-a; frames come out in time order whatever the input order
    seqs, _ = time_sequences(paths[:4][::-1], gap_s=1000, times=times[:4][::-1])
    assert [[p.name for p in g.paths] for g in seqs] == [["1.jpg", "2.jpg", "3.jpg", "4.jpg"]]
    with pytest.raises(ValueError, match="gap must be >= 0"):
        time_sequences(paths, gap_s=-1, times=times)


def test_time_sequences_read_exif_capture_times(tmp_path):
    start = dt.datetime(2024, 5, 1, 12, 0, 0)
    for i, minutes in enumerate([0, 0.5, 1.0, 30, 30.5]):
        im = Image.new("RGB", (32, 32), (10 * i, 80, 120))
        exif = Image.Exif()
        exif.get_ifd(0x8769)[36867] = (start + dt.timedelta(minutes=minutes)).strftime("%Y:%m:%d %H:%M:%S")
        im.save(tmp_path / f"f{i}.jpg", exif=exif)
    Image.new("RGB", (32, 32)).save(tmp_path / "no_time.jpg")
    paths = sorted(tmp_path.glob("*.jpg"))
    seqs, untimed = time_sequences(paths, gap_s=120)
    assert [[p.name for p in g.paths] for g in seqs] == [["f0.jpg", "f1.jpg", "f2.jpg"], ["f3.jpg", "f4.jpg"], ["no_time.jpg"]]
    assert [p.name for p in untimed] == ["no_time.jpg"]


def test_manifest_groups(tmp_path):
    m = tmp_path / "groups.csv"
    m.write_text("sample_id,path,view,lat,lon\n"
                 "loc1,a/n.jpg,N,59.9,10.7\nloc1,a/e.jpg,E,59.9,10.7\nloc2,/abs/x.jpg,,,\nloc1,a/s.jpg,S,59.9,10.7\n")
    gs = manifest_groups(m)
    assert [g.id for g in gs] == ["loc1", "loc2"]
    assert gs[0].paths == [tmp_path / "a/n.jpg", tmp_path / "a/e.jpg", tmp_path / "a/s.jpg"]
    assert gs[0].views == ["N", "E", "S"] and gs[0].truth == (59.9, 10.7)
    assert gs[1].paths[0].as_posix() == "/abs/x.jpg" and gs[1].truth is None
    bad = tmp_path / "bad.csv"
    bad.write_text("file,where\nx.jpg,1\n")
    with pytest.raises(ValueError, match="needs a path column and a group column"):
        manifest_groups(bad)
    bad.write_text("group,path,lat,lon\ng,x.jpg,95,0\n")
    with pytest.raises(ValueError, match="line 2: invalid lat/lon 95.0, 0.0"):
        manifest_groups(bad)
