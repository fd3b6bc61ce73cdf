"""The answer CSV of ``geolocate predict DIR --csv out.csv``: ``id, region_1..region_5, lat, lon``.

One row per input image (per group of a ``--manifest``): ``id`` is the file name without its extension (the
group id), ``region_k`` the k-th most probable region (``CC/admin1``, class probabilities summed per region),
``lat, lon`` the answer point. The file is
checked before it replaces anything (``validate_submission``): the header, one row per input, unique ids, no
empty field, finite coordinates in range; each problem is one :class:`SubmissionError` line naming the row.
Inputs whose ids clash are refused before anything is predicted (:func:`check_unique_ids`).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Iterable, Sequence

from ..io import atomic_write

REGIONS = 5
COLUMNS = ["id", *(f"region_{k}" for k in range(1, REGIONS + 1)), "lat", "lon"]


class SubmissionError(ValueError):
    """A CSV that is not a valid answer file (one line naming the problem)."""


def submission_row(image_id: str, pred) -> dict:
    """The CSV row of one prediction (fields left empty where it has no answer: the validator names them)."""
    regions = [r.key for r in (pred.regions or [])][:REGIONS]
    row = {"id": image_id, **{f"region_{k}": (regions[k - 1] if k <= len(regions) else "") for k in range(1, REGIONS + 1)}}
    row["lat"] = "" if pred.error or pred.lat is None else f"{pred.lat:.6f}"
    row["lon"] = "" if pred.error or pred.lon is None else f"{pred.lon:.6f}"
    return row


def check_unique_ids(ids: Sequence[str], sources: Sequence[str]) -> None:
    """Raise :class:`SubmissionError` naming the first two inputs that share an id (a file name without its
    extension: ``a/IMG_1.jpg`` and ``b/IMG_1.jpg``, or ``x.jpg`` and ``x.png``), and how many ids clash: checked
    before anything is predicted, since such an answer file could never be valid."""
    first: dict[str, str] = {}
    clashes: list[tuple[str, str, str]] = []
    for i, src in zip(ids, sources):
        if i in first:
            clashes.append((i, first[i], src))
        else:
            first[i] = src
    if clashes:
        i, a, b = clashes[0]
        more = f" ({len({c[0] for c in clashes})} ids clash)" if len(clashes) > 1 else ""
        raise SubmissionError(f"{a} and {b} both have id {i!r} (the file name without its extension){more}: "
                              "an answer CSV needs one id per image; predict them into separate CSVs or rename them")


def _text(rows: Iterable[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def validate_rows(header: Sequence[str], rows: Sequence[Sequence[str]], expected_rows: int, name: str = "CSV") -> None:
    """Raise :class:`SubmissionError` at the first problem."""
    if list(header) != COLUMNS:
        raise SubmissionError(f"{name}: header is {','.join(header) or '(none)'}, expected {','.join(COLUMNS)}")
    if len(rows) != expected_rows:
        raise SubmissionError(f"{name}: {len(rows)} rows, expected {expected_rows} (one per input image)")
    seen: set[str] = set()
    for i, row in enumerate(rows, 2):  # line 1 is the header
        where = f"{name} line {i}" + (f" (id {row[0]!r})" if row and row[0].strip() else "")
        if len(row) != len(COLUMNS):
            raise SubmissionError(f"{where}: {len(row)} fields, expected {len(COLUMNS)}")
        rec = dict(zip(COLUMNS, row))
        for col in COLUMNS:
            if not rec[col].strip():
                raise SubmissionError(f"{where}: {col} is empty")
        if rec["id"] in seen:
            raise SubmissionError(f"{where}: duplicate id")
        seen.add(rec["id"])
        for col, lim in (("lat", 90.0), ("lon", 180.0)):
            try:
                v = float(rec[col])
            except ValueError:
                raise SubmissionError(f"{where}: {col} {rec[col]!r} is not a number") from None
            if not math.isfinite(v) or abs(v) > lim:
                raise SubmissionError(f"{where}: {col} {rec[col]} is outside -{lim:g}..{lim:g}")


def read_rows(text: str) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(text)))
    return (rows[0] if rows else []), rows[1:]


def validate_submission(path: str | Path, expected_rows: int) -> int:
    """Check an answer CSV on disk; return its row count."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{path}: cannot be read ({e})") from None
    header, rows = read_rows(text)
    validate_rows(header, rows, expected_rows, str(path))
    return len(rows)


def write_submission(path: str | Path, rows: Sequence[dict], expected_rows: int, force: bool = False) -> Path:
    """Validate and write atomically; an existing file is replaced only with ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise SubmissionError(f"{path} exists: give --force to overwrite it")
    text = _text(rows)
    header, parsed = read_rows(text)
    validate_rows(header, parsed, expected_rows, str(path))  # nothing is written when the answer is not valid

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")
        validate_submission(tmp, expected_rows)  # what is on disk, before it replaces anything

    return atomic_write(path, write, suffix=".csv")
