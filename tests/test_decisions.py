"""Selective prediction, the OOD score, region answers and the answer CSV's validator, on hand-made cases."""
import numpy as np
import pytest

from geolocate.evaluation.ood import fit_threshold, knn_distance
from geolocate.evaluation.regions import RegionSpace, competition_scores, region_metrics, weighted_topk
from geolocate.evaluation.selective import selective_curve, selective_table
from geolocate.serving.submission import COLUMNS, SubmissionError, validate_submission, write_submission


# ---- selective prediction ----------------------------------------------------------------
def test_selective_table_and_curve_by_hand():
    conf = [0.9, 0.8, 0.4, 0.2]
    correct = [True, False, True, False]
    km = [10.0, 30.0, 50.0, 1000.0]
    rows = {r["threshold"]: r for r in selective_table(conf, correct, km, thresholds=(0.0, 0.5, 0.95))}
    assert rows[0.0] == {"threshold": 0.0, "answered": 4, "coverage": 1.0, "top1_acc": 0.5, "median_km": 40.0}
    assert rows[0.5]["answered"] == 2 and rows[0.5]["top1_acc"] == 0.5 and rows[0.5]["median_km"] == 20.0
    assert rows[0.95] == {"threshold": 0.95, "answered": 0, "coverage": 0.0, "top1_acc": None, "median_km": None}
    c = selective_curve(conf, correct, km)
    assert c["coverage"] == [0.25, 0.5, 0.75, 1.0] and c["top1_acc"] == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    assert c["median_km"] == [10.0, 20.0, 30.0, 40.0]
    tied = selective_curve([0.5, 0.5, 0.1], [True, False, True], [1.0, 2.0, 3.0])
    assert tied["coverage"][0] == pytest.approx(2 / 3)  # equally confident images are answered together
    with pytest.raises(ValueError, match="differ in length"):
        selective_table([0.5], [True, False], [1.0])
    assert selective_table([0.5], [True], [float("nan")], (0.0,))[0]["median_km"] is None  # unknown errors: no median


def test_config_checks_the_confidence_keys():
    from geolocate.config import Config, ConfigError

    cfg = Config.load(None, ["eval.conformal_coverage=1.0", "eval.conformal_score=lac", "eval.ood_quantile=0.95"])
    assert (cfg.eval.conformal_coverage, cfg.eval.conformal_score, cfg.eval.ood_quantile) == (1.0, "lac", 0.95)
    for item, message in (("eval.conformal_coverage=0", r"eval.conformal_coverage must be in \(0, 1\], got 0.0"),
                          ("eval.conformal_coverage=1.2", r"eval.conformal_coverage must be in \(0, 1\]"),
                          ("eval.conformal_score=raps", "eval.conformal_score must be 'aps', 'aps_exclusive' or 'lac', got 'raps'"),
                          ("eval.ood_quantile=0", r"eval.ood_quantile must be in \(0, 1\]"),
                          ("eval.ood_neighbours=0", "eval.ood_neighbours must be >= 1, got 0")):
        with pytest.raises(ConfigError, match=message):
            Config.load(None, [item])


# ---- OOD score ------------------------------------------------------------------------------
def test_knn_cosine_distance_and_threshold():
    gallery = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    q = np.array([[3.0, 0.0], [-1.0, 0.0]])
    assert knn_distance(gallery, q, k=1) == pytest.approx([0.0, 1.0])  # (-1, 0) is orthogonal to (0, 2)
    assert knn_distance(gallery, q, k=2)[0] == pytest.approx((0 + 1 - 1 / np.sqrt(2)) / 2)
    assert knn_distance(gallery, q, k=99)[0] == pytest.approx(np.mean([0, 1, 1 - 1 / np.sqrt(2)]))  # k capped at the gallery
    assert fit_threshold(np.arange(101) / 100, 0.99) == pytest.approx(0.99)
    with pytest.raises(ValueError, match="do not match the gallery"):
        knn_distance(gallery, np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"eval.ood_quantile must be in \(0, 1\]"):
        fit_threshold([0.1], 0.0)


# ---- regions -----------------------------------------------------------------------------------
def _space():
    # classes 0, 2 in Skåne; 1 in Stockholm; 3 in Bavaria
    return RegionSpace.from_pairs([("SE/Skane", "Skane, SE"), ("SE/Stockholm", "Stockholm, SE"), ("SE/Skane", "Skane, SE"),
                                   ("DE/Bavaria", "Bavaria, DE")])


def test_region_probabilities_sum_cells_and_rank():
    rs = _space()
    assert rs.keys == ["DE/Bavaria", "SE/Skane", "SE/Stockholm"] and rs.of_class.tolist() == [1, 2, 1, 0]
    p = np.array([[0.3, 0.4, 0.2, 0.1]])
    assert rs.probabilities(p)[0] == pytest.approx([0.1, 0.5, 0.4])
    idx, prob = rs.top(p, 5)
    assert [rs.keys[i] for i in idx[0]] == ["SE/Skane", "SE/Stockholm", "DE/Bavaria"] and prob[0] == pytest.approx([0.5, 0.4, 0.1])
    assert rs.index(["SE/Stockholm", "FR/Normandy"]).tolist() == [2, -1]
    back = RegionSpace.from_dict(rs.to_dict(), 4)
    assert back.keys == rs.keys and back.of_class.tolist() == rs.of_class.tolist()
    with pytest.raises(ValueError, match="do not fit a model of 5 classes"):
        RegionSpace.from_dict(rs.to_dict(), 5)


def test_weighted_topk_and_competition_score():
    ranked = np.array([[3, 1, 4, 0, 2]] * 6)
    true = np.array([3, 1, 4, 0, 2, 9])
    assert weighted_topk(ranked, true) == pytest.approx([1, 0.6, 0.4, 0.25, 0.15, 0])
    assert weighted_topk(ranked[:2, :2], true[:2]) == pytest.approx([1, 0.6])       # fewer regions than 5
    assert competition_scores([1.0, 0.0, 0.6], [0.0, 2500.0, 9000.0]) == pytest.approx([1.0, 0.15, 0.42])


def test_region_metrics_on_real_places():
    # class anchors near Lund (Skåne) and Munich (Bavaria); the true points in Malmö (Skåne) and Munich
    rs = RegionSpace.from_points([55.70, 48.14], [13.19, 11.58])
    assert len(rs) == 2 and rs.keys[0].startswith("DE/") and rs.keys[1].startswith("SE/")
    scores = np.array([[0.9, 0.1], [0.8, 0.2]])   # image 1: Skåne first (hit at rank 1); image 2: Bavaria second
    m = region_metrics(scores, rs, [55.60, 48.14], [13.00, 11.58], np.array([0.0, 5000.0]))
    assert m["region_wtop5"] == pytest.approx((1 + 0.6) / 2)
    assert m["competition"] == pytest.approx((0.7 * 1 + 0.3 * 1 + 0.7 * 0.6 + 0) / 2)


# ---- the answer CSV ------------------------------------------------------------------------------
GOOD = ["img1", "SE/Skane", "SE/Stockholm", "DE/Bavaria", "FR/Normandy", "ES/Madrid", "55.7", "13.2"]


def _csv(tmp_path, rows, header=COLUMNS):
    p = tmp_path / "answer.csv"
    p.write_text("\n".join([",".join(header), *(",".join(r) for r in rows)]) + "\n", encoding="utf-8")
    return p


def test_validator_accepts_a_good_file(tmp_path):
    assert validate_submission(_csv(tmp_path, [GOOD, ["img2", *GOOD[1:]]]), 2) == 2


@pytest.mark.parametrize("rows, header, expected, message", [
    ([GOOD], ["id", "lat", "lon"], 1, "header is id,lat,lon, expected id,region_1"),
    ([GOOD], COLUMNS, 2, "1 rows, expected 2 (one per input image)"),
    ([GOOD[:-1]], COLUMNS, 1, "line 2 (id 'img1'): 7 fields, expected 8"),
    ([["", *GOOD[1:]]], COLUMNS, 1, "line 2: id is empty"),
    ([[*GOOD[:3], "", *GOOD[4:]]], COLUMNS, 1, "line 2 (id 'img1'): region_3 is empty"),
    ([[*GOOD[:6], "", GOOD[7]]], COLUMNS, 1, "line 2 (id 'img1'): lat is empty"),
    ([GOOD, GOOD], COLUMNS, 2, "line 3 (id 'img1'): duplicate id"),
    ([[*GOOD[:6], "north", GOOD[7]]], COLUMNS, 1, "lat 'north' is not a number"),
    ([[*GOOD[:6], "91", GOOD[7]]], COLUMNS, 1, "lat 91 is outside -90..90"),
    ([[*GOOD[:7], "-180.5"]], COLUMNS, 1, "lon -180.5 is outside -180..180"),
    ([[*GOOD[:7], "nan"]], COLUMNS, 1, "lon nan is outside -180..180"),
])
def test_validator_rejects_each_kind_of_bad_row(tmp_path, rows, header, expected, message):
    with pytest.raises(SubmissionError, match=None) as e:
        validate_submission(_csv(tmp_path, rows, header), expected)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_writer_validates_first_and_never_overwrites_without_force(tmp_path):
    out = tmp_path / "out.csv"
    good = dict(zip(COLUMNS, GOOD))
    write_submission(out, [good], 1)
    assert out.read_text().splitlines() == [",".join(COLUMNS), ",".join(GOOD)]
    with pytest.raises(SubmissionError, match="exists: give --force"):
        write_submission(out, [good], 1)
    with pytest.raises(SubmissionError, match="region_5 is empty"):
        write_submission(out, [good | {"region_5": ""}], 1, force=True)
    assert out.read_text().splitlines()[1] == ",".join(GOOD)        # the bad answer did not replace the good one
    write_submission(out, [good | {"id": "other"}], 1, force=True)
    assert out.read_text().splitlines()[1].startswith("other,")
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]      # no temporary files left
