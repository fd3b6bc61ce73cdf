"""ONNX / TorchScript exports (parity on real photos), predict --engine onnx, and immutable snapshots."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from geolocate.cli import app
from geolocate.models import load_model
from geolocate.serving import Geolocator
from geolocate.serving.export import file_sha256, load_torchscript
from geolocate.serving.snapshot import MANIFEST, SnapshotError, create_snapshot, validate_name, verify_snapshot

runner = CliRunner()
PHOTOS = ["000_IMG_7159.jpg", "013_IMG_20180725_163423.jpg", "032_HMD_Nokia_8.3_5G.jpg", "080_Nokia Lumia 800.jpg"]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The session model copied to a private folder and exported there with the CLI."""
    _, _, model_path = trained
    d = tmp_path_factory.mktemp("export")
    model = d / "model.pt"
    shutil.copy(model_path, model)
    r = runner.invoke(app, ["export-onnx", "--model", str(model), "--out", str(d / "model.onnx")])
    assert r.exit_code == 0, r.output
    assert "max |p - p_torch| = " in " ".join(r.output.split())
    r = runner.invoke(app, ["export-torchscript", "--model", str(model), "--out", str(d / "model.ts.pt"), "--no-check"])
    assert r.exit_code == 0, r.output
    return model, d / "model.onnx", d / "model.ts.pt"


@pytest.fixture(scope="module")
def reference(exported, photos_dir):
    """(model, info, preprocessed real photos, PyTorch probabilities) computed once."""
    model, info = load_model(exported[0])
    pp = model.preprocess
    x = torch.from_numpy(pp.batch([photos_dir / n for n in PHOTOS]))  # the one decode path
    with torch.inference_mode():
        ref = model.decode(x).probabilities.numpy()
    return model, info, x, ref


def test_onnx_parity_on_real_photos_dynamic_batch(exported, reference):
    model_path, onnx_path, _ = exported
    _, info, x, ref = reference
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.name == "image" and isinstance(inp.shape[0], str)  # symbolic (dynamic) batch axis
    assert [o.name for o in sess.get_outputs()] == ["logits", "probabilities", "features"]
    probs, feats = sess.run(["probabilities", "features"], {"image": x.numpy()})
    model = reference[0]
    with torch.inference_mode():
        assert np.abs(feats - model.backbone(x).numpy()).max() <= 1e-3  # the features refinement searches with
    assert probs.shape == ref.shape == (len(PHOTOS), info["labels"]["num_classes"])
    assert np.abs(probs - ref).max() <= 1e-4
    for n in (1, 3):  # other batch sizes through the same file
        out = sess.run(["probabilities"], {"image": x[:n].numpy()})[0]
        assert out.shape[0] == n and np.abs(out - ref[:n]).max() <= 1e-4
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["source_sha256"] == file_sha256(model_path)
    assert json.loads(meta["geolocate_info"])["labels"]["num_classes"] == info["labels"]["num_classes"]


def test_torchscript_parity_on_real_photos(exported, reference):
    _, _, ts_path = exported
    _, info, x, ref = reference
    ts, ts_info = load_torchscript(ts_path)
    with torch.inference_mode(), torch.jit.optimized_execution(False):  # skip the JIT's profiling passes (slow, not tested here)
        logits, probs, feats = ts(x)
        one = ts(x[:2])[1]
    assert np.abs(probs.numpy() - ref).max() <= 1e-4 and one.shape[0] == 2 and logits.shape == probs.shape
    assert feats.shape == (len(x), 1280)
    assert np.abs(one.numpy() - ref[:2]).max() <= 1e-4
    assert ts_info["labels"]["classes"] == info["labels"]["classes"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        plain = torch.jit.load(str(ts_path))  # loads without geolocate helpers too
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        assert np.abs(plain(x[:1])[1].numpy() - ref[:1]).max() <= 1e-4


def test_geolocator_onnx_engine_matches_torch_and_caches(exported, reference, photos_dir, tmp_path):
    model_path, onnx_path, _ = exported
    _, info, x, ref = reference
    shutil.copy(model_path, tmp_path / "m.pt")
    shutil.copy(onnx_path, tmp_path / "m.onnx")  # made from the same bytes: its recorded sha256 matches
    files = [photos_dir / n for n in PHOTOS]
    stamp = (tmp_path / "m.onnx").stat().st_mtime_ns
    onnx_geo = Geolocator.from_pretrained(tmp_path / "m.pt", engine="onnx")
    assert onnx_geo.engine_name == "onnx" and onnx_geo.engine.path == tmp_path / "m.onnx"
    assert (tmp_path / "m.onnx").stat().st_mtime_ns == stamp  # reused, not re-exported
    assert np.abs(onnx_geo.probabilities(x) - ref).max() <= 1e-4  # the one place the model runs, same meaning
    preds = onnx_geo.predict(files)
    cells = [c["cell"] for c in info["labels"]["classes"]]
    # the answer reads the probabilities after the model's decode-time reranking stages (if it ships any)
    ref_answer = onnx_geo._rerank(ref.astype(np.float64), onnx_geo.engine.run(x)["features"])
    for p, r in zip(preds, ref_answer):
        assert [c.cell for c in p.top] == [cells[i] for i in np.argsort(-r)[:5]]
        assert p.confidence == pytest.approx(float(r.max()), abs=1e-4)
    # an .onnx file alone serves (labels and preprocessing travel in its metadata)
    alone = Geolocator.from_pretrained(onnx_path)
    assert alone.predict(files[0])[0].top[0].cell == preds[0].top[0].cell
    # a stale .onnx (from another model) is detected and re-exported next to the model
    (tmp_path / "m.onnx").write_bytes(onnx_path.read_bytes().replace(b"source_sha256", b"source_sha25X"))
    rebuilt = Geolocator.from_pretrained(tmp_path / "m.pt", engine="onnx")
    from geolocate.serving.export import read_onnx_metadata
    assert read_onnx_metadata(tmp_path / "m.onnx")["source_sha256"] == file_sha256(tmp_path / "m.pt")
    assert np.abs(rebuilt.probabilities(x[:2]) - ref[:2]).max() <= 1e-4
    with pytest.raises(ValueError, match="unknown engine"):
        Geolocator.from_pretrained(tmp_path / "m.pt", engine="tensorrt")


def test_predict_cli_engine_onnx_equals_torch_top1(exported, photos_dir, tmp_path):
    model_path, onnx_path, _ = exported
    shutil.copy(model_path, tmp_path / "m.pt")
    shutil.copy(onnx_path, tmp_path / "m.onnx")
    files = [str(photos_dir / n) for n in PHOTOS]
    out = {}
    for engine in ("torch", "onnx"):
        r = runner.invoke(app, ["predict", *files, "--model", str(tmp_path / "m.pt"), "--json", "--engine", engine])
        assert r.exit_code == 0, r.output
        out[engine] = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert len(out["onnx"]) == len(files)
    assert [d["top"][0]["cell"] for d in out["onnx"]] == [d["top"][0]["cell"] for d in out["torch"]]
    assert all(abs(a["confidence"] - b["confidence"]) <= 1e-4 for a, b in zip(out["onnx"], out["torch"]))
    r = runner.invoke(app, ["predict", files[0], "--model", str(tmp_path / "m.pt"), "--engine", "tensorrt"])
    assert r.exit_code == 2


def _writable(p: Path) -> bool:
    return bool(p.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_snapshot_create_verify_tamper(trained_copy, exported):
    cfg, run_dir, _ = trained_copy
    models = Path(cfg.paths.models_dir)
    best = json.loads((models / "best.json").read_text())
    assert best["run_id"] == run_dir.name
    if file_sha256(models / "best.pt") == file_sha256(exported[0]):  # reuse the export (its sha matches)
        shutil.copy(exported[1], models / "best.onnx")
    snap = create_snapshot(cfg)
    exports = Path(cfg.paths.exports_dir).resolve()
    assert snap.parent == exports and snap.name.endswith("_" + run_dir.name) and snap.name[:8].isdigit()
    assert not [p for p in exports.iterdir() if p.name.startswith(".tmp")]  # the build dir was renamed away
    rid = run_dir.name
    for rel in (f"runs/{rid}/summary.json", f"runs/{rid}/config.json", f"runs/{rid}/checkpoints/model.pt",
                "data/index/images.parquet", "data/index/labels.json", "models/best.pt", "models/best.json",
                "models/best.onnx", "config.json", "SNAPSHOT.json", MANIFEST):
        assert (snap / rel).is_file(), rel
    assert not (snap / f"runs/{rid}/checkpoints/last.pt").exists()
    assert file_sha256(snap / "models/best.pt") == best["sha256"]
    all_files = [p for p in snap.rglob("*") if p.is_file()]
    assert all(not _writable(p) for p in all_files) and not _writable(snap)
    manifest = (snap / MANIFEST).read_text().splitlines()
    assert len(manifest) == len(all_files) - 1 and all(line[64:66] == "  " and not line[66:].startswith("/") for line in manifest)
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", MANIFEST], cwd=snap, check=True)
    report = verify_snapshot(snap)
    assert report.ok and report.checked == len(manifest)
    r = runner.invoke(app, ["verify-snapshot", str(snap)])
    assert r.exit_code == 0 and "OK" in r.output
    # the snapshot's ONNX file serves on its own
    assert Geolocator.from_pretrained(snap / "models" / "best.onnx").engine_name == "onnx"

    # never overwritten
    with pytest.raises(SnapshotError, match="already exists"):
        create_snapshot(cfg, name=snap.name)
    # a model is never shipped with an index it was not trained on
    stats_path = Path(cfg.paths.data_dir) / "index" / "stats.json"
    stats = json.loads(stats_path.read_text())
    stats_path.write_text(json.dumps({**stats, "fingerprint": "0123456789abcdef"}))
    with pytest.raises(SnapshotError, match="not the one the best model was trained on"):
        create_snapshot(cfg, name="mismatch")
    assert not (Path(cfg.paths.exports_dir) / "mismatch").exists()
    stats_path.write_text(json.dumps(stats))

    # tamper one byte
    victim = snap / "data" / "index" / "labels.json"
    os.chmod(victim, 0o644)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    report = verify_snapshot(snap)
    assert not report.ok and report.changed == ["data/index/labels.json"] and not report.missing and not report.extra
    r = runner.invoke(app, ["verify-snapshot", str(snap)])
    assert r.exit_code != 0 and "data/index/labels.json" in r.output and "changed" in r.output
    # a missing and an extra file are named too
    os.chmod(snap / "models", 0o755)
    (snap / "models" / "best.json").unlink()
    (snap / "models" / "notes.txt").write_text("added later")
    report = verify_snapshot(snap)
    assert report.missing == ["models/best.json"] and report.extra == ["models/notes.txt"]
    r = runner.invoke(app, ["verify-snapshot", str(snap)])
    assert r.exit_code != 0 and "models/best.json" in r.output and "models/notes.txt" in r.output


def test_verify_reports_bad_manifest_lines_and_symlinks(tmp_path):
    from geolocate.serving.snapshot import write_manifest

    snap = tmp_path / "snap"
    (snap / "a").mkdir(parents=True)
    (snap / "a" / "x.txt").write_text("x")
    (snap / "y.bin").write_bytes(b"\0\1")
    write_manifest(snap)
    assert verify_snapshot(snap).ok
    text = (snap / MANIFEST).read_text()
    (snap / MANIFEST).write_text(text + "0" * 64 + "  ../../etc/passwd\nnot a manifest line\n")
    report = verify_snapshot(snap)
    assert not report.ok and len(report.problems) == 2 and "../../etc/passwd" in report.problems[0]
    (snap / MANIFEST).write_text(text)
    (snap / "y.bin").unlink()
    (snap / "y.bin").symlink_to("/etc/hostname")
    report = verify_snapshot(snap)
    assert report.changed == ["y.bin"] and "symlink" in report.problems[0]


@pytest.mark.parametrize("name", ["..", "../evil", "a/../../evil", "/tmp/evil", "sub/dir", ".hidden", "", "a\\b", "x..y"])
def test_snapshot_names_cannot_escape(name):
    with pytest.raises(SnapshotError):
        validate_name(name)


def test_export_cli_refuses_bad_names_and_missing_model(trained_copy, tmp_path):
    cfg, _, _ = trained_copy
    sets = [f"paths.{k}={getattr(cfg.paths, k)}" for k in ("data_dir", "runs_dir", "models_dir", "exports_dir")]
    args = [a for s in sets for a in ("--set", s)]
    for bad in ("../evil", str(tmp_path / "abs")):
        r = runner.invoke(app, ["export", *args, "--name", bad])
        assert r.exit_code == 2 and "invalid snapshot name" in r.output
    assert not (Path(cfg.paths.exports_dir).parent / "evil").exists() and not (tmp_path / "abs").exists()
    assert not Path(cfg.paths.exports_dir).exists() or not any(Path(cfg.paths.exports_dir).iterdir())
    r = runner.invoke(app, ["export", "--set", f"paths.models_dir={tmp_path / 'none'}", "--set", f"paths.exports_dir={tmp_path / 'ex'}"])
    assert r.exit_code == 2 and "train a model first" in r.output
    r = runner.invoke(app, ["verify-snapshot", str(tmp_path / "nowhere")])
    assert r.exit_code != 0
