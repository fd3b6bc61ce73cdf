"""Bad and unusual image inputs: one clear error naming the file, or a correct RGB image."""
import io

import numpy as np
import pytest
from PIL import Image

from geolocate.exif import read_exif
from geolocate.io import MAX_IMAGE_PIXELS, ImageError, check_image, load_image


def _save(path, im, fmt="PNG", **kw):
    im.save(path, format=fmt, **kw)
    return path


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("I;16", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("LA", "PNG"), ("1", "PNG")])
def test_unusual_modes_become_rgb(tmp_path, mode, fmt):
    arr = (np.arange(32 * 24) % 251).reshape(24, 32)
    if mode == "I;16":
        im = Image.fromarray((arr * 200).astype("<u2"))
        assert im.mode == "I;16"
    else:
        im = Image.fromarray(arr.astype(np.uint8)).convert(mode)
    p = _save(tmp_path / f"x.{fmt.lower()}", im, fmt)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (32, 24)


def test_alpha_composited_on_white(tmp_path):
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    out = load_image(_save(tmp_path / "a.png", im))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW
    p = _save(tmp_path / "o.jpg", im, "JPEG", exif=exif)
    assert load_image(p).size == (20, 40)


@pytest.mark.parametrize("content,needle", [
    (b"", "empty file"),
    (b"this is not an image at all", "not a recognised image format"),
])
def test_bad_files(tmp_path, content, needle):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageError, match=needle) as e:
        load_image(p)
    assert str(p) in str(e.value)
    with pytest.raises(ImageError):
        check_image(p)


def test_truncated_jpeg(tmp_path, photos_dir):
    data = (photos_dir / "013_IMG_20180725_163423.jpg").read_bytes()
    p = tmp_path / "trunc.jpg"
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="corrupt or truncated") as e:
        load_image(p)
    assert "trunc.jpg" in str(e.value)


def test_decompression_bomb(tmp_path):
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 200
    p = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(p)  # tiny file, huge canvas
    assert p.stat().st_size < 2_000_000
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(p)


def test_bytes_input():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(ImageError, match="<3 bytes>"):
        load_image(b"abc")


def test_real_photos_decode_and_exif(photos_dir):
    import csv

    rows = list(csv.DictReader(open(photos_dir / "photos.csv")))
    with_gps = 0
    for r in rows:
        im = load_image(photos_dir / r["file"], draft=448)
        assert im.mode == "RGB" and min(im.size) > 0
        meta = read_exif(photos_dir / r["file"])
        if meta["lat"] is not None:
            with_gps += 1
            assert abs(meta["lat"] - float(r["lat"])) < 1e-3 and abs(meta["lon"] - float(r["lon"])) < 1e-3
    assert with_gps >= 85  # a few corpus files carry no EXIF at all
    # a raw-TIFF APP1 without the Exif prefix (HTC Desire) still parses
    assert read_exif(photos_dir / "090_HTC Desire.jpg")["lat"] == pytest.approx(45.5006667)
