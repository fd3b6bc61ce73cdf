"""Geodesy in one place: haversine distances, GeoScore, H3 cells, place names.

Convention everywhere in this project: degrees, and (lat, lon) order, except
where an external format says otherwise (GeoJSON is [lon, lat]).
"""
from __future__ import annotations

import contextlib
import functools
import io
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
def _geocoder():
    import reverse_geocoder as rg

    with contextlib.redirect_stdout(io.StringIO()):
        rg.search([(0.0, 0.0)], mode=1)  # loads the GeoNames table once, quietly
    return rg


def place_names(points: Iterable[tuple[float, float]]) -> list[dict]:
    """Nearest GeoNames place (≥1000 people) for each (lat, lon): name, admin1, cc, label."""
    pts = [(float(a), float(o)) for a, o in points]
    if not pts:
        return []
    rg = _geocoder()
    with contextlib.redirect_stdout(io.StringIO()):
        hits = rg.search(pts, mode=1)
    out = []
    for (lat, lon), h in zip(pts, hits):
        d = float(haversine_km(lat, lon, float(h["lat"]), float(h["lon"])))
        out.append({"name": h["name"], "admin1": h["admin1"], "cc": h["cc"], "km": round(d, 1), "label": f"near {h['name']}, {h['cc']}"})
    return out


def place_name(lat: float, lon: float) -> str:
    return place_names([(lat, lon)])[0]["label"]
