"""Sources (earth, folder, manifest) and the index: labels, merges, sequence-aware splits."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import tiny_config
from geolocate.index import build_index, load_index, make_splits
from geolocate.index.build import assign_cells
from geolocate.index.split import assign_splits
from geolocate.sources import get_source, read_records
from geolocate.sources.base import ImageRecord, append_records
from geolocate.sources.earth import is_land, land_fraction, plan_patches


def test_land_mask_knows_the_planet():
    assert is_land(55.70, 13.19) and is_land(48.86, 2.35) and is_land(-33.87, 151.0)
    assert not is_land(40.0, -30.0) and not is_land(0.0, -140.0)  # Atlantic, Pacific
    assert land_fraction(25.0, 15.0, 220) == 1.0  # Sahara


def test_earth_is_deterministic_land_and_sequenced(tmp_path):
    cfg = tiny_config(tmp_path, **{"source.earth.count": 40, "source.earth.sequence_size": 5})
    a = plan_patches(cfg.source.earth)
    assert a == plan_patches(cfg.source.earth) and len(a) == 40
    assert len({s for _, s, *_ in a}) == 4  # 20 places (each in both renderings), 5 per sequence
    lat = np.array([p[2] for p in a])
    lon = np.array([p[3] for p in a])
    assert is_land(lat, lon).mean() > 0.8 and np.abs(lat).max() <= cfg.source.earth.max_abs_lat
    res = get_source("earth")(cfg, tmp_path / "raw")
    b = get_source("earth")(cfg, tmp_path / "raw2")
    assert [Path(r.path).read_bytes() for r in res.records] == [Path(r.path).read_bytes() for r in b.records]
    recs = list(read_records(Path(cfg.paths.data_dir) / "records" / "earth.jsonl"))
    assert len(recs) == 40 and recs[0].source == "earth" and recs[0].sequence_id == "earth-seq00000"
    # patches within a sequence stay near each other
    from geolocate.geo import haversine_km
    s0 = [r for r in recs if r.sequence_id == recs[0].sequence_id]
    assert max(haversine_km(s0[0].lat, s0[0].lon, r.lat, r.lon) for r in s0) < 2 * cfg.source.earth.sequence_spread_km + 1


def test_folder_source_on_real_photos(tmp_path, photos_dir):
    src = tmp_path / "photos"
    shutil.copytree(photos_dir, src, ignore=shutil.ignore_patterns("*.csv", "*.md"))
    (src / "notes.txt").write_text("hello")
    (src / "zero.jpg").write_bytes(b"")
    (src / "broken.jpg").write_bytes((photos_dir / "021_DSCN0010.jpg").read_bytes()[:2000])
    cfg = tiny_config(tmp_path, **{"source.folder.path": str(src)})
    res = get_source("folder")(cfg, tmp_path / "raw")
    rows = {r["file"]: r for r in csv.DictReader(open(photos_dir / "photos.csv"))}
    assert 85 <= len(res.records) <= 87
    by_name = {Path(r.path).name: r for r in res.records}
    for name, rec in by_name.items():
        assert abs(rec.lat - float(rows[name]["lat"])) < 1e-3 and abs(rec.lon - float(rows[name]["lon"])) < 1e-3
    reasons = {Path(s.path).name: s.reason for s in res.skipped}
    assert reasons["notes.txt"].startswith("not an image")
    assert "empty file" in reasons["zero.jpg"] and "truncated" in reasons["broken.jpg"]
    assert reasons["010_001.jpg"] == "no EXIF GPS position"
    # time gaps split one folder into several sequences
    assert len({r.sequence_id for r in res.records}) > 5


def test_manifest_source(tmp_path, photos_dir):
    (tmp_path / "img").mkdir()
    shutil.copy(photos_dir / "021_DSCN0010.jpg", tmp_path / "img" / "a.jpg")
    shutil.copy(photos_dir / "022_DSCN0012.jpg", tmp_path / "img" / "b.jpg")
    m = tmp_path / "m.csv"
    m.write_text("path,lat,lon,sequence_id,view\nimg/a.jpg,43.46,11.88,s1,N\nimg/b.jpg,43.46,11.88,s1,E\n"
                 "img/missing.jpg,1,2,s2,\nimg/a.jpg,95,2,s3,\n")
    cfg = tiny_config(tmp_path, **{"source.manifest.path": str(m)})
    res = get_source("manifest")(cfg, tmp_path / "raw")
    assert [(Path(r.path).name, r.sequence_id, r.view) for r in res.records] == [("a.jpg", "s1", "N"), ("b.jpg", "s1", "E")]
    # multi-view rows without sequence ids: views of one location share a sequence and keep distinct ids
    mv = tmp_path / "mv.csv"
    mv.write_text("id,path,lat,lon,view\nL1,img/a.jpg,43.46,11.88,N\nL1,img/b.jpg,43.46,11.88,E\n,img/a.jpg,10,20,S\n,img/b.jpg,10,20,W\n")
    cfg.source.manifest.path = str(mv)
    recs = get_source("manifest")(cfg, tmp_path / "raw").records
    assert [r.id for r in recs[:2]] == ["L1-N", "L1-E"] and {r.sequence_id for r in recs[:2]} == {"L1"}
    assert recs[2].sequence_id == recs[3].sequence_id == "loc-10.000000,20.000000" and recs[2].id != recs[3].id
    # ... and one group_id per location: one multi-view sample (a given sequence does not change it)
    assert [r.group_id for r in recs] == ["L1", "L1", "loc-10.000000,20.000000", "loc-10.000000,20.000000"]
    assert {r.group_id for r in res.records} == {"loc-43.460000,11.880000"}
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 nope")
    cfg.source.manifest.path = str(broken)
    with pytest.raises(ValueError, match="broken.parquet: cannot read it"):
        get_source("manifest")(cfg, tmp_path / "raw")
    cfg.source.manifest.path = str(m)
    assert sorted(s.reason.split(" ")[0] for s in res.skipped) == ["file", "invalid"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,latitude\nx,1\n")
    cfg.source.manifest.path = str(bad)
    with pytest.raises(ValueError, match="lacks column"):
        get_source("manifest")(cfg, tmp_path / "raw")


def test_append_records_survives_torn_line(tmp_path):
    p = tmp_path / "r.jsonl"
    rec = ImageRecord(id="a", path="x", lat=1.0, lon=2.0, sequence_id="s", source="t")
    append_records(p, [rec])
    with open(p, "a") as fh:
        fh.write('{"id": "torn", "pa')  # a writer killed mid-line
    append_records(p, [ImageRecord(id="b", path="y", lat=1.0, lon=2.0, sequence_id="s", source="t")])
    assert [r.id for r in read_records(p)] == ["a", "b"]
    with open(p, "a") as fh:
        fh.write("[1, 2]\n")
    assert [r.id for r in read_records(p)] == ["a", "b"]


def test_small_cells_merge_into_parent_then_drop():
    rng = np.random.default_rng(0)
    lat = np.r_[rng.normal(48.85, 0.01, 30), rng.normal(48.80, 0.3, 4), [10.0]]
    lon = np.r_[rng.normal(2.35, 0.01, 30), rng.normal(2.3, 0.3, 4), [10.0]]
    cells = assign_cells(lat, lon, 6, 5, "merge")
    import h3
    res = [h3.get_resolution(c) if c else None for c in cells]
    assert cells[-1] is None                      # a lone point is dropped at resolution 0
    assert max(r for r in res if r is not None) <= 6
    assert all(sum(c == x for x in cells) >= 5 for c in set(cells) if c)
    dropped = assign_cells(lat, lon, 6, 5, "drop")
    assert all(c is None or h3.get_resolution(c) == 6 for c in dropped)


def test_splits_are_sequence_disjoint_and_follow_ratios():
    rng = np.random.default_rng(1)
    seqs = [f"s{rng.integers(0, 400)}" for _ in range(5000)]
    m = assign_splits(seqs, [0.8, 0.15, 0.05], seed=3)
    assert assign_splits(seqs, [0.8, 0.15, 0.05], seed=3) == m
    counts = pl.Series([m[s] for s in seqs]).value_counts(sort=True)
    share = {r[0]: r[1] / len(seqs) for r in counts.iter_rows()}
    assert abs(share["train"] - 0.8) < 0.02 and abs(share["val"] - 0.15) < 0.02 and abs(share["test"] - 0.05) < 0.02


def test_index_files(trained):
    cfg, _, _ = trained
    df, labels, stats = load_index(cfg)
    idx = Path(cfg.paths.data_dir) / "index"
    for f in ("images.parquet", "splits.parquet", "labels.json", "stats.json", "coverage.png"):
        assert (idx / f).stat().st_size > 0
    # no sequence in two splits
    per_seq = df.group_by("sequence_id").agg(pl.col("split").n_unique().alias("n"))
    assert per_seq["n"].max() == 1
    assert stats["images"] == df.height and stats["cells"] == labels["num_classes"] == df["label"].n_unique()
    counts = df.group_by("label").len()["len"]
    assert stats["per_cell"]["min"] == counts.min() >= cfg.index.min_cell_samples
    assert stats["top_class_share"] == pytest.approx(counts.max() / df.height, abs=1e-4)
    import h3
    for c in labels["classes"][:5]:
        assert h3.is_valid_cell(c["cell"]) and c["place"].startswith("near ")
        assert (c["lat"], c["lon"]) == pytest.approx(h3.cell_to_latlng(c["cell"]), abs=1e-5)
    row = df.row(0, named=True)
    assert h3.latlng_to_cell(row["lat"], row["lon"], h3.get_resolution(row["cell"])) == row["cell"]


def test_index_without_records_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="build-dataset"):
        build_index(cfg)


def test_index_sources_option_selects_records(tmp_path):
    cfg = tiny_config(tmp_path, **{"source.earth.count": 30, "index.min_cell_samples": 1})
    get_source("earth")(cfg, tmp_path / "raw")
    other = Path(cfg.paths.data_dir) / "records" / "manifest.jsonl"
    append_records(other, [ImageRecord(id="m1", path="x.jpg", lat=10.0, lon=10.0, sequence_id="s", source="manifest")])
    assert build_index(cfg, plot=False)["sources"] == {"earth": 30, "manifest": 1}
    make_splits(cfg)
    assert (Path(cfg.paths.data_dir) / "index" / "splits.parquet").exists()
    cfg.index.sources = ["manifest"]
    assert build_index(cfg, plot=False)["sources"] == {"manifest": 1}
    assert not (Path(cfg.paths.data_dir) / "index" / "splits.parquet").exists()  # the old split is stale
    from geolocate.config import Config
    assert Config.load(Path(__file__).parents[1] / "configs" / "mapillary.yaml").index.sources == ["mapillary"]
