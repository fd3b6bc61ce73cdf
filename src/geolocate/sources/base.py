"""The image record every source produces, the source registry, and record files.

A source turns some origin (NASA imagery, a folder of photos, a CSV manifest,
the Mapillary API) into :class:`ImageRecord` rows plus image files on disk.
Records are stored as JSON lines in ``data/records/<source>.jsonl``: written
atomically by batch sources, appended under a lock by incremental ones. The
index layer reads every records file and never looks at the origin again.

Image paths on disk (records files, the index) are relative to the data dir
for files under it and absolute for files elsewhere (a user's photo folder),
so a copied or moved checkout reads its own images. :class:`RecordPaths` is
the one place that converts between that stored form and real paths; records
in memory always hold real (absolute) paths.
"""
from __future__ import annotations

import dataclasses as dc
import fcntl
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import polars as pl

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
    group_id: str | None = None      # the sample (one location) a multi-view row belongs to; None = a sample of its own

    def to_dict(self) -> dict:
        return dc.asdict(self)


RECORD_FIELDS = [f.name for f in dc.fields(ImageRecord)]
RECORD_SCHEMA = {k: pl.Utf8 for k in RECORD_FIELDS} | {"lat": pl.Float64, "lon": pl.Float64, "heading": pl.Float64}


@dc.dataclass(frozen=True)
class RecordPaths:
    """Stored image paths: relative (POSIX) to ``data_dir`` for files under it, absolute for the rest."""
    data_dir: Path

    @classmethod
    def of(cls, data_dir: str | Path) -> "RecordPaths":
        return cls(Path(data_dir).resolve())

    @classmethod
    def of_records_file(cls, records_file: str | Path) -> "RecordPaths":
        """Records files live in ``<data_dir>/records/``."""
        return cls.of(Path(records_file).parent.parent)

    @property
    def _prefix(self) -> str:
        return str(self.data_dir).rstrip("/") + "/"

    def store(self, path: str) -> str:
        """The stored form of a real path (a relative path is taken as stored already)."""
        if not os.path.isabs(path):
            return path
        for p in (Path(path), Path(path).resolve()):
            if p.is_relative_to(self.data_dir):
                return p.relative_to(self.data_dir).as_posix()
        return path

    def resolve(self, stored: str) -> str:
        return stored if os.path.isabs(stored) else self._prefix + stored

    def store_expr(self, col: str = "path") -> pl.Expr:
        """Vectorised :meth:`store` for paths that are already resolved (old records hold absolute paths)."""
        c = pl.col(col)
        return pl.when(c.str.starts_with(self._prefix)).then(c.str.slice(len(self._prefix))).otherwise(c).alias(col)

    def resolve_expr(self, col: str = "path") -> pl.Expr:
        c = pl.col(col)
        return pl.when(c.str.starts_with("/")).then(c).otherwise(pl.lit(self._prefix) + c).alias(col)


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
SOURCE_DOMAINS: dict[str, str] = {}  # source -> imagery domain ("aerial" or "street"): what augmentation may do


def register_source(name: str, domain: str = "street") -> Callable[[Source], Source]:
    def deco(fn: Source) -> Source:
        SOURCES[name], SOURCE_DOMAINS[name] = fn, domain
        return fn
    return deco


def source_domain(name: str) -> str:
    get_source(name)
    return SOURCE_DOMAINS[name]


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}: choose one of {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def records_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "records"


def heldout_records_dir(data_dir: str | Path) -> Path:
    """Records kept out of the index (and so out of every split): e.g. a held-out rendering, for robustness checks."""
    return Path(data_dir) / "records_heldout"


def save_source_records(cfg, name: str, result: SourceResult) -> Path:
    """Replace ``data/records/<name>.jsonl`` with a batch source's records."""
    return write_records(records_dir(cfg.paths.data_dir) / f"{name}.jsonl", result.records)


def _lines(path: str | Path, records: Iterable[ImageRecord]) -> str:
    rp = RecordPaths.of_records_file(path)
    return "".join(json.dumps(r.to_dict() | {"path": rp.store(r.path)}) + "\n" for r in records)


def write_records(path: str | Path, records: Iterable[ImageRecord]) -> Path:
    """Replace a records file atomically."""
    return write_text(path, _lines(path, records))


def append_records(path: str | Path, records: Iterable[ImageRecord]) -> None:
    """Append records under an exclusive lock, one whole line each, fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _lines(path, records).encode()
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


def read_record_dicts(path: str | Path) -> Iterator[dict]:
    """Yield each line's fields as stored. A line that is not a JSON record (a writer killed mid-line leaves one,
    possibly followed by later appends) is skipped with one warning naming the file and line."""
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
            yield {k: d.get(k) for k in RECORD_FIELDS}


def read_records(path: str | Path) -> Iterator[ImageRecord]:
    """Yield records with real paths; bad lines as in :func:`read_record_dicts`."""
    rp = RecordPaths.of_records_file(path)
    for d in read_record_dicts(path):
        if isinstance(d["path"], str):
            d["path"] = rp.resolve(d["path"])
        yield ImageRecord(**d)


def read_records_frame(path: str | Path) -> pl.DataFrame:
    """A records file as a frame (stored paths), parsed by polars in one pass; a file polars refuses (a torn
    line, a non-object line) is read line by line instead, with one warning per bad line."""
    try:
        return pl.read_ndjson(path, schema=RECORD_SCHEMA)
    except (pl.exceptions.PolarsError, ValueError):
        return pl.DataFrame(list(read_record_dicts(path)), schema=RECORD_SCHEMA)
