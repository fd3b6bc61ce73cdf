"""The resumable download ledger: ``data/state/mapillary.sqlite`` (SQLite, WAL).

One row per listed image (its metadata, never its expiring thumbnail URL) with
a status: ``listed`` (wanted, not on disk yet), ``done`` (file written,
verified, with path, bytes and sha256) or ``failed`` (retried next run). A
second table remembers which bbox tiles were listed completely, so a re-run
skips them. Only the downloader's main thread touches the connection; worker
threads hand their results back to it.
"""
from __future__ import annotations

import contextlib
import dataclasses as dc
import fcntl
import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Iterator

from ..base import ImageRecord

SCHEMA_VERSION = "1"
LICENSE = "CC-BY-SA-4.0"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id          TEXT PRIMARY KEY,
    area        TEXT NOT NULL,
    lat         REAL NOT NULL,
    lon         REAL NOT NULL,
    sequence_id TEXT NOT NULL,
    captured_ms INTEGER,
    creator     TEXT,
    heading     REAL,
    is_pano     INTEGER,
    quality     REAL,
    status      TEXT NOT NULL DEFAULT 'listed',
    path        TEXT,
    bytes       INTEGER,
    sha256      TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    listed_at   REAL,
    done_at     REAL
);
CREATE INDEX IF NOT EXISTS images_area_status ON images(area, status);
CREATE INDEX IF NOT EXISTS images_status ON images(status);
CREATE TABLE IF NOT EXISTS tiles (
    key     TEXT PRIMARY KEY,
    area    TEXT NOT NULL,
    images  INTEGER NOT NULL,
    done_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dc.dataclass
class ListedImage:
    """One image as listed by the API; ``thumb_url`` lives only in memory (it expires)."""
    id: str
    lat: float
    lon: float
    sequence_id: str
    captured_ms: int | None = None
    creator: str | None = None
    heading: float | None = None
    is_pano: bool | None = None
    quality: float | None = None
    thumb_url: str | None = None


def iso_from_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LockedError(RuntimeError):
    """Another downloader holds the ledger."""


@contextlib.contextmanager
def run_lock(state_dir: Path) -> Iterator[None]:
    """One downloader per data directory; the OS drops the lock if the process dies (kill -9 included)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "mapillary.lock"
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"another Mapillary download is running on {state_dir.parent} (lock {path}); wait for it or stop it") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30.0)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        with self.db:  # each `with self.db` block is one transaction
            self.db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- listing ---------------------------------------------------------
    def statuses(self, ids: Iterable[str], max_attempts: int) -> dict[str, str]:
        """{id: status} for the ids already in the ledger; a failed image out of attempts reads "given_up"."""
        ids = list(ids)
        out: dict[str, str] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            q = (f"SELECT id, CASE WHEN status = 'failed' AND attempts >= ? THEN 'given_up' ELSE status END AS status "
                 f"FROM images WHERE id IN ({','.join('?' * len(chunk))})")
            out.update({r["id"]: r["status"] for r in self.db.execute(q, [max_attempts, *chunk])})
        return out

    def add_listed(self, area: str, images: Iterable[ListedImage]) -> int:
        rows = [(im.id, area, im.lat, im.lon, im.sequence_id, im.captured_ms, im.creator, im.heading,
                 None if im.is_pano is None else int(im.is_pano), im.quality, time.time()) for im in images]
        with self.db:
            cur = self.db.executemany(
                "INSERT OR IGNORE INTO images(id, area, lat, lon, sequence_id, captured_ms, creator, heading, is_pano, quality, listed_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        return cur.rowcount

    def count_area(self, area: str, status: str | None = None) -> int:
        if status is None:
            return self.db.execute("SELECT COUNT(*) FROM images WHERE area = ?", (area,)).fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM images WHERE area = ? AND status = ?", (area, status)).fetchone()[0]

    def count(self, status: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images WHERE status = ?", (status,)).fetchone()[0]

    def pending(self, max_attempts: int) -> list[sqlite3.Row]:
        """Images wanted but not on disk: listed, or failed fewer than ``max_attempts`` times."""
        return self.db.execute(
            "SELECT * FROM images WHERE status = 'listed' OR (status = 'failed' AND attempts < ?) ORDER BY area, id",
            (max_attempts,)).fetchall()

    def tile_done(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM tiles WHERE key = ?", (key,)).fetchone() is not None

    def mark_tile_done(self, key: str, area: str, images: int) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO tiles(key, area, images, done_at) VALUES (?,?,?,?)", (key, area, images, time.time()))

    # ---- downloads -------------------------------------------------------
    def mark_done(self, image_id: str, path: str, nbytes: int, sha256: str) -> None:
        with self.db:
            self.db.execute("UPDATE images SET status='done', path=?, bytes=?, sha256=?, error=NULL, done_at=?, attempts=attempts+1 WHERE id=?",
                            (path, nbytes, sha256, time.time(), image_id))

    def mark_failed(self, image_id: str, error: str) -> None:
        with self.db:
            self.db.execute("UPDATE images SET status='failed', error=?, attempts=attempts+1 WHERE id=?", (error[:500], image_id))

    def done_rows(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM images WHERE status = 'done' ORDER BY done_at, id").fetchall()

    def failed_rows(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM images WHERE status = 'failed' ORDER BY id").fetchall()

    def row(self, image_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()


def row_to_record(row: sqlite3.Row) -> ImageRecord:
    """The project's record for a downloaded image (CC BY-SA 4.0, credited to its creator)."""
    return ImageRecord(id=row["id"], path=row["path"], lat=row["lat"], lon=row["lon"], sequence_id=row["sequence_id"],
                       source="mapillary", captured_at=iso_from_ms(row["captured_ms"]), creator=row["creator"],
                       license=LICENSE, heading=row["heading"], view=None)


def row_to_listed(row: sqlite3.Row) -> ListedImage:
    return ListedImage(id=row["id"], lat=row["lat"], lon=row["lon"], sequence_id=row["sequence_id"],
                       captured_ms=row["captured_ms"], creator=row["creator"], heading=row["heading"],
                       is_pano=None if row["is_pano"] is None else bool(row["is_pano"]), quality=row["quality"])
