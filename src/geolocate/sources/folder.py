"""Any folder of photos with EXIF GPS.

Photos are used where they are (not copied). A sequence is one folder split
wherever consecutive capture times are more than ``sequence_gap_minutes``
apart; photos without a capture time form one sequence per folder. Photos
without GPS, and unreadable files, are skipped and reported by name.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from ..exif import read_exif
from ..io import ImageError, check_image, is_image_path
from .base import ImageRecord, Skipped, SourceResult, register_source, save_source_records


def stable_id(prefix: str, path: Path) -> str:
    return f"{prefix}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]}"


def scan_folder(root: Path, gap_minutes: float, progress=None) -> SourceResult:
    if not root.is_dir():
        raise FileNotFoundError(f"folder source: {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    rows, skipped = [], []
    for p in files:
        if progress:
            progress(1)
        if not is_image_path(p):
            skipped.append(Skipped(str(p), "not an image file (by extension)"))
            continue
        try:
            check_image(p)
        except ImageError as e:
            skipped.append(Skipped(str(p), str(e)))
            continue
        meta = read_exif(p)
        if meta["lat"] is None:
            skipped.append(Skipped(str(p), meta["gps_error"] or "no EXIF GPS position"))
            continue
        rows.append((p, meta))
    # sequences: per folder, split on time gaps
    records: list[ImageRecord] = []
    by_dir: dict[Path, list] = {}
    for p, meta in rows:
        by_dir.setdefault(p.parent, []).append((p, meta))
    for d, items in sorted(by_dir.items()):
        items.sort(key=lambda it: (it[1]["captured_at"] or "", str(it[0])))
        base = stable_id("seq", d)
        seq_no, prev = 0, None
        for p, meta in items:
            t = dt.datetime.fromisoformat(meta["captured_at"]) if meta["captured_at"] else None
            if prev is not None and t is not None and (t - prev).total_seconds() > gap_minutes * 60:
                seq_no += 1
            prev = t or prev
            records.append(ImageRecord(id=stable_id("img", p), path=str(p.resolve()), lat=meta["lat"], lon=meta["lon"],
                                       sequence_id=f"{base}-{seq_no}", source="folder", captured_at=meta["captured_at"],
                                       creator=meta["make"], heading=meta["heading"]))
    return SourceResult(records=records, skipped=skipped)


@register_source("folder")
def build_folder(cfg, out_dir: Path, progress=None) -> SourceResult:
    fc = cfg.source.folder
    if not fc.path:
        raise ValueError("folder source needs source.folder.path (e.g. --set source.folder.path=photos/)")
    result = scan_folder(Path(fc.path), fc.sequence_gap_minutes, progress)
    save_source_records(cfg, "folder", result)
    return result
