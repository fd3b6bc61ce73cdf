"""EXIF metadata: GPS position, capture time, camera make (Pillow only)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from PIL import ExifTags, Image

_GPS_IFD = ExifTags.IFD.GPSInfo
_EXIF_IFD = ExifTags.IFD.Exif


def _rational(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError, ZeroDivisionError):
        num, den = x
        return float(num) / float(den)


def _dms(value, ref, axis: str) -> float:
    """Degrees from EXIF degrees/minutes/seconds and an N/S (or E/W) reference; ValueError names what is wrong."""
    refs = {"lat": ("N", "S"), "lon": ("E", "W")}[axis]
    tag = "GPSLatitude" if axis == "lat" else "GPSLongitude"
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "ignore")
    ref = str(ref).strip("\x00 ").upper() if ref is not None else ""
    if ref not in refs:
        raise ValueError(f"{tag}Ref is {'missing' if not ref else repr(ref)} (expected {' or '.join(refs)})")
    try:
        if isinstance(value, (int, float)):
            parts = [float(value)]
        else:
            parts = [_rational(v) for v in value]
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        raise ValueError(f"{tag} {value!r} is not degrees/minutes/seconds") from None
    if not parts or any(x != x or x < 0 for x in parts) or any(x >= 60 for x in parts[1:3]):
        raise ValueError(f"{tag} {'/'.join(f'{x:g}' for x in parts)} is not valid degrees/minutes/seconds")
    deg = parts[0] + (parts[1] if len(parts) > 1 else 0) / 60 + (parts[2] if len(parts) > 2 else 0) / 3600
    return -deg if ref == refs[1] else deg


def _bare_tiff_app1(im: Image.Image) -> Image.Exif:
    """Some cameras write an APP1 segment with the TIFF header but no 'Exif\\0\\0' prefix."""
    exif = Image.Exif()
    for marker, data in getattr(im, "applist", []):
        if marker == "APP1" and data[:4] in (b"MM\x00*", b"II*\x00"):
            exif.load(data)
            break
    return exif


def image_exif(im: Image.Image) -> Image.Exif:
    """The EXIF block of an opened image (empty when it has none or it is malformed); never raises."""
    try:
        exif = im.getexif()
        return exif if exif else _bare_tiff_app1(im)
    except Exception:  # noqa: BLE001 - malformed EXIF is no EXIF
        return Image.Exif()


def read_exif(path: str | Path) -> dict:
    """Return {'lat', 'lon', 'captured_at', 'make', 'heading', 'gps_error'}; missing values are None.

    A GPS position with a missing or invalid N/S/E/W reference, or minutes/seconds
    of 60 or more, gives no position and ``gps_error`` saying why. Never raises
    for a readable image whose EXIF is absent or malformed.
    """
    try:
        with Image.open(path) as im:
            return exif_metadata(image_exif(im))
    except Exception:  # noqa: BLE001 - unreadable file: no metadata
        return exif_metadata(Image.Exif())


def exif_metadata(exif: Image.Exif) -> dict:
    """{'lat', 'lon', 'captured_at', 'make', 'heading', 'gps_error'} from a parsed EXIF block (see read_exif)."""
    out: dict = {"lat": None, "lon": None, "captured_at": None, "make": None, "heading": None, "gps_error": None}
    try:
        gps = exif.get_ifd(_GPS_IFD) if exif else {}
        sub = exif.get_ifd(_EXIF_IFD) if exif else {}
    except Exception:  # noqa: BLE001
        return out
    if gps and 2 in gps and 4 in gps:
        try:
            lat, lon = _dms(gps[2], gps.get(1), "lat"), _dms(gps[4], gps.get(3), "lon")
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise ValueError(f"GPS position {lat:g}, {lon:g} is out of range")
            if not (lat == 0 and lon == 0):
                out["lat"], out["lon"] = round(lat, 7), round(lon, 7)
        except ValueError as e:
            out["gps_error"] = f"invalid EXIF GPS: {e}"
        if 17 in gps:
            try:
                out["heading"] = _rational(gps[17])
            except Exception:
                pass
    stamp = sub.get(36867) or exif.get(306) if exif else None
    if isinstance(stamp, str):
        try:
            out["captured_at"] = dt.datetime.strptime(stamp.strip()[:19], "%Y:%m:%d %H:%M:%S").isoformat()
        except ValueError:
            pass
    make = exif.get(271) if exif else None
    if isinstance(make, str) and make.strip("\x00 "):
        out["make"] = make.strip("\x00 ")
    return out
