"""Data that survives being moved: stored record paths, the content-keyed embedding cache, idempotent Earth
rebuilds, the fast records reader, merged-class anchors and per-source index counts."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import tiny_config
from geolocate.index import build_index, load_index, make_splits
from geolocate.index.build import class_anchors, collect_records, dataset_fingerprint, medoid
from geolocate.sources import get_source, read_records
from geolocate.sources.base import ImageRecord, RecordPaths, append_records, read_records_frame, write_records
from geolocate.training import embeddings as E


def _rec(rid: str, path, lat=10.0, lon=20.0, source="t") -> ImageRecord:
    return ImageRecord(id=rid, path=str(path), lat=lat, lon=lon, sequence_id=f"s-{rid}", source=source)


def _jpeg(path: Path, shade: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (shade, 255 - shade, 90)).save(path, format="JPEG")
    return path


def test_records_store_paths_relative_to_the_data_dir(tmp_path):
    data = tmp_path / "ws" / "data"
    inside = _jpeg(data / "raw" / "x" / "a.jpg", 10)
    outside = _jpeg(tmp_path / "photos" / "b.jpg", 20)
    rfile = data / "records" / "t.jsonl"
    write_records(rfile, [_rec("a", inside), _rec("b", outside)])
    append_records(rfile, [_rec("c", data / "raw" / "x" / "c.jpg")])
    stored = [json.loads(line)["path"] for line in rfile.read_text().splitlines()]
    assert stored == ["raw/x/a.jpg", str(outside), "raw/x/c.jpg"]
    assert [r.path for r in read_records(rfile)] == [str(inside), str(outside), str(data / "raw" / "x" / "c.jpg")]
    shutil.move(tmp_path / "ws", tmp_path / "moved")     # the records of a moved checkout name its own files
    moved = tmp_path / "moved" / "data"
    assert [r.path for r in read_records(moved / "records" / "t.jsonl")][:2] == [str(moved / "raw" / "x" / "a.jpg"), str(outside)]
    rp = RecordPaths.of(moved)
    assert rp.resolve(rp.store(str(moved / "raw" / "q.jpg"))) == str(moved / "raw" / "q.jpg") and rp.store("rel/q.jpg") == "rel/q.jpg"


def test_fast_records_reader_matches_the_line_reader_and_warns_per_bad_line(tmp_path, capsys):
    p = tmp_path / "data" / "records" / "t.jsonl"
    append_records(p, [_rec("a", "raw/a.jpg"), _rec("b", "/abs/b.jpg")])
    good = read_records_frame(p)
    assert good["id"].to_list() == ["a", "b"] and good["path"].to_list() == ["raw/a.jpg", "/abs/b.jpg"]
    assert good.schema["lat"] == pl.Float64 and good["heading"].null_count() == 2
    assert capsys.readouterr().err == ""
    with open(p, "a") as fh:
        fh.write('{"id": "torn", "pa')                  # a writer killed mid-line, then more appends
    append_records(p, [_rec("c", "raw/c.jpg")])
    with open(p, "a") as fh:
        fh.write("[1, 2]\n\n")
    df = read_records_frame(p)
    assert df["id"].to_list() == ["a", "b", "c"] and df.schema == good.schema
    err = capsys.readouterr().err
    assert err.count("not a JSON record") == 2 and "t.jsonl:3" in err and "t.jsonl:5" in err
    assert [r.id for r in read_records(p)] == ["a", "b", "c"]


def test_index_stores_portable_paths_and_flags_records_of_a_moved_checkout(tmp_path, capsys):
    root = tmp_path / "ws"
    cfg = tiny_config(root, **{"index.min_cell_samples": 1})
    data = Path(cfg.paths.data_dir)
    img = _jpeg(data / "raw" / "t" / "a.jpg", 30)
    photo = _jpeg(tmp_path / "photos" / "p.jpg", 40)
    # a records file of an older version: absolute paths, one under this data dir, one of another checkout
    rfile = data / "records" / "t.jsonl"
    rfile.parent.mkdir(parents=True)
    old = [_rec("a", img), _rec("p", photo), _rec("gone", tmp_path / "old-checkout" / "data" / "raw" / "t" / "g.jpg")]
    rfile.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in old))
    build_index(cfg)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "1 t records point at missing files" in err and "g.jpg" in err
    stored = dict(pl.read_parquet(data / "index" / "images.parquet").select("id", "path").iter_rows())
    assert stored == {"a": "raw/t/a.jpg", "p": str(photo), "gone": old[2].path}
    shutil.move(root, tmp_path / "moved")
    df, _, _ = load_index(tiny_config(tmp_path / "moved"))
    paths = dict(df.select("id", "path").iter_rows())
    assert paths["a"] == str(tmp_path / "moved" / "data" / "raw" / "t" / "a.jpg") and Path(paths["a"]).is_file()
    assert paths["p"] == str(photo)


def test_earth_rebuild_leaves_identical_patches_alone(tmp_path):
    cfg = tiny_config(tmp_path, **{"source.earth.count": 12})
    out = tmp_path / "data" / "raw" / "earth"
    first = get_source("earth")(cfg, out).records
    before = {r.path: os.stat(r.path).st_mtime_ns for r in first}
    victim = Path(first[0].path)
    victim.write_bytes(b"not the patch")                     # a damaged patch is rewritten, the rest are not
    again = get_source("earth")(cfg, out).records
    assert [r.path for r in again] == [r.path for r in first]
    after = {r.path: os.stat(r.path).st_mtime_ns for r in again}
    assert {p for p in before if after[p] != before[p]} == {str(victim)}
    assert victim.read_bytes()[:2] == b"\xff\xd8"


@pytest.fixture()
def small_cnn():
    import torch

    from geolocate.models.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone("small_cnn", pretrained=False)


def _spy_embed(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real = E.embed_paths

    def spy(backbone, paths, *a, **kw):
        calls.append(list(paths))
        return real(backbone, paths, *a, **kw)

    monkeypatch.setattr(E, "embed_paths", spy)
    return calls


def test_embedding_cache_is_keyed_by_content(tmp_path, small_cnn, monkeypatch):
    calls = _spy_embed(monkeypatch)
    ws = tmp_path / "ws"
    paths = [str(_jpeg(ws / f"{i}.jpg", 40 * i)) for i in range(4)]
    ids = [f"i{i}" for i in range(4)]
    cache = tmp_path / "cache"
    feats, ok = E.cached_embeddings(small_cnn, ids, paths, cache, engine="torch")
    assert ok.all() and [len(c) for c in calls] == [4]
    hashed: list[str] = []
    real_digest = E.content_digest
    monkeypatch.setattr(E, "content_digest", lambda p: hashed.append(p) or real_digest(p))
    # unchanged files: nothing embedded, nothing even hashed
    again, _ = E.cached_embeddings(small_cnn, ids, paths, cache, engine="torch")
    assert len(calls) == 1 and hashed == [] and np.array_equal(again, feats)
    # copied elsewhere without their mtimes: re-hashed, found by content, not re-embedded
    shutil.copytree(ws, tmp_path / "copy", copy_function=shutil.copyfile)
    shutil.rmtree(ws)
    moved = [p.replace(str(ws), str(tmp_path / "copy")) for p in paths]
    got, ok = E.cached_embeddings(small_cnn, ids, moved, cache, engine="torch")
    assert len(calls) == 1 and sorted(hashed) == sorted(moved) and np.array_equal(got, feats) and ok.all()
    # the same bytes under a new id are a hit; a changed file is embedded again; a removed file keeps its features by id
    shutil.copyfile(moved[0], tmp_path / "copy" / "dup.jpg")
    _jpeg(Path(moved[1]), 250)
    os.unlink(moved[2])
    got, ok = E.cached_embeddings(small_cnn, ids + ["dup"], moved + [str(tmp_path / "copy" / "dup.jpg")], cache, engine="torch")
    assert calls[1:] == [[moved[1]]] and ok.all()
    assert np.array_equal(got[4], feats[0]) and np.array_equal(got[2], feats[2]) and not np.array_equal(got[1], feats[1])


def test_embedding_cache_of_the_older_format_keeps_unchanged_files(tmp_path, small_cnn, monkeypatch, capsys):
    calls = _spy_embed(monkeypatch)
    paths = [str(_jpeg(tmp_path / "img" / f"{i}.jpg", 60 * i)) for i in range(3)]
    old_feats = np.arange(3 * small_cnn.num_features, dtype=np.float32).reshape(3, -1)
    cache = tmp_path / "cache" / f"{small_cnn.cache_name}.npz"
    cache.parent.mkdir()
    keys = [E.legacy_key(p) for p in paths[:2]] + ["stale-key"]   # the third file changed since it was cached
    np.savez(cache, ids=np.asarray(["a", "b", "c"]), keys=np.asarray(keys), feats=old_feats)
    feats, ok = E.cached_embeddings(small_cnn, ["a", "b", "c"], paths, cache.parent, engine="torch")
    assert ok.all() and calls == [[paths[2]]]
    assert np.array_equal(feats[:2], old_feats[:2]) and not np.array_equal(feats[2], old_feats[2])
    assert "2 entries of an older cache format kept" in capsys.readouterr().err
    from geolocate.training.store import EmbeddingStore

    store = EmbeddingStore.open(cache.parent, small_cnn.cache_name, small_cnn.num_features)  # migrated to the store
    assert sorted(store.index.ids.tolist()) == ["a", "b", "c"] and all(store.index.digests)
    E.cached_embeddings(small_cnn, ["a", "b", "c"], paths, cache.parent, engine="torch")
    assert len(calls) == 1


def test_copied_workspace_trains_on_its_own_images_with_a_warm_cache(trained, trained_copy, monkeypatch):
    """The copy of a trained workspace rebuilds its Earth data (identical bytes: nothing rewritten), re-indexes,
    re-splits and trains: every embedding comes from the cache, every image read is the copy's own."""
    from geolocate.runs.experiment import run_experiment

    cfg, _, _ = trained_copy
    original = Path(trained[0].paths.data_dir).parent
    data = Path(cfg.paths.data_dir)
    raw = sorted((data / "raw" / "earth").glob("*.jpg"))
    mtimes = [f.stat().st_mtime_ns for f in raw]
    get_source("earth")(cfg, data / "raw" / "earth")
    assert [f.stat().st_mtime_ns for f in raw] == mtimes
    build_index(cfg)
    make_splits(cfg)
    calls = _spy_embed(monkeypatch)
    seen: list[str] = []
    real_stamp = E.file_stamp
    monkeypatch.setattr(E, "file_stamp", lambda p: seen.append(p) or real_stamp(p))
    cfg.train.epochs = 3
    run_dir = run_experiment(cfg)
    assert calls == []                                   # no image embedded again
    indexed = load_index(cfg)[0]["path"].to_list()
    assert sorted(seen) == sorted(indexed) and all(Path(p).is_relative_to(data / "raw" / "earth") for p in seen)
    assert not any(str(original) + "/" in p for p in seen)
    assert json.loads((run_dir / "summary.json").read_text())["dataset"]["images"] > 0


def test_merged_classes_answer_at_the_medoid_of_their_images():
    import h3

    from geolocate.geo import haversine_km, pairwise_haversine_km
    from geolocate.index.build import assign_cells

    # resolution-0 cell 801f: a big cluster fills its centre child 811e3 (a class of its own, where the parent's
    # centroid lies); 13 stray points in two other children (9 + 4, each too small) merge back into the parent
    parent, centre = "801ffffffffffff", "811e3ffffffffff"
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 13)
    lat = np.r_[rng.normal(48.76, 0.05, 40), 54 + 2 * t]
    lon = np.r_[rng.normal(18.30, 0.05, 40), 10 + 12 * t]
    cells = assign_cells(lat, lon, 1, 10, "merge")
    classes = sorted(set(cells))
    assert classes == [parent, centre] and cells.count(parent) == 13   # numbered by cell id, as in the index
    labels = np.array([classes.index(c) for c in cells])
    merged, own = class_anchors(labels, lat, lon, classes, 1)
    assert own["anchor"] == "centroid" and (own["lat"], own["lon"]) == pytest.approx(h3.cell_to_latlng(centre))
    assert merged["anchor"] == "medoid" and (merged["lat"], merged["lon"]) == pytest.approx((55.0, 16.0))  # the middle stray
    assert h3.latlng_to_cell(*h3.cell_to_latlng(parent), 1) == centre           # the old anchor sat in the carved child
    assert haversine_km(merged["lat"], merged["lon"], *h3.cell_to_latlng(parent)) > 600
    pts_lat, pts_lon = rng.uniform(-10, 10, 60), rng.uniform(30, 50, 60)   # the medoid minimises the summed distance
    assert medoid(pts_lat, pts_lon) == int(np.argmin(pairwise_haversine_km(pts_lat, pts_lon, pts_lat, pts_lon).sum(1)))
    assert 0 <= medoid(pts_lat, pts_lon, max_points=16) < 60


def test_index_labels_carry_anchors_and_per_source_counts(tmp_path):
    from typer.testing import CliRunner

    from geolocate.cli import app

    cfg = tiny_config(tmp_path, **{"source.earth.count": 40, "source.earth.imagery": "bmng",  # 40 places, one rendering each
                                   "index.min_cell_samples": 1, "index.h3_resolution": 1})
    get_source("earth")(cfg, tmp_path / "data" / "raw" / "earth")
    photo = _jpeg(tmp_path / "photos" / "p.jpg", 70)
    append_records(tmp_path / "data" / "records" / "folder.jsonl", [_rec("p", photo, 10.0, 10.0, source="folder")])
    sets = [a for k, v in (("paths.data_dir", cfg.paths.data_dir), ("index.min_cell_samples", 6), ("index.h3_resolution", 1))
            for a in ("--set", f"{k}={v}")]
    r = CliRunner().invoke(app, ["index", *sets])
    assert r.exit_code == 0, r.output
    stats = json.loads((tmp_path / "data" / "index" / "stats.json").read_text())
    assert stats["records_per_source"] == {"earth": 40, "folder": 1}
    n_earth, n_folder = stats["sources"]["earth"], stats["sources"].get("folder", 0)
    assert f"index sources: earth {n_earth} of 40 records, folder {n_folder} of 1 records (every records file" in r.output
    r = CliRunner().invoke(app, ["index", "--source", "earth", *sets])
    assert r.exit_code == 0 and f"index sources: earth {n_earth} of 40 records (index.sources=earth)" in r.output
    assert "folder" not in r.output
    labels = json.loads((tmp_path / "data" / "index" / "labels.json").read_text())
    assert "medoid" in {c["anchor"] for c in labels["classes"]}
    assert {c["anchor"] for c in labels["classes"]} <= {"medoid", "centroid"}
    df = collect_records(cfg.paths.data_dir, ["earth"])
    for c in labels["classes"]:
        if c["anchor"] == "medoid":                     # the anchor is one of the class's own images
            assert ((df["lat"] - c["lat"]).abs().min() < 1e-6) and c["resolution"] < 1


def test_fingerprint_is_the_sorted_line_digest():
    import hashlib

    ids, cells = ["b", "a", "c"], ["x", "y", "x"]
    want = hashlib.sha256("".join(f"{i}\t{c}\n" for i, c in sorted(zip(ids, cells))).encode()).hexdigest()[:16]
    assert dataset_fingerprint(ids, cells) == want == dataset_fingerprint(pl.Series(ids), pl.Series(cells))
    assert dataset_fingerprint(ids, ["x", "y", "y"]) != want
