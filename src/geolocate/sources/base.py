"""The image record every source produces, the source registry, and record files.

A source turns some origin (NASA imagery, a folder of photos, a CSV manifest,
the Mapillary API) into :class:`ImageRecord` rows plus image files on disk.
Records are stored as JSON lines in ``data/records/<source>.jsonl``: written
atomically by batch sources, appended under a lock by incremental ones. The
index layer reads every records file and never looks at the origin again.
"""
from __future__ import annotations

import dataclasses as dc
import fcntl
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from ..io import write_text


@dc.dataclass
class ImageRecord:
    id: str
    path: str
    lat: float
    lon: float
    sequence_id: str
    source: str
    captured_at: str | None = None   # ISO-8601
    creator: str | None = None
    license: str | None = None
    heading: float | None = None     # compass degrees, if known
    view: str | None = None          # N/E/S/W for multi-view rows, else None

    def to_dict(self) -> dict:
        return dc.asdict(self)


RECORD_FIELDS = [f.name for f in dc.fields(ImageRecord)]


@dc.dataclass
class Skipped:
    path: str
    reason: str


@dc.dataclass
class SourceResult:
    records: list[ImageRecord]
    skipped: list[Skipped] = dc.field(default_factory=list)


class Source(Protocol):
    def __call__(self, cfg, out_dir: Path, progress: "ProgressFn | None" = None) -> SourceResult: ...


ProgressFn = Callable[[int], None]  # advance(n)
SOURCES: dict[str, Source] = {}


def register_source(name: str) -> Callable[[Source], Source]:
    def deco(fn: Source) -> Source:
        SOURCES[name] = fn
        return fn
    return deco


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}: choose one of {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def records_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "records"


def save_source_records(cfg, name: str, result: SourceResult) -> Path:
    """Replace ``data/records/<name>.jsonl`` with a batch source's records."""
    return write_records(records_dir(cfg.paths.data_dir) / f"{name}.jsonl", result.records)


def write_records(path: str | Path, records: Iterable[ImageRecord]) -> Path:
    """Replace a records file atomically."""
    return write_text(path, "".join(json.dumps(r.to_dict()) + "\n" for r in records))


def append_records(path: str | Path, records: Iterable[ImageRecord]) -> None:
    """Append records under an exclusive lock, one whole line each, fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(r.to_dict()) + "\n" for r in records).encode()
    if not payload:
        return
    with open(path, "ab") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            # a previous writer killed mid-line leaves no newline: start on a fresh line
            if fh.tell() > 0:
                with open(path, "rb") as rd:
                    rd.seek(-1, os.SEEK_END)
                    if rd.read(1) != b"\n":
                        fh.write(b"\n")
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_records(path: str | Path) -> Iterator[ImageRecord]:
    """Yield records. A line that is not a JSON record (a writer killed mid-line leaves one, possibly followed by
    later appends) is skipped with one warning naming the file and line."""
    from ..progress import console, tagged

    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
                if not isinstance(d, dict):
                    raise ValueError("not an object")
            except ValueError:
                console.print(tagged("warning", f"{path}:{lineno}: not a JSON record (torn write?); skipped"), highlight=False, soft_wrap=True)
                continue
            yield ImageRecord(**{k: d.get(k) for k in RECORD_FIELDS})
