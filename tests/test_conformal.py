"""Split-conformal cell sets: the finite-sample quantile, APS / LAC scores, coverage, areas of merged cells."""
import math

import h3
import numpy as np
import pytest

from geolocate.evaluation import conformal as C
from geolocate.evaluation.calibration import softmax


def _calibrated(n, c=12, seed=0):
    """Probabilities and labels drawn from them: exchangeable, perfectly calibrated."""
    rng = np.random.default_rng(seed)
    p = softmax(rng.normal(size=(n, c)) * 1.5)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return p, y


def test_scores_by_hand():
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    assert C.nonconformity(p, [1, 2], "lac") == pytest.approx([0.7, 0.7])
    assert C.nonconformity(p, [1, 2], "aps") == pytest.approx([0.8, 0.9])  # mass ranked at or above the true cell
    assert C.class_scores(p, "aps")[0] == pytest.approx([0.5, 0.8, 1.0])
    assert C.nonconformity(p, [1, 2], "aps_exclusive") == pytest.approx([0.5, 0.6])  # mass strictly above it
    assert C.class_scores(p, "aps_exclusive")[0] == pytest.approx([0.0, 0.5, 0.8])    # the top-1 scores 0
    with pytest.raises(ValueError, match="conformal score must be one of aps, aps_exclusive, lac"):
        C.nonconformity(p, [0, 0], "raps")


def test_the_exclusive_score_does_not_over_cover_confident_models():
    """A confident model (the top-1 often right with a high probability): the inclusive score counts those images
    uncovered in calibration, the forced top-1 covers them at test time, so its sets over-cover; the exclusive
    score lands on the target."""
    rng = np.random.default_rng(5)
    n, c = 6000, 30
    z = rng.normal(size=(n, c))
    z[:, 0] += rng.uniform(2, 7, n)
    p = softmax(z)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)   # labels drawn from p: p is calibrated
    cal, test = slice(0, n // 2), slice(n // 2, n)
    got = {}
    for score in ("aps", "aps_exclusive"):
        t = C.calibrate(p[cal], y[cal], 0.9, score)
        got[score] = C.set_summary(C.prediction_sets(p[test], t, score), y[test], np.ones(c))["coverage"]
    assert abs(got["aps_exclusive"] - 0.9) < 0.02 and got["aps"] > got["aps_exclusive"] + 0.02, got


def test_threshold_is_the_finite_sample_quantile():
    s = np.arange(1, 10) / 10.0                 # 9 scores 0.1..0.9
    assert C.conformal_threshold(s, 0.5) == pytest.approx(0.5)   # ceil(10 * 0.5) = 5th smallest
    assert C.conformal_threshold(s, 0.9) == pytest.approx(0.9)   # ceil(10 * 0.9) = 9th = the largest
    assert C.conformal_threshold(s, 0.95) == math.inf            # rank 10 > 9: no finite threshold
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"coverage must be in \(0, 1\]"):
            C.conformal_threshold(s, bad)
    with pytest.raises(ValueError, match="validation split is empty"):
        C.conformal_threshold([], 0.9)


@pytest.mark.parametrize("score", C.SCORES)
def test_coverage_one_is_every_cell(score):
    p, y = _calibrated(200)
    t = C.calibrate(p, y, 1.0, score)
    assert t == math.inf
    assert C.prediction_sets(p, t, score).all() and C.prediction_sets(p, None, score).all()


@pytest.mark.parametrize("score", C.SCORES)
def test_sets_reach_the_target_coverage_on_fresh_data_and_keep_the_top_cell(score):
    cal_p, cal_y = _calibrated(2000, seed=1)
    test_p, test_y = _calibrated(4000, seed=2)
    areas = np.ones(cal_p.shape[1])
    for target in (0.5, 0.8, 0.9):
        t = C.calibrate(cal_p, cal_y, target, score)
        mask = C.prediction_sets(test_p, t, score)
        r = C.set_summary(mask, test_y, areas)
        assert target - 0.03 <= r["coverage"] <= target + 0.1, (score, target, r)  # valid; APS + the top cell over-covers a little
        assert mask[np.arange(len(mask)), test_p.argmax(1)].all()       # never empty: the top cell is in
        assert r["mean_area_km2"] == pytest.approx(r["mean_cells"])      # unit areas
    sizes = [C.set_summary(C.prediction_sets(test_p, C.calibrate(cal_p, cal_y, c, score), score), None, areas)["mean_cells"]
             for c in (0.5, 0.8, 0.9, 0.99)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_areas_of_merged_cells_exclude_their_finer_classes():
    child = h3.latlng_to_cell(55.7, 13.2, 2)
    parent = h3.cell_to_parent(child, 1)
    grand = h3.cell_to_parent(child, 0)
    other = h3.latlng_to_cell(-33.9, 18.4, 1)
    areas = C.class_areas_km2([grand, parent, child, other])
    a = {c: h3.cell_area(c, unit="km^2") for c in (grand, parent, child, other)}
    assert areas[2] == pytest.approx(a[child]) and areas[3] == pytest.approx(a[other])
    assert areas[1] == pytest.approx(a[parent] - a[child])
    assert areas[0] == pytest.approx(a[grand] - a[parent])       # the parent's full cell, child included, is not the grand's
    assert areas.sum() == pytest.approx(a[grand] + a[other])


def test_area_to_cover_and_operating_points():
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]])
    areas = np.array([10.0, 20.0, 40.0])
    assert C.area_to_cover(p, [1, 2], areas) == pytest.approx([30.0, 40.0])
    rows = C.operating_points(p, [0, 2], p, [0, 2], areas, "lac", coverages=(0.5, 1.0))
    assert rows[-1]["threshold"] is None and rows[-1]["coverage"] == 1.0 and rows[-1]["mean_cells"] == 3
