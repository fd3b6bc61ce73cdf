"""The predict CLI, `python -m geolocate.predict`, the Python API and the dataset commands, on real photos."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from geolocate import Geolocator
from geolocate.cli import app

runner = CliRunner()


def test_python_api_batch_with_exif_truth(trained, photos_dir):
    _, _, model = trained
    geo = Geolocator.from_pretrained(model)
    files = [photos_dir / "013_IMG_20180725_163423.jpg", photos_dir / "010_001.jpg", photos_dir / "068_Apple iPhone 5.jpg"]
    preds = geo.predict(files + [b"not an image"], top_k=5, batch_size=2)
    assert len(preds) == 4
    p = preds[0]
    assert len(p.top) == 5 and p.top[0].probability >= p.top[-1].probability
    assert sum(c.probability for c in p.top) <= 1.0 + 1e-6
    assert p.place.startswith("near ") and p.point in ("refined", "cell")
    if p.point == "cell":
        assert (p.lat, p.lon) == (p.top[0].lat, p.top[0].lon)
    assert p.true_lat == pytest.approx(50.2996, abs=1e-3) and p.error_km > 0       # EXIF GPS truth
    assert preds[1].true_lat is None and preds[1].error_km is None                # no GPS in that file
    assert preds[3].error and "not a recognised image format" in preds[3].error  # bad input, batch continues
    # batching does not change results
    single = geo.predict(files[0])[0]
    assert single.top[0].cell == p.top[0].cell and single.confidence == pytest.approx(p.confidence, abs=1e-5)
    assert (single.lat, single.lon) == pytest.approx((p.lat, p.lon), abs=1e-6)


def test_predict_cli_table_json_and_errors(trained, photos_dir, tmp_path):
    _, _, model = trained
    r = runner.invoke(app, ["predict", str(photos_dir / "021_DSCN0010.jpg"), "--model", str(model)])
    assert r.exit_code == 0, r.output
    assert "near " in r.output and "error" in r.output and "km" in r.output
    r = runner.invoke(app, ["predict", str(photos_dir / "010_001.jpg"), "--model", str(model), "--json",
                            "--true-lat", "55.7047", "--true-lon", "13.191"])
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["true_lat"] == 55.7047 and d["error_km"] > 0 and len(d["top"]) == 5
    # a folder with a corrupt and a non-image file: both reported, the rest predicted
    folder = tmp_path / "in"
    folder.mkdir()
    for f in ("021_DSCN0010.jpg", "022_DSCN0012.jpg"):
        shutil.copy(photos_dir / f, folder / f)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    r = runner.invoke(app, ["predict", str(folder), "--model", str(model), "--json"])
    assert r.exit_code == 3  # some inputs failed: a distinct status (0 would hide the failure)
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert len(lines) == 3 and sum(1 for x in lines if x["error"]) == 1
    assert "2 predicted, 1 failed" in r.output
    r = runner.invoke(app, ["predict", str(folder), "--model", str(tmp_path / "nope.pt")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_python_m_predict(trained, photos_dir):
    _, _, model = trained
    out = subprocess.run([sys.executable, "-m", "geolocate.predict", str(photos_dir / "022_DSCN0012.jpg"), "--model", str(model), "--json"],
                         capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["error_km"] is not None and len(d["top"]) == 5


def test_cli_dataset_commands_and_bad_config(tmp_path, photos_dir):
    base = ["--set", f"paths.data_dir={tmp_path}/data", "--set", "source.earth.count=30", "--set", "index.min_cell_samples=1",
            "--set", "index.h3_resolution=0"]
    r = runner.invoke(app, ["build-dataset", "--source", "earth", *base])
    assert r.exit_code == 0 and "earth: 30 images recorded" in r.output
    r = runner.invoke(app, ["build-dataset", "--source", "folder", "--path", str(photos_dir), *base])
    assert r.exit_code == 0 and "skipped" in r.output and "no EXIF GPS position" in r.output
    r = runner.invoke(app, ["index", *base])
    assert r.exit_code == 0 and "index:" in r.output
    stats = json.loads((tmp_path / "data" / "index" / "stats.json").read_text())
    assert stats["sources"]["earth"] == 30 and stats["sources"]["folder"] >= 85
    r = runner.invoke(app, ["split", *base])
    assert r.exit_code == 0 and "train" in r.output
    r = runner.invoke(app, ["index", "--set", "index.h3_resolutoin=3"])
    assert r.exit_code == 2 and "valid keys at index: h3_resolution" in r.output
    r = runner.invoke(app, ["build-dataset", "--source", "flickr", *base])
    assert r.exit_code == 2 and "unknown source 'flickr'" in r.output


def test_evaluate_command_matches_run_summary(trained):
    cfg, run_dir, model = trained
    r = runner.invoke(app, ["evaluate", "--model", str(model), "--split", "test", "--json", "--set", f"paths.data_dir={cfg.paths.data_dir}"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout[r.stdout.index("{"):])
    s = json.loads((run_dir / "summary.json").read_text())["metrics"]["test"]
    assert m["n"] == s["n"]
    # image -> prediction through the predictor reproduces the run's cached-embedding evaluation
    assert m["median_km"] == pytest.approx(s["median_km"], rel=1e-3)
    assert m["top1_acc"] == pytest.approx(s["top1_acc"], abs=1e-9)


def test_evaluate_skips_unreadable_images(trained_copy):
    import polars as pl
    cfg, _, model = trained_copy
    df = pl.read_parquet(Path(cfg.paths.data_dir) / "index" / "images.parquet").join(
        pl.read_parquet(Path(cfg.paths.data_dir) / "index" / "splits.parquet"), on="id")
    test = df.filter(pl.col("split") == "test")
    # point two test rows of the private index copy at a missing and a corrupt file
    victim = Path(cfg.paths.data_dir) / "gone.jpg"
    bad = Path(cfg.paths.data_dir) / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    ids = test["id"].to_list()[:2]
    df2 = pl.read_parquet(Path(cfg.paths.data_dir) / "index" / "images.parquet").with_columns(
        pl.when(pl.col("id") == ids[0]).then(pl.lit(str(victim))).when(pl.col("id") == ids[1]).then(pl.lit(str(bad)))
        .otherwise(pl.col("path")).alias("path"))
    df2.write_parquet(Path(cfg.paths.data_dir) / "index" / "images.parquet")
    r = runner.invoke(app, ["evaluate", "--model", str(model), "--json", "--set", f"paths.data_dir={cfg.paths.data_dir}"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout[r.stdout.index("{"):])
    assert m["n"] == test.height - 2 and np.isfinite(m["median_km"])
    assert f"evaluated {test.height - 2} of {test.height} images" in r.output and "gone.jpg" in r.output


def test_true_latlon_needs_exactly_one_image(trained, photos_dir):
    _, _, model = trained
    r = runner.invoke(app, ["predict", str(photos_dir), "--model", str(model), "--true-lat", "1", "--true-lon", "2"])
    assert r.exit_code == 2 and "describe one image" in r.output


def test_the_cli_choices_are_the_libraries_own():
    """The typer enums of --engine and --ensemble list exactly what the predictor and the ensemble accept, so a
    new engine or method is offered (and an old one withdrawn) on the command line too."""
    from geolocate.cli.predict import Engine, EnsembleMethod
    from geolocate.serving.predictor import ENGINES
    from geolocate.tasks.combine import ENSEMBLE_METHODS

    assert [e.value for e in Engine] == list(ENGINES)
    assert [e.value for e in EnsembleMethod] == list(ENSEMBLE_METHODS)
