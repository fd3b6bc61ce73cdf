"""A CSV or parquet manifest: path, lat, lon[, sequence_id][, view][, id].

Relative paths are resolved against the manifest's folder (not the working
directory). Rows sharing a ``sequence_id`` stay in one split; multi-view rows
(``view`` = N/E/S/W, as in street-view competitions) share the sequence of their
location and its ``group_id`` (one multi-view sample). Rows with invalid coordinates, a missing or non-regular file, or a
file that does not decode as a photo (verified like the folder source does)
are skipped and reported.
"""
from __future__ import annotations

import stat
from pathlib import Path

import polars as pl

from ..geo import valid_latlon
from ..io import ImageError, check_image, one_line
from .base import ImageRecord, Skipped, SourceResult, register_source, save_source_records
from .folder import stable_id

REQUIRED = ("path", "lat", "lon")


def read_table(path: Path) -> pl.DataFrame:
    """A CSV or parquet manifest as a DataFrame; a missing or unreadable file is one error line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    try:
        return pl.read_parquet(path) if path.suffix.lower() == ".parquet" else pl.read_csv(path, infer_schema_length=10000)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise ValueError(f"manifest {path}: cannot read it ({one_line(e)})") from None


def read_manifest(path: Path) -> pl.DataFrame:
    df = read_table(path)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"manifest {path} lacks column(s) {', '.join(missing)}; it has {', '.join(df.columns)}")
    return df


def _file_problem(p: Path) -> str | None:
    """Why ``p`` cannot be recorded as an image (None when it is a regular file that decodes as a photo)."""
    try:
        st = p.stat()
    except OSError:
        return "file not found"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    try:
        check_image(p)
    except ImageError as e:
        return str(e)
    return None


@register_source("manifest")
def build_manifest(cfg, out_dir: Path, progress=None) -> SourceResult:
    if not cfg.source.manifest.path:
        raise ValueError("manifest source needs source.manifest.path (CSV or parquet)")
    mpath = Path(cfg.source.manifest.path)
    df = read_manifest(mpath)
    records, skipped = [], []
    for row in df.iter_rows(named=True):
        if progress:
            progress(1)
        p = Path(str(row["path"]))
        if not p.is_absolute():
            p = (mpath.parent / p)
        try:
            lat, lon = float(row["lat"]), float(row["lon"])
        except (TypeError, ValueError):
            skipped.append(Skipped(str(p), f"invalid coordinates lat={row['lat']!r} lon={row['lon']!r}"))
            continue
        if not valid_latlon(lat, lon):
            skipped.append(Skipped(str(p), f"invalid coordinates lat={lat} lon={lon}"))
            continue
        problem = _file_problem(p)
        if problem:
            skipped.append(Skipped(str(p), problem))
            continue
        view = str(row["view"]) if row.get("view") not in (None, "") else None
        given_id = str(row["id"]) if row.get("id") not in (None, "") else None
        # record ids are per image: views of one location (same id, or same coordinates) differ by their view
        rid = (f"{given_id}-{view}" if view else given_id) if given_id else stable_id("img", p)
        # the views of one location (its id, else its coordinates) are one multi-view sample
        group = (given_id or f"loc-{lat:.6f},{lon:.6f}") if view else None
        seq = row.get("sequence_id")
        if seq in (None, ""):
            # no sequence given: one location is one sequence, so its views stay together
            seq = group or given_id or rid
        records.append(ImageRecord(id=rid, path=str(p.resolve()), lat=lat, lon=lon, sequence_id=str(seq),
                                   source="manifest", view=view, group_id=group))
    result = SourceResult(records=records, skipped=skipped)
    save_source_records(cfg, "manifest", result)
    return result
