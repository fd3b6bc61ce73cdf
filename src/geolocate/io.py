"""Atomic file writes and safe image decoding: the one place for both.

Every file the pipeline writes goes through ``atomic_write``: the bytes land in
a temporary file in the same directory, are fsynced, then renamed over the
target, so a crash never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decoded images above this many pixels are refused (decompression-bomb guard).
MAX_IMAGE_PIXELS = 64_000_000
# Images longer than this many times their width (or wider than tall) are refused at ingest: a 1x60000 strip is no photo.
MAX_ASPECT = 20.0
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".heic"})


class ImageError(ValueError):
    """An input file that cannot be used as an image; the message names the file."""


def one_line(e: BaseException) -> str:
    """``TypeName: first line of the message``: an exception as one error line."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; written files get the usual permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc); elsewhere set-and-restore under a lock."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any], suffix: str = "") -> Path:
    """Run ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path, suffix=suffix) as tmp:
        writer(tmp)
    return Path(path)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sidecar_path(path: Path) -> Path:
    """``models/best.pt`` -> ``models/best.json``: the promotion record holding the model's sha256."""
    return path.with_suffix(".json")


def verify_sidecar(path: Path, sha256: str | None = None) -> None:
    """Raise ValueError when ``path`` has a sidecar JSON with a sha256 that its bytes do not match.

    ``sha256``: the file's digest when the caller has it already (it is not hashed again)."""
    side = sidecar_path(path)
    if not side.is_file():
        return
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{side}: unreadable ({one_line(e)}); cannot verify {path.name}") from None
    expected = record.get("sha256") if isinstance(record, dict) else None
    if not expected:
        return
    if (sha256 or file_sha256(path)) != expected:
        raise ValueError(f"{path}: its sha256 does not match the one recorded in {side} (corrupted or replaced file); "
                         "restore it or train again")


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def write_bytes_if_changed(path: str | os.PathLike, data: bytes) -> bool:
    """``write_bytes`` unless the file already holds exactly ``data`` (its mtime then stays); True if written."""
    p = Path(path)
    try:
        if p.stat().st_size == len(data) and p.read_bytes() == data:
            return False
    except OSError:
        pass
    write_bytes(p, data)
    return True


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_parquet(path: str | os.PathLike, table: Any) -> Path:
    """Write a polars DataFrame or pyarrow Table atomically."""
    import pyarrow.parquet as pq

    def _w(tmp: Path) -> None:
        if hasattr(table, "write_parquet"):
            table.write_parquet(tmp)
        else:
            pq.write_table(table, tmp)

    return atomic_write(path, _w, suffix=".parquet")


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png", bbox_inches="tight"))
    finally:
        plt.close(fig)


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def load_image(source: str | os.PathLike | bytes | Image.Image, name: str | None = None, draft: int | None = None) -> Image.Image:
    """Decode an image to 8-bit RGB with EXIF orientation applied.

    Handles CMYK, 16-bit, palette, alpha and grayscale inputs. Raises
    :class:`ImageError` naming the file for zero-byte, truncated, corrupt,
    non-image or oversized (decompression bomb) inputs. ``draft`` lets a
    JPEG decode at a reduced scale no smaller than that many pixels a side.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    return to_rgb(_decode(source, name, draft=(draft, draft) if draft else None))


def decode_image(source: str | os.PathLike | bytes, name: str | None = None, draft: tuple[int, int] | None = None) -> Image.Image:
    """The decoded image as stored (no mode conversion, no EXIF orientation); errors as :class:`ImageError`.

    ``draft`` lets a JPEG decode at 1/2, 1/4 or 1/8 scale while staying at least that size."""
    return _decode(source, name, draft=draft)


def check_image(source: str | os.PathLike | bytes, name: str | None = None) -> tuple[int, int]:
    """Cheaply prove a file or bytes decode (JPEG draft mode: truncation is still caught) with a photo's shape
    (at most :data:`MAX_ASPECT` : 1); return the full size or raise ImageError."""
    w, h = _decode(source, name, draft=(256, 256)).size  # draft scaling keeps the aspect ratio
    if max(w, h) > MAX_ASPECT * max(min(w, h), 1):
        label = name or (f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else str(source))
        raise ImageError(f"{label}: {w}x{h} pixels is not a photo's shape (aspect ratio beyond {MAX_ASPECT:g}:1)")
    return w, h


def _decode(source: str | os.PathLike | bytes, name: str | None, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode, mapping every failure to one ImageError line."""
    label = name or (f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else str(source))
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise ImageError(f"{label}: empty file (0 bytes)")
            fh: Any = io.BytesIO(source)
        else:
            p = Path(source)
            if not p.is_file():
                raise ImageError(f"{label}: no such file")
            if p.stat().st_size == 0:
                raise ImageError(f"{label}: empty file (0 bytes)")
            fh = open(p, "rb")
        with fh, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fh)
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageError(f"{label}: {w}x{h} pixels exceeds the {MAX_IMAGE_PIXELS:,} pixel limit (decompression bomb?)")
            if draft:
                im.draft("RGB", draft)
            im.load()
            return im
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{label}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{label}: corrupt or truncated image ({e})") from None


def to_rgb(im: Image.Image, transpose: bool = True) -> Image.Image:
    """8-bit RGB (16-bit and float scaled, alpha composited on white); EXIF orientation applied if ``transpose``."""
    if transpose:
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        im = Image.fromarray((arr / hi * 255.0).clip(0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = (arr.min(), arr.max()) if arr.size else (0.0, 1.0)
        im = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB") if im.mode != "RGB" else im

