"""``clean-raw``: free disk space once images are indexed (and trained on).

Deletes only files under ``<data_dir>/raw/`` whose rows are in
``<data_dir>/index/images.parquet`` (column ``path``). The index, records,
ledger, models, runs and exports are never touched, and the Mapillary ledger
still marks the images done, so a later download does not fetch them again.
"""
from __future__ import annotations

import dataclasses as dc
from pathlib import Path

from ..base import RecordPaths


class CleanError(RuntimeError):
    """No usable index: nothing is deleted."""


@dc.dataclass
class CleanPlan:
    index_path: Path
    files: list[Path]          # raw files to delete (resolved, under data/raw)
    bytes: int                 # bytes they hold
    indexed: int               # distinct paths in the index
    already_gone: int          # indexed raw paths with no file (cleaned before)
    outside_raw: int           # indexed paths outside data/raw: never deleted


def _resolve(p: str, data_dir: Path, raw_root: Path) -> Path:
    """A stored index path (relative to the data dir); older indexes may hold paths relative to the working dir.
    The first reading that exists wins, else the first under ``raw_root`` (a file cleaned before)."""
    stored = Path(RecordPaths.of(data_dir).resolve(p)).resolve()
    if Path(p).is_absolute():
        return stored
    cands = [stored] + [(base / p).resolve() for base in (Path.cwd(), data_dir.parent)]
    return next((c for c in cands if c.exists()), next((c for c in cands if c.is_relative_to(raw_root)), stored))


def plan_clean_raw(data_dir: str | Path) -> CleanPlan:
    import pyarrow.parquet as pq

    data_dir = Path(data_dir)
    index = data_dir / "index" / "images.parquet"
    if not index.is_file():
        raise CleanError(f"no index at {index}: build it first (`geolocate index`); nothing deleted")
    try:
        paths = pq.read_table(index, columns=["path"]).column("path").to_pylist()
    except Exception as e:  # noqa: BLE001 - any unreadable index means: delete nothing
        raise CleanError(f"cannot read the path column of {index} ({type(e).__name__}: {e}); nothing deleted") from None
    raw_root = (data_dir / "raw").resolve()
    files, total, gone, outside = [], 0, 0, 0
    unique = sorted({p for p in paths if p})
    for p in unique:
        path = _resolve(p, data_dir, raw_root)
        # resolve() follows symlinks, so a link inside raw/ pointing elsewhere counts as outside
        if not path.is_relative_to(raw_root) or path == raw_root:
            outside += 1
        elif not path.is_file():
            gone += 1
        else:
            files.append(path)
            total += path.stat().st_size
    return CleanPlan(index_path=index, files=files, bytes=total, indexed=len(unique), already_gone=gone, outside_raw=outside)


def clean_raw(data_dir: str | Path, dry_run: bool = False) -> CleanPlan:
    """Delete the planned files unless ``dry_run``; returns the plan."""
    plan = plan_clean_raw(data_dir)
    if not dry_run:
        for f in plan.files:
            f.unlink(missing_ok=True)
    return plan
