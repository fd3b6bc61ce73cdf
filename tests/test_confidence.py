"""Honest confidence on the tiny trained Earth model: the run's report, the model's meta, predictions, the CLI.

What is reliable on the tiny model (aerial patches, 25 epochs on frozen EfficientNet-Lite0) and asserted
here: street photos are far from every training embedding (flagged nearly always), held-out test patches
are close (flagged about as often as validation, ~1-3 %). The conformal coverage seen by the predictor
matches the run's own measurement on the same test split.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from geolocate import Geolocator
from geolocate.cli import app
from geolocate.evaluation.conformal import class_areas_km2
from geolocate.serving.confidence import Confidence
from geolocate.serving.submission import COLUMNS, validate_submission

runner = CliRunner()
PHOTO = "000_IMG_7159.jpg"
PNG = b"\x89PNG\r\n\x1a\n"


def _test_split(cfg):
    idx = Path(cfg.paths.data_dir) / "index"
    df = pl.read_parquet(idx / "images.parquet").join(pl.read_parquet(idx / "splits.parquet"), on="id")
    labels = json.loads((idx / "labels.json").read_text())
    test = df.filter(pl.col("split") == "test")
    root = Path(cfg.paths.data_dir)
    return [str(p if Path(p).is_absolute() else root / p) for p in test["path"].to_list()], test["cell"].to_list(), labels


def test_run_reports_conformal_selective_ood_and_regions(trained):
    _, run_dir, model = trained
    s = json.loads((run_dir / "summary.json").read_text())
    cf, sel, ood = s["conformal"], s["selective"], s["ood"]
    assert cf["coverage_target"] == 0.9 and cf["score"] == "aps_exclusive" and cf["split"] == "test"
    assert cf["calibration_n"] == s["dataset"]["splits"]["val"] and 0 < cf["threshold"] <= 1.0 + 1e-9
    r = cf["result"]
    assert r["n"] == s["metrics"]["test"]["n"] and 0.75 <= r["coverage"] <= 1.0   # 90 % target, ~70 test images
    assert 1 <= r["mean_cells"] <= s["dataset"]["cells"] and r["mean_area_km2"] > 0
    assert cf["targets"]["0.99"]["coverage"] >= cf["targets"]["0.5"]["coverage"]
    assert cf["targets"]["0.99"]["mean_cells"] >= cf["targets"]["0.5"]["mean_cells"]
    assert sel["thresholds"]["0"]["coverage"] == 1.0 and sel["thresholds"]["0"]["top1_acc"] == pytest.approx(s["metrics"]["test"]["top1_acc"])
    covs = [v["coverage"] for v in sel["thresholds"].values()]
    assert covs == sorted(covs, reverse=True)
    assert 0 <= ood["val_flagged"] <= 0.02 and ood["test_flagged"] <= 0.1 and ood["threshold"] > ood["test_median_score"]
    assert s["regions"]["classes"] == s["dataset"]["cells"] and 1 <= s["regions"]["count"] <= s["dataset"]["cells"]
    for table in (s["metrics"]["test"], s["baselines"]["knn"]["test"], s["baselines"]["prior"]["test"]):
        assert 0 <= table["region_wtop5"] <= 1 and 0 <= table["competition"] <= 1
    for name in ("reliability.png", "conformal_recall_area.png", "selective.png", "ood_scores.png"):
        assert (run_dir / "plots" / name).read_bytes().startswith(PNG), name
    report = (run_dir / "REPORT.md").read_text()
    assert "## Honest confidence" in report and "![reliability.png](plots/reliability.png)" in report
    assert "region weighted top-5" in report and "competition score" in report
    assert "Honest confidence" in (run_dir / "dashboard.html").read_text()
    meta = Geolocator.from_pretrained(model, engine="torch").info["meta"]
    assert meta["conformal"]["threshold"] == pytest.approx(cf["threshold"]) and meta["ood"]["threshold"] == pytest.approx(ood["threshold"])
    assert len(meta["regions"]["of_class"]) == s["dataset"]["cells"]


def test_predictions_carry_the_set_the_regions_and_the_ood_flag(trained, photos_dir):
    cfg, run_dir, model = trained
    geo = Geolocator.from_pretrained(model)
    paths, cells, labels = _test_split(cfg)
    preds = geo.predict(paths)
    assert not [p.error for p in preds if p.error]
    # the predictor's sets cover the test split as the run measured it (same threshold, same images)
    covered = np.mean([c in p.prediction_set["cells"] for p, c in zip(preds, cells)])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert covered == pytest.approx(summary["conformal"]["result"]["coverage"], abs=0.03)
    areas = dict(zip([c["cell"] for c in labels["classes"]], class_areas_km2([c["cell"] for c in labels["classes"]])))
    p = preds[0]
    ps = p.prediction_set
    assert ps["coverage"] == 0.9 and ps["size"] == len(ps["cells"]) >= 1 and ps["cells"][0] == p.top[0].cell
    assert ps["area_km2"] == pytest.approx(sum(areas[c] for c in ps["cells"]))
    assert len(p.regions) == 5 and [r.probability for r in p.regions] == sorted((r.probability for r in p.regions), reverse=True)
    assert p.regions[0].probability >= p.top[0].probability - 1e-6 and sum(r.probability for r in p.regions) <= 1 + 1e-6
    # out-of-distribution: street photos to an aerial model are flagged, held-out aerial patches are not
    street = [q for q in geo.predict(sorted(photos_dir.glob("*.jpg"))[:30]) if not q.error]
    held = [q.ood for q in preds]
    assert np.mean([q.ood for q in street]) >= 0.9 and np.mean(held) <= 0.1
    assert np.median([q.ood_score for q in street]) > geo.confidence.ood["threshold"] > np.median([q.ood_score for q in preds])
    flagged = next(q for q in street if q.ood)
    assert flagged.warning.startswith("this photo is unlike the training images") and "\n" not in flagged.warning
    assert all(q.warning is None for q in preds if not q.ood)


def test_a_set_at_coverage_one_is_every_cell(trained):
    _, _, model = trained
    info = Geolocator.from_pretrained(model, engine="torch").info
    classes = info["labels"]["classes"]
    conf = Confidence(classes, {"conformal": {"score": "aps", "coverage": 1.0, "threshold": None}})
    from geolocate.serving.predictor import Prediction

    pred = Prediction(source="x")
    probs = np.random.default_rng(0).dirichlet(np.ones(len(classes)))
    conf.annotate(pred, probs)
    assert pred.prediction_set["size"] == len(classes) and set(pred.prediction_set["cells"]) == {c["cell"] for c in classes}
    assert pred.prediction_set["area_km2"] == pytest.approx(class_areas_km2([c["cell"] for c in classes]).sum())
    assert pred.ood is None  # no OOD threshold given: no flag


def test_cli_sentence_warning_abstention_and_json(trained, photos_dir):
    _, _, model = trained
    r = runner.invoke(app, ["predict", str(photos_dir / PHOTO), "--model", str(model)])
    assert r.exit_code == 0, r.output
    assert "90% set: the photo is in" in r.output and "km²), with 90 % confidence" in r.output
    assert "regions: " in r.output and "unlike the training images" in r.output
    r = runner.invoke(app, ["predict", str(photos_dir / PHOTO), "--model", str(model), "--min-confidence", "0.99"])
    assert r.exit_code == 0 and "abstained: confidence" in r.output and "below --min-confidence 99.0%" in r.output
    r = runner.invoke(app, ["predict", str(photos_dir / PHOTO), "--model", str(model), "--json", "--min-confidence", "0.99"])
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.exit_code == 0 and d["abstained"] is True and d["ood"] is True and d["warning"]
    assert d["prediction_set"]["size"] == len(d["prediction_set"]["cells"]) and len(d["regions"]) == 5
    r = runner.invoke(app, ["predict", str(photos_dir / PHOTO), "--model", str(model), "--json", "--min-confidence", "0"])
    assert json.loads(r.stdout.strip().splitlines()[-1])["abstained"] is False
    r = runner.invoke(app, ["predict", str(photos_dir / PHOTO), "--model", str(model), "--min-confidence", "1.5"])
    assert r.exit_code == 2


def test_cli_csv_is_validated_and_never_overwritten_without_force(trained, photos_dir, tmp_path):
    _, _, model = trained
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["021_DSCN0010.jpg", "022_DSCN0012.jpg", "010_001.jpg"]
    for f in names:
        shutil.copy(photos_dir / f, folder / f)
    out = tmp_path / "answer.csv"
    r = runner.invoke(app, ["predict", str(folder), "--model", str(model), "--csv", str(out)])
    assert r.exit_code == 0, r.output
    assert validate_submission(out, 3) == 3 and f"wrote {out}" in r.output
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and sorted(x.split(",")[0] for x in lines[1:]) == sorted(Path(n).stem for n in names)
    before = out.read_text()
    r = runner.invoke(app, ["predict", str(folder), "--model", str(model), "--csv", str(out)])
    assert r.exit_code == 2 and "exists: give --force" in r.output and out.read_text() == before
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    r = runner.invoke(app, ["predict", str(folder), "--model", str(model), "--csv", str(out), "--force"])
    assert r.exit_code == 2 and "1 of 4 images could not be predicted" in r.output and out.read_text() == before
    (folder / "broken.jpg").unlink()
    r = runner.invoke(app, ["predict", str(folder), "--model", str(model), "--csv", str(out), "--force"])
    assert r.exit_code == 0 and validate_submission(out, 3) == 3
    # an answer file cannot abstain: the answers below --min-confidence are counted, and still written
    r = runner.invoke(app, ["predict", str(folder), "--model", str(model), "--csv", str(out), "--force", "--min-confidence", "1"])
    assert r.exit_code == 0 and validate_submission(out, 3) == 3
    assert "3 of 3 answers are below --min-confidence 100.0%" in r.output.replace("\n", " "), r.output
    r = runner.invoke(app, ["predict", str(folder), "--model", str(model), "--csv", str(out), "--force", "--min-confidence", "0"])
    assert r.exit_code == 0 and "below --min-confidence" not in r.output
    # two images with one id (a camera's folders both hold DSCN0010.jpg): refused before anything is predicted
    before = out.read_text()
    (folder / "100CAMERA").mkdir()
    shutil.copy(photos_dir / names[0], folder / "100CAMERA" / names[0])
    shutil.copy(photos_dir / names[1], folder / "100CAMERA" / (Path(names[1]).stem + ".png"))
    r = runner.invoke(app, ["predict", str(folder), "--model", str(model), "--csv", str(out), "--force"])
    assert r.exit_code == 2 and "predicted" not in r.output and out.read_text() == before, r.output
    assert f"both have id '{Path(names[0]).stem}'" in r.output and "(2 ids clash)" in r.output
    assert str(folder / "100CAMERA" / names[0]) in r.output and str(folder / names[0]) in r.output


def test_a_run_without_a_test_split_reports_on_validation(trained_copy):
    from conftest import tiny_config

    from geolocate.index import make_splits
    from geolocate.runs.experiment import run_experiment

    cfg, run_dir, _ = trained_copy
    cfg = tiny_config(run_dir.parents[1], **{"index.split_ratios": "[0.8, 0.2, 0.0]", "train.epochs": 3})
    make_splits(cfg)
    s = json.loads((run_experiment(cfg) / "summary.json").read_text())
    assert s["conformal"]["split"] == s["selective"]["split"] == "val" and s["ood"]["test_flagged"] is None
    assert s["selective"]["thresholds"]["0"]["median_km"] is None  # the answer point's errors are only kept for test
    assert s["conformal"]["result"]["n"] == s["dataset"]["splits"]["val"]
