"""Issue 11: bad inputs give one clear error line each and lose no data (real files, real model, real server)."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_config
from geolocate.cli import app
from geolocate.config import Config, ConfigError
from geolocate.exif import read_exif
from geolocate.io import MAX_ASPECT, ImageError, check_image, write_text
from geolocate.serving import Geolocator
from geolocate.serving.server import create_app, serve_in_thread
from geolocate.sources import get_source

runner = CliRunner()
GOOD = "021_DSCN0010.jpg"  # EXIF GPS, Italy


def thin_png(path: Path, w: int = 1, h: int = 60000) -> Path:
    Image.new("RGB", (w, h), (120, 130, 140)).save(path, "PNG", optimize=True)
    return path


def one_error_line(output: str) -> None:
    assert "Traceback" not in output, output
    assert sum(1 for line in output.splitlines() if line.startswith("error:")) == 1, output


# ---- 1. thin images -----------------------------------------------------------
def test_thin_image_fails_check_image_cheaply(tmp_path):
    p = thin_png(tmp_path / "thin.png")
    assert p.stat().st_size < 1000
    with pytest.raises(ImageError, match=r"thin.png: 1x60000 pixels .*aspect ratio beyond 20:1"):
        check_image(p)
    assert check_image(thin_png(tmp_path / "ok.png", 20, 400)) == (20, 400)  # exactly 1:MAX_ASPECT is a photo
    assert MAX_ASPECT == 20


def test_folder_and_manifest_skip_thin_images(tmp_path, photos_dir):
    src = tmp_path / "photos"
    src.mkdir()
    shutil.copy(photos_dir / GOOD, src / GOOD)
    thin_png(src / "thin.png")
    cfg = tiny_config(tmp_path, **{"source.folder.path": str(src)})
    res = get_source("folder")(cfg, tmp_path / "raw")
    assert [Path(r.path).name for r in res.records] == [GOOD]
    assert [(Path(s.path).name, "aspect ratio" in s.reason) for s in res.skipped] == [("thin.png", True)]
    m = tmp_path / "m.csv"
    m.write_text(f"path,lat,lon\nphotos/{GOOD},43.46,11.88\nphotos/thin.png,1,2\n")
    cfg.source.manifest.path = str(m)
    res = get_source("manifest")(cfg, tmp_path / "raw")
    assert [Path(r.path).name for r in res.records] == [GOOD]
    assert len(res.skipped) == 1 and "aspect ratio" in res.skipped[0].reason


class _FailingPreprocess:
    """The real preprocessing, except that images thinner than 1:20 raise MemoryError (as a 224 x 13.4M px resize does)."""

    def __init__(self, real):
        self.real, self.size = real, real.size

    def load(self, source, name=None):
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
            if max(im.size) > 20 * min(im.size):
                raise MemoryError("cannot allocate 224 x 13440000 pixels")
        return self.real.load(source, name)


class _PickyEngine:
    """The real engine, except that a batch holding a pure white image fails (one input breaking a batch call)."""

    name = "picky"

    def __init__(self, real):
        self.real = real
        self.has_features, self.has_point = real.has_features, real.has_point  # the features the answer's steps read

    def run(self, batch):
        x = torch.as_tensor(batch)
        if any(bool((x[i] == x[i].max()).all()) for i in range(len(x))):
            raise RuntimeError("kernel failed on this input")
        return self.real.run(batch)

    def probabilities(self, batch):
        return self.run(batch)["probabilities"]


def test_one_failing_image_keeps_the_rest_of_the_batch(trained, photos_dir, tmp_path):
    _, _, model = trained
    geo = Geolocator.from_pretrained(model)
    expected = geo.predict([photos_dir / GOOD])[0]
    geo.preprocess = _FailingPreprocess(geo.preprocess)
    white = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(white, "PNG")
    geo.engine = _PickyEngine(geo.engine)
    thin = thin_png(tmp_path / "thin.png")
    preds = geo.predict([photos_dir / GOOD, thin, white.getvalue(), photos_dir / GOOD], batch_size=4)
    assert [p.error is None for p in preds] == [True, False, False, True]
    assert "thin.png" in preds[1].error and "MemoryError" in preds[1].error
    assert "inference failed" in preds[2].error and "RuntimeError" in preds[2].error
    for p in (preds[0], preds[3]):
        assert p.top[0].cell == expected.top[0].cell and p.confidence == pytest.approx(expected.confidence, abs=1e-5)
    # the server turns the same failure into that request's 422, and keeps serving
    with serve_in_thread(create_app(geo)) as url:
        r = httpx.post(f"{url}/predict", files={"file": ("thin.png", thin.read_bytes(), "image/png")}, timeout=60)
        assert r.status_code == 422 and "MemoryError" in r.json()["detail"]
        r = httpx.post(f"{url}/predict", files={"file": (GOOD, (photos_dir / GOOD).read_bytes(), "image/jpeg")}, timeout=60)
        assert r.status_code == 200 and r.json()["top"][0]["cell"] == expected.top[0].cell


# ---- 2. [ ] in paths ------------------------------------------------------------
def test_brackets_in_paths_are_printed_verbatim(trained, photos_dir, tmp_path):
    _, _, model = trained
    d = tmp_path / "[bold]trip["
    d.mkdir()
    good = d / "][red]a.jpg"  # the full path holds "[/]": a closing tag to rich
    shutil.copy(photos_dir / GOOD, good)
    (d / "][b]broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    r = runner.invoke(app, ["predict", str(good), "--model", str(model)])
    assert r.exit_code == 0, r.output
    assert str(good) in r.output.replace("\n", "")
    r = runner.invoke(app, ["predict", str(d), "--model", str(model)])
    assert r.exit_code == 3, r.output
    assert f"error: {d / '][b]broken.jpg'}" in r.output and "1 predicted, 1 failed" in r.output
    r = runner.invoke(app, ["build-dataset", "--source", "folder", "--path", str(d), "--set", f"paths.data_dir={tmp_path}/data"])
    assert r.exit_code == 0, r.output
    assert f"skipped: {d / '][b]broken.jpg'}:" in r.output and "1 images recorded, 1 skipped" in r.output
    r = runner.invoke(app, ["predict", str(good), "--model", str(tmp_path / "[x]" / "nope.pt")])
    assert r.exit_code == 2 and str(tmp_path / "[x]" / "nope.pt") in r.output


# ---- 3. the manifest verifies what it records ----------------------------------------
def test_manifest_records_only_regular_decodable_images(tmp_path, photos_dir):
    (tmp_path / "img").mkdir()
    shutil.copy(photos_dir / GOOD, tmp_path / "img" / "a.jpg")
    (tmp_path / "img" / "zero.jpg").write_bytes(b"")
    (tmp_path / "img" / "page.jpg").write_text("<!doctype html><html><body>404</body></html>")
    os.mkfifo(tmp_path / "img" / "fifo.jpg")
    m = tmp_path / "lists" / "m.csv"
    m.parent.mkdir()
    rows = ["../img/a.jpg", "/etc/passwd", "/proc/self/environ", "/dev/zero", "../img/zero.jpg", "../img/page.jpg",
            "../img/fifo.jpg", "../img"]
    m.write_text("path,lat,lon\n" + "".join(f"{p},43.46,11.88\n" for p in rows))
    cfg = tiny_config(tmp_path, **{"source.manifest.path": str(m)})
    res = get_source("manifest")(cfg, tmp_path / "raw")
    # relative paths resolve against the manifest's folder, not the working directory
    assert [r.path for r in res.records] == [str((tmp_path / "img" / "a.jpg").resolve())]
    reasons = {Path(s.path).name: s.reason for s in res.skipped}
    assert "not a recognised image format" in reasons["passwd"]
    assert "empty file" in reasons["environ"] and "empty file" in reasons["zero.jpg"]
    assert reasons["zero"] == reasons["fifo.jpg"] == reasons["img"] == "not a regular file"
    assert "not a recognised image format" in reasons["page.jpg"]
    recorded = (Path(cfg.paths.data_dir) / "records" / "manifest.jsonl").read_text().splitlines()
    assert len(recorded) == 1


# ---- 4. one line instead of a traceback -----------------------------------------------
def test_bad_config_files_and_overrides_are_one_line(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_bytes(b"train:\n  lr: 0.1 \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        Config.load(bad)
    r = runner.invoke(app, ["index", "--config", str(bad)])
    assert r.exit_code == 2 and "not UTF-8" in r.output
    one_error_line(r.output)
    for override in ("train.lr=[", "train.lr={a: ", "index.sources=[a, b"):
        r = runner.invoke(app, ["index", "--set", override])
        assert r.exit_code == 2 and "does not parse" in r.output, (override, r.output)
        one_error_line(r.output)


@pytest.mark.parametrize("override, message", [
    ("train.lr=.nan", "train.lr must be a finite number > 0"),
    ("train.lr=-0.1", "train.lr must be a finite number > 0"),
    ("train.lr=0", "train.lr must be a finite number > 0"),
    ("eval.knn_k=0", "eval.knn_k must be >= 1"),
    ("train.patience=-1", "train.patience"),
    ("train.warmup_epochs=-2", "train.warmup_epochs"),
    ("index.min_cell_samples=-5", "index.min_cell_samples must be >= 0"),
    ("train.epochs=100000000", "train.epochs and train.finetune_epochs must be <= 10000"),
    ("train.geo_tau_km=.inf", "train.geo_tau_km must be a finite number"),
    ("train.weight_decay=-1", "train.weight_decay"),
])
def test_nonsense_values_fail_validation(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        Config.load(None, [override])


def _model_variant(src: Path, dst: Path, change) -> Path:
    ck = torch.load(src, map_location="cpu", weights_only=True)
    change(ck)
    torch.save(ck, dst)
    return dst


def _n_classes(ck: dict) -> int:
    return ck["labels"]["num_classes"]


@pytest.mark.parametrize("name, change, message", [
    ("unknown_backbone", lambda ck: ck.update(backbone="resnet9000"), "unknown backbone 'resnet9000'"),
    ("no_head", lambda ck: ck.pop("head_state"), "no head_state"),
    ("wrong_count", lambda ck: ck["labels"].update(num_classes=_n_classes(ck) + 1, classes=ck["labels"]["classes"] + ck["labels"]["classes"][:1]),
     "weights do not fit"),
    ("short_classes", lambda ck: ck["labels"].update(classes=ck["labels"]["classes"][:-1]), "but declare"),
    ("labels_not_a_dict", lambda ck: ck.update(labels=[1, 2]), "not a labels dict"),
    ("class_without_centroid", lambda ck: ck["labels"]["classes"][0].pop("lat"), "a class without cell, lat, lon, place"),
    ("no_preprocess_size", lambda ck: ck["preprocess"].pop("size"), "no usable preprocess"),
    ("preprocess_out_of_range", lambda ck: ck["preprocess"].update(detail=ck["preprocess"]["size"] + 1), "preprocess .* is not usable"),
    ("preprocess_not_numbers", lambda ck: ck["preprocess"].update(mean="grey"), "preprocess .* is not usable"),
])
def test_wrong_model_files_are_one_line(trained, tmp_path, photos_dir, name, change, message):
    _, _, model = trained
    bad = _model_variant(model, tmp_path / f"{name}.pt", change)
    with pytest.raises(ValueError, match=message):
        Geolocator.from_pretrained(bad)
    r = runner.invoke(app, ["predict", str(photos_dir / GOOD), "--model", str(bad)])
    assert r.exit_code == 2 and message.split(" ")[0] in r.output and str(bad) in r.output.replace("\n", "")
    one_error_line(r.output)


def test_a_model_reads_its_inputs_with_the_preprocessing_it_was_trained_with(trained, tmp_path, photos_dir):
    """Not the backbone's defaults of today: a file recording other pixels (size, mean, std, low-pass, exposure)
    gets exactly those, so the head sees what it was trained on."""
    from geolocate.models import load_model

    _, _, model = trained
    base, _ = load_model(model)
    other = {"size": 192, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "detail": 64, "exposure": 0.4}
    moved = _model_variant(model, tmp_path / "other_pixels.pt", lambda ck: ck["preprocess"].update(other))
    m, info = load_model(moved)
    assert m.preprocess.to_dict() == {**other, "mean": (0.5,) * 3, "std": (0.25,) * 3} and info["preprocess"] == other
    assert base.preprocess.to_dict() != m.preprocess.to_dict()
    x = m.preprocess.batch([str(photos_dir / GOOD)])
    assert x.shape == (1, 3, 192, 192)
    # mean 0.5, std 0.25: every value lies in [-2, 2], and an image this size is not one flat colour
    assert -2.0 <= x.min() < x.max() <= 2.0 and x.std() > 0.1
    a = Geolocator.from_pretrained(model, engine="torch").predict(photos_dir / GOOD)[0]
    b = Geolocator.from_pretrained(moved, engine="torch").predict(photos_dir / GOOD)[0]
    assert a.error is None and b.error is None and a.top[0].probability != b.top[0].probability


def test_bad_last_checkpoint_on_resume_is_one_line(trained_copy):
    cfg, run_dir, _ = trained_copy
    last = run_dir / "checkpoints" / "last.pt"
    base = ["train", "--resume", str(run_dir), "--set", f"paths.data_dir={cfg.paths.data_dir}"]
    good = last.read_bytes()
    for damaged in (good[: len(good) // 2], b"not a checkpoint", None):
        if damaged is None:  # loads, but is not a training checkpoint
            torch.save({"epoch": 3}, last)
        else:
            last.write_bytes(damaged)
        r = runner.invoke(app, base)
        assert r.exit_code == 2, r.output
        assert "last.pt" in r.output and "start a new run instead" in r.output
        one_error_line(r.output)


def test_non_utf8_snapshot_manifest_is_a_problem_not_a_crash(tmp_path):
    from geolocate.serving.snapshot import MANIFEST, verify_snapshot

    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "a.txt").write_text("x")
    (snap / MANIFEST).write_bytes(b"\xff\xfe" + b"0" * 64 + b"  a.txt\n")
    report = verify_snapshot(snap)
    assert not report.ok and any("not UTF-8" in p for p in report.problems)
    r = runner.invoke(app, ["verify-snapshot", str(snap)])
    assert r.exit_code == 1 and "not UTF-8" in r.output and "Traceback" not in r.output


# ---- 5. concurrent runs -----------------------------------------------------------
def test_run_ids_are_unique_for_one_config_in_one_second():
    from geolocate.runs.experiment import new_run_id

    cfg = Config()
    ids = [new_run_id(cfg) for _ in range(200)]
    assert len(set(ids)) == 200
    assert len({i.split("_")[0][:15] for i in ids}) <= 2  # same second, still distinct


def test_promotion_is_one_locked_read_compare_write(tmp_path):
    from filelock import FileLock

    from geolocate.runs.experiment import promote_best

    models = tmp_path / "models"
    models.mkdir()
    src = tmp_path / "m.pt"
    src.write_bytes(b"model bytes")
    lock = FileLock(str(models / ".best.lock"))
    lock.acquire()
    done = threading.Event()
    t = threading.Thread(target=lambda: (promote_best(models, src, "r1", "median_km", 100.0, "fp/split"), done.set()))
    t.start()
    assert not done.wait(1.0) and not (models / "best.json").exists()  # waits for the lock holder
    lock.release()
    t.join(30)
    assert done.is_set() and json.loads((models / "best.json").read_text())["run_id"] == "r1"
    # many runs finishing together: the best value wins and every "previous" is a value that was really there
    values = [float(v) for v in np.random.default_rng(0).permutation(np.arange(50, 90))]
    results: dict[float, tuple] = {}

    def promote(v: float) -> None:
        results[v] = promote_best(models, src, f"run-{v:g}", "median_km", v, "fp/split")

    threads = [threading.Thread(target=promote, args=(v,)) for v in values]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    best = json.loads((models / "best.json").read_text())
    assert best["value"] == min(values) and best["run_id"] == f"run-{min(values):g}"
    promoted = sorted(v for v, (ok, _) in results.items() if ok)
    prevs = [results[v][1] for v in promoted]
    assert all(p is not None and p > v for v, p in zip(promoted, prevs))  # each promotion improved what it replaced


# ---- 6. model integrity ------------------------------------------------------------
def test_bit_flip_in_best_pt_is_refused(trained, tmp_path, photos_dir):
    from geolocate.runs.experiment import promote_best

    _, _, model = trained
    models = tmp_path / "models"
    promote_best(models, model, "r1", "median_km", 10.0, "fp/split")
    best = models / "best.pt"
    assert Geolocator.from_pretrained(best).predict(photos_dir / GOOD)[0].error is None
    data = bytearray(best.read_bytes())
    data[len(data) - 4000] ^= 0x40  # one bit inside the head's weights
    best.chmod(0o644)
    best.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 does not match"):
        Geolocator.from_pretrained(best)
    r = runner.invoke(app, ["predict", str(photos_dir / GOOD), "--model", str(best)])
    assert r.exit_code == 2 and "sha256 does not match" in r.output
    one_error_line(r.output)


def test_nan_weights_give_errors_never_nan(trained, tmp_path, photos_dir):
    _, _, model = trained

    def poison(ck):
        w = ck["head_state"]
        key = next(k for k in w if k.endswith("weight"))
        w[key] = torch.full_like(w[key], float("nan"))

    bad = _model_variant(model, tmp_path / "nan.pt", poison)  # no sidecar: nothing to check its sha256 against
    geo = Geolocator.from_pretrained(bad)
    preds = geo.predict([photos_dir / GOOD, photos_dir / "022_DSCN0012.jpg"])
    assert all(p.error and "non-finite" in p.error and p.confidence is None and not p.top for p in preds)
    with serve_in_thread(create_app(geo)) as url:
        r = httpx.post(f"{url}/predict", files={"file": (GOOD, (photos_dir / GOOD).read_bytes(), "image/jpeg")}, timeout=60)
    assert r.status_code == 422 and "non-finite" in r.json()["detail"]


# ---- EXIF GPS references --------------------------------------------------------------------
def _gps_jpeg(path: Path, gps: dict) -> Path:
    exif = Image.Exif()
    ifd = exif.get_ifd(0x8825)
    ifd.update(gps)
    Image.new("RGB", (64, 48), (90, 120, 60)).save(path, "JPEG", exif=exif)
    return path


SYDNEY = {2: (33.0, 52.0, 4.0), 4: (151.0, 12.0, 26.0)}


def test_exif_refs_and_minutes_are_checked(tmp_path):
    ok = read_exif(_gps_jpeg(tmp_path / "ok.jpg", {1: "S", 3: "E", **SYDNEY}))
    assert ok["lat"] == pytest.approx(-33.8678, abs=1e-3) and ok["lon"] == pytest.approx(151.2072, abs=1e-3) and ok["gps_error"] is None
    no_ref = read_exif(_gps_jpeg(tmp_path / "noref.jpg", {3: "E", **SYDNEY}))
    assert no_ref["lat"] is None and "GPSLatitudeRef is missing" in no_ref["gps_error"]
    bad_ref = read_exif(_gps_jpeg(tmp_path / "badref.jpg", {1: "S", 3: "X", **SYDNEY}))
    assert bad_ref["lat"] is None and "GPSLongitudeRef is 'X'" in bad_ref["gps_error"]
    minutes = read_exif(_gps_jpeg(tmp_path / "min.jpg", {1: "N", 3: "E", 2: (55.0, 60.0, 0.0), 4: (13.0, 11.0, 0.0)}))
    assert minutes["lat"] is None and "not valid degrees/minutes/seconds" in minutes["gps_error"]
    seconds = read_exif(_gps_jpeg(tmp_path / "sec.jpg", {1: "N", 3: "E", 2: (55.0, 42.0, 75.0), 4: (13.0, 11.0, 0.0)}))
    assert seconds["lat"] is None and seconds["gps_error"]
    cfg = tiny_config(tmp_path, **{"source.folder.path": str(tmp_path)})
    res = get_source("folder")(cfg, tmp_path / "raw")
    assert [Path(r.path).name for r in res.records] == ["ok.jpg"]
    reasons = {Path(s.path).name: s.reason for s in res.skipped}
    assert reasons["noref.jpg"].startswith("invalid EXIF GPS: GPSLatitudeRef is missing")


# ---- server -----------------------------------------------------------------------------
class _GateEngine:
    """The real engine, holding each call until the test opens the gate."""

    name = "gate"

    def __init__(self, real):
        self.real, self.entered, self.gate = real, threading.Event(), threading.Event()

    def probabilities(self, batch):
        self.entered.set()
        assert self.gate.wait(60)
        return self.real.probabilities(batch)


def test_server_queues_then_sheds_load_with_503(trained, photos_dir):
    _, _, model = trained
    geo = Geolocator.from_pretrained(model)
    geo.engine = gate = _GateEngine(geo.engine)
    data = (photos_dir / GOOD).read_bytes()
    with serve_in_thread(create_app(geo, max_inflight=1, max_queued=1)) as url:
        answers: dict = {}

        def post(key: str) -> None:
            answers[key] = httpx.post(f"{url}/predict", files={"file": (f"{key}.jpg", data)}, timeout=60)

        first = threading.Thread(target=post, args=("a",))
        first.start()
        assert gate.entered.wait(60)  # the one slot is busy inferring
        second = threading.Thread(target=post, args=("b",))
        second.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["in_flight"] < 2:  # the second waits in the queue
            assert time.monotonic() < deadline and second.is_alive()
        r = httpx.post(f"{url}/predict", files={"file": ("c.jpg", data)}, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
        gate.gate.set()
        first.join(60)
        second.join(60)
        assert answers["a"].status_code == answers["b"].status_code == 200  # queued work is done, not dropped
        assert httpx.get(f"{url}/health").json()["in_flight"] == 0
        assert httpx.post(f"{url}/predict", files={"file": ("d.jpg", data)}, timeout=60).status_code == 200


def test_server_refuses_cross_origin_posts_and_foreign_hosts(trained, photos_dir):
    _, _, model = trained
    geo = Geolocator.from_pretrained(model)
    data = (photos_dir / GOOD).read_bytes()
    with serve_in_thread(create_app(geo, allowed_hosts=["127.0.0.1", "localhost"])) as url:
        host = url.split("//")[1]
        files = {"file": ("a.jpg", data, "image/jpeg")}
        r = httpx.post(f"{url}/predict", files=files, headers={"Origin": "https://evil.example"}, timeout=60)
        assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
        assert httpx.post(f"{url}/predict", files=files, headers={"Origin": "null"}, timeout=60).status_code == 403
        assert httpx.post(f"{url}/predict", files=files, headers={"Origin": f"http://{host}"}, timeout=60).status_code == 200
        assert httpx.post(f"{url}/predict", files=files, timeout=60).status_code == 200  # curl and scripts send no Origin
        r = httpx.get(f"{url}/health", headers={"Host": "attacker.example"}, timeout=60)
        assert r.status_code == 400
        assert httpx.get(f"{url}/health", headers={"Host": host.replace("127.0.0.1", "localhost")}, timeout=60).status_code == 200


def test_server_closes_connections_that_never_finish_their_headers(trained):
    _, _, model = trained
    geo = Geolocator.from_pretrained(model)
    with serve_in_thread(create_app(geo), header_timeout_s=0.5) as url:
        host, port = url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=20) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # ... and never the rest
            t0 = time.monotonic()
            assert s.recv(1024) == b""  # the server hung up
            assert time.monotonic() - t0 < 15
        with socket.create_connection((host, int(port)), timeout=20) as s:  # a complete request is served
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert s.recv(1024).startswith(b"HTTP/1.1 200")


# ---- exit codes and the Python API ---------------------------------------------------------------------
def test_predict_exit_codes_and_api_arguments(trained, photos_dir, tmp_path):
    _, _, model = trained
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    r = runner.invoke(app, ["predict", str(photos_dir / GOOD), str(bad), "--model", str(model)])
    assert r.exit_code == 3 and "1 predicted, 1 failed" in r.output
    r = runner.invoke(app, ["predict", str(bad), "--model", str(model)])
    assert r.exit_code == 1
    r = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"})
    assert "Exit status: 0 every image predicted; 3 some failed" in r.output
    geo = Geolocator.from_pretrained(model)
    for kwargs, message in (({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
                            ({"top_k": 0}, "top_k must be a positive integer, got 0"),
                            ({"top_k": 2.5}, "top_k must be a positive integer, got 2.5")):
        with pytest.raises(ValueError, match=message):
            geo.predict([photos_dir / GOOD], **kwargs)
    with pytest.raises(ValueError, match="images is None"):
        geo.predict(None)
    preds = geo.predict([photos_dir / GOOD, None, 42])
    assert preds[0].error is None and "not an image input" in preds[1].error and "int" in preds[2].error


# ---- snapshots and file modes -------------------------------------------------------------------------------
def test_stale_snapshot_build_dirs_are_cleaned(tmp_path):
    import subprocess
    import sys

    from geolocate.serving.snapshot import STALE_TMP_S, clean_stale_tmp

    exports = tmp_path / "exports"
    exports.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    killed = exports / f".tmp-snapshot-{dead}-abc"
    (killed / "models").mkdir(parents=True)
    (killed / "models" / "best.pt").write_bytes(b"x")
    (killed / "models").chmod(0o555)  # read-only, as a half-finished snapshot is
    live = exports / f".tmp-snapshot-{os.getpid()}-def"   # this process: an export in progress
    live.mkdir()
    old = exports / ".tmp-snapshot-oldstyle"
    old.mkdir()
    os.utime(old, (time.time() - STALE_TMP_S - 60,) * 2)
    recent = exports / ".tmp-snapshot-recentstyle"
    recent.mkdir()
    keep = exports / "20260101T000000Z_run"
    keep.mkdir()
    removed = clean_stale_tmp(exports)
    assert sorted(p.name for p in removed) == sorted([killed.name, old.name])
    assert sorted(p.name for p in exports.iterdir()) == sorted([live.name, recent.name, keep.name])


def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        p = write_text(tmp_path / "a.txt", "x")
        assert p.stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        assert write_text(tmp_path / "b.txt", "y").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)


def test_help_shows_no_bool_tags_on_flags():
    for cmd in (["predict", "--help"], ["train", "--help"], ["build-dataset", "--help"]):
        r = runner.invoke(app, cmd, env={"COLUMNS": "160"})
        assert r.exit_code == 0 and "--help" in r.output
        assert "<bool>" not in r.output, r.output
    assert "<path>" in runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "160"}).output  # value types stay
