"""Where to download: bounding boxes, city batch CSVs and their quadtree split.

A bbox is ``(west, south, east, north)`` in degrees, the order of the API's
``bbox=minLon,minLat,maxLon,maxLat`` parameter. A city becomes the bbox of a
circle of ``radius_km`` around its centre. The API refuses boxes of 0.01
square degrees or more and returns at most ``limit`` images per search, so
areas are split into quarters until small enough (and again when a page comes
back full).
"""
from __future__ import annotations

import csv
import dataclasses as dc
import math
import re
import unicodedata
from pathlib import Path
from typing import Iterable

from ...geo import KM_PER_DEG

BBox = tuple[float, float, float, float]
# Below this side length (about 1 m) a bbox is not split any further.
MIN_SIDE_DEG = 1e-5


class AreaError(ValueError):
    """A bad bbox, city name or batch CSV; the message says what and where."""


@dc.dataclass(frozen=True)
class Area:
    name: str   # a city name, or "bbox W,S,E,N"
    bbox: BBox


def parse_bbox(text: str | Iterable[float], where: str = "bbox") -> BBox:
    """Parse ``W,S,E,N`` (a string or four numbers) and check it."""
    if isinstance(text, str):
        parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    else:
        parts = list(text)
    try:
        vals = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise AreaError(f"{where} must be four numbers W,S,E,N (degrees), got {text!r}") from None
    if len(vals) != 4:
        raise AreaError(f"{where} must be four numbers W,S,E,N (degrees), got {len(vals)} value(s): {text!r}")
    w, s, e, n = vals
    if not all(math.isfinite(v) for v in vals):
        raise AreaError(f"{where} has a non-finite value: {text!r}")
    if not (-180 <= w <= 180 and -180 <= e <= 180 and -90 <= s <= 90 and -90 <= n <= 90):
        raise AreaError(f"{where} is out of range (lon -180..180, lat -90..90; order W,S,E,N): {text!r}")
    if w >= e or s >= n:
        raise AreaError(f"{where} must have W < E and S < N (order W,S,E,N), got {text!r}")
    return (w, s, e, n)


def format_bbox(b: BBox) -> str:
    """The API's ``bbox`` parameter; 7 decimals (1 cm) keep split tiles stable as keys."""
    return ",".join(f"{v:.7f}".rstrip("0").rstrip(".") for v in b)


def circle_bbox(lat: float, lon: float, radius_km: float) -> BBox:
    """The bbox enclosing a circle of ``radius_km`` around (lat, lon)."""
    if not (-90 < lat < 90 and -180 <= lon <= 180):
        raise AreaError(f"centre ({lat}, {lon}) is out of range")
    if not radius_km > 0:
        raise AreaError(f"radius_km must be > 0, got {radius_km}")
    dlat = radius_km / KM_PER_DEG
    dlon = radius_km / (KM_PER_DEG * max(math.cos(math.radians(lat)), 1e-6))
    return (max(lon - dlon, -180.0), max(lat - dlat, -90.0), min(lon + dlon, 180.0), min(lat + dlat, 90.0))


def bbox_area(b: BBox) -> float:
    return (b[2] - b[0]) * (b[3] - b[1])


def can_split(b: BBox) -> bool:
    return min(b[2] - b[0], b[3] - b[1]) >= 2 * MIN_SIDE_DEG


def split4(b: BBox) -> list[BBox]:
    """Quarters in a fixed order (SW, SE, NW, NE)."""
    w, s, e, n = b
    mx, my = (w + e) / 2, (s + n) / 2
    return [(w, s, mx, my), (mx, s, e, my), (w, my, mx, n), (mx, my, e, n)]


def leaf_tiles(b: BBox, max_area: float) -> list[BBox]:
    """Split ``b`` until every tile's area is below ``max_area``."""
    out, stack = [], [b]
    while stack:
        t = stack.pop()
        # a hair below the limit, so a box printed with 7 decimals never rounds up onto it
        if bbox_area(t) >= max_area * (1 - 1e-6) and can_split(t):
            stack.extend(reversed(split4(t)))
        else:
            out.append(t)
    return out


def _norm(name: str) -> str:
    """Case, accent and punctuation insensitive key: "Saint-Étienne" == "saint etienne"."""
    ascii_ = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", " ", ascii_.lower()).strip()


def read_cities_csv(path: str | Path, default_radius_km: float = 5.0) -> list[Area]:
    """Read ``city,lat,lon[,radius_km]`` or ``city,bbox`` rows (bbox as "W,S,E,N")."""
    p = Path(path)
    if not p.is_file():
        raise AreaError(f"cities CSV {p} does not exist")
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        reader.fieldnames = cols
        if "city" not in cols or not ({"lat", "lon"} <= set(cols) or "bbox" in cols):
            raise AreaError(f"{p}: header must have city,lat,lon[,radius_km] or city,bbox; got {','.join(cols) or 'nothing'}")
        areas: list[Area] = []
        for lineno, row in enumerate(reader, start=2):
            where = f"{p}:{lineno}"
            name = (row.get("city") or "").strip()
            if not name:
                raise AreaError(f"{where}: empty city name")
            if (row.get("bbox") or "").strip():
                bbox = parse_bbox(row["bbox"], where=f"{where} bbox")
            else:
                try:
                    lat, lon = float(row["lat"]), float(row["lon"])
                    radius = float(row["radius_km"]) if (row.get("radius_km") or "").strip() else default_radius_km
                except (TypeError, ValueError):
                    raise AreaError(f"{where}: lat, lon and radius_km must be numbers, got "
                                    f"{row.get('lat')!r}, {row.get('lon')!r}, {row.get('radius_km')!r}") from None
                try:
                    bbox = circle_bbox(lat, lon, radius)
                except AreaError as e:
                    raise AreaError(f"{where}: {e}") from None
            areas.append(Area(name=name, bbox=bbox))
    if not areas:
        raise AreaError(f"{p}: no city rows")
    return areas


def shipped_cities_dirs() -> list[Path]:
    """Where ``--city`` looks: ./cities, then the repository's cities/ next to the sources."""
    here = Path(__file__).resolve()
    dirs = [Path.cwd() / "cities"]
    if len(here.parents) > 4:
        dirs.append(here.parents[4] / "cities")   # <repo>/src/geolocate/sources/mapillary/areas.py
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen and r.is_dir():
            seen.add(r)
            out.append(r)
    return out


def find_city(name: str, radius_km: float = 5.0, dirs: list[Path] | None = None) -> Area:
    """Look a city up in the shipped ``cities/*.csv`` files."""
    dirs = shipped_cities_dirs() if dirs is None else dirs
    key = _norm(name)
    known: list[str] = []
    for d in dirs:
        for csv_path in sorted(Path(d).glob("*.csv")):
            for area in read_cities_csv(csv_path, default_radius_km=radius_km):
                if _norm(area.name) == key:
                    return area
                known.append(area.name)
    if not known:
        raise AreaError(f"no city list found (looked for cities/*.csv in {', '.join(map(str, dirs)) or 'nowhere'}); use --bbox W,S,E,N")
    close = [k for k in known if key and (key in _norm(k) or _norm(k) in key)]
    hint = f"; did you mean {', '.join(close[:5])}?" if close else f"; known: {', '.join(known[:8])}{', ...' if len(known) > 8 else ''}"
    raise AreaError(f"unknown city {name!r} (not in cities/*.csv){hint} Or use --bbox W,S,E,N")
