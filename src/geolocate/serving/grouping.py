"""Which inputs belong together at predict time: the views of one sample, the frames of one sequence.

- :func:`manifest_groups`: a CSV or parquet manifest with a ``path`` column and a group column (``group`` /
  ``sample_id`` / ``sample`` / ``id`` for multi-view samples, ``sequence_id`` / ``sequence`` for sequences), an
  optional ``view`` (N/E/S/W...) and optional ``lat``/``lon`` (the known position, to report the error).
  Relative paths are resolved against the manifest's folder, as the manifest source does.
- :func:`time_sequences`: frames grouped by folder and EXIF capture time (``geolocate.exif``): a gap longer
  than ``gap_s`` seconds between consecutive frames starts a new sequence. A frame without a capture time is a
  sequence of its own (and is listed, so the caller can say so).
"""
from __future__ import annotations

import dataclasses as dc
import datetime as dt
from pathlib import Path
from typing import Sequence

from ..geo import valid_latlon
from ..io import one_line

SAMPLE_KEYS = ("group", "sample_id", "sample", "id")
SEQUENCE_KEYS = ("sequence_id", "sequence")


@dc.dataclass
class Group:
    id: str
    paths: list[Path]
    views: list[str | None] = dc.field(default_factory=list)
    truths: list[tuple[float, float] | None] = dc.field(default_factory=list)  # per path (the manifest's lat/lon)

    @property
    def truth(self) -> tuple[float, float] | None:
        """The group's known position: the first row's that has one."""
        return next((t for t in self.truths if t is not None), None)


def manifest_groups(path: str | Path, keys: Sequence[str] = SAMPLE_KEYS) -> list[Group]:
    """Groups of a manifest in first-appearance order; a manifest that cannot be used is one ValueError line."""
    import polars as pl

    from ..sources.manifest import read_table

    path = Path(path)
    df = read_table(path)
    key = next((k for k in keys if k in df.columns), None)
    if "path" not in df.columns or key is None:
        want = " or ".join(keys)
        raise ValueError(f"manifest {path} needs a path column and a group column ({want}); it has {', '.join(df.columns)}")
    groups: dict[str, Group] = {}
    for n, row in enumerate(df.iter_rows(named=True), 2):
        gid, p = row[key], row["path"]
        if gid in (None, "") or p in (None, ""):
            raise ValueError(f"manifest {path}, line {n}: empty {key if gid in (None, '') else 'path'}")
        p = Path(str(p))
        g = groups.setdefault(str(gid), Group(str(gid), []))
        g.paths.append(p if p.is_absolute() else path.parent / p)
        g.views.append(str(row["view"]) if row.get("view") not in (None, "") else None)
        truth = None
        if row.get("lat") not in (None, "") and row.get("lon") not in (None, ""):
            try:
                lat, lon = float(row["lat"]), float(row["lon"])
            except (TypeError, ValueError):
                raise ValueError(f"manifest {path}, line {n}: lat/lon {row['lat']!r}, {row['lon']!r} are not numbers") from None
            if not valid_latlon(lat, lon):
                raise ValueError(f"manifest {path}, line {n}: invalid lat/lon {lat}, {lon}")
            truth = (lat, lon)
        g.truths.append(truth)
    return list(groups.values())


def _captured(path: Path) -> float | None:
    from ..exif import read_exif

    stamp = read_exif(path)["captured_at"]
    return dt.datetime.fromisoformat(stamp).timestamp() if stamp else None


def time_sequences(paths: Sequence[str | Path], gap_s: float = 60.0, times: Sequence[float | None] | None = None
                   ) -> tuple[list[Group], list[Path]]:
    """(sequences, frames without a capture time). Frames of different folders never share a sequence.

    ``times`` (seconds; None where unknown) replaces reading EXIF. Sequence ids are ``<folder>#<n>``; frames keep
    their time order within a sequence, sequences follow the first appearance of their folder.
    """
    if not (gap_s >= 0):
        raise ValueError(f"the sequence gap must be >= 0 seconds, got {gap_s}")
    paths = [Path(p) for p in paths]
    stamps = list(times) if times is not None else [_captured(p) for p in paths]
    if len(stamps) != len(paths):
        raise ValueError(f"{len(stamps)} capture times for {len(paths)} frames")
    by_dir: dict[Path, list[tuple[float, int]]] = {}
    untimed: list[Path] = []
    order: list[tuple[Path, int]] = []  # (folder, index of first frame) to keep input order of groups
    for i, (p, t) in enumerate(zip(paths, stamps)):
        if t is None:
            untimed.append(p)
            order.append((p, i))
            continue
        if p.parent not in by_dir:
            order.append((p.parent, i))
        by_dir.setdefault(p.parent, []).append((t, i))
    out: list[Group] = []
    for key, i in order:
        if key in by_dir:
            frames = sorted(by_dir[key])
            n, cur, last = 1, [], None
            for t, j in frames:
                if last is not None and t - last > gap_s:
                    out.append(Group(f"{key}#{n}", cur))
                    n, cur = n + 1, []
                cur.append(paths[j])
                last = t
            out.append(Group(f"{key}#{n}", cur))
        else:
            out.append(Group(str(key), [key]))
    return out, untimed
