"""The HTTP API through the real stack: uvicorn on 127.0.0.1 in a thread, httpx as the client, real photos."""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h3
import httpx
import pytest

from geolocate.geo import cell_polygon_geojson
from geolocate.serving import Geolocator
from geolocate.serving.server import create_app, serve_in_thread, split_antimeridian

PHOTO = "000_IMG_7159.jpg"  # Philadelphia, with EXIF GPS


def onnx_geolocator(trained) -> Geolocator:
    """The session's model under ONNX Runtime; the .onnx is cached beside the workspace (rebuilt if stale)."""
    cfg, _, model_path = trained
    return Geolocator.from_pretrained(model_path, engine="onnx", onnx_path=Path(cfg.paths.data_dir).parent / "onnx-cache" / "model.onnx")


@pytest.fixture(scope="module")
def server(trained):
    geo = onnx_geolocator(trained)
    with serve_in_thread(create_app(geo, max_upload_mb=2)) as url:
        yield url, geo


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


def _upload(client, name: str, data: bytes, mime: str = "image/jpeg", **params):
    return client.post("/predict", params=params, files={"file": (name, data, mime)})


def test_predict_happy_path(client, photos_dir):
    r = _upload(client, PHOTO, (photos_dir / PHOTO).read_bytes())
    assert r.status_code == 200, r.text
    d = r.json()
    top = d["top"]
    assert len(top) == 5
    assert [c["rank"] for c in top] == [1, 2, 3, 4, 5]
    assert all(h3.is_valid_cell(c["cell"]) for c in top) and len({c["cell"] for c in top}) == 5
    probs = [c["probability"] for c in top]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
    assert all(c["place"].startswith("near ") for c in top)
    assert d["confidence"] == probs[0]
    if d["point"] == "cell":
        assert (d["lat"], d["lon"], d["place"]) == (top[0]["lat"], top[0]["lon"], top[0]["place"])
    else:  # refined: a training location inside the top cells, named after itself
        assert d["point"] == "refined" and -90 <= d["lat"] <= 90 and d["place"].startswith("near ")
    for c in top:  # centroid = the H3 cell's centre
        lat, lon = h3.cell_to_latlng(c["cell"])
        assert c["lat"] == pytest.approx(lat, abs=1e-4) and c["lon"] == pytest.approx(lon, abs=1e-4)
    # EXIF GPS of the upload gives the truth and the error
    assert d["true_lat"] == pytest.approx(39.9523, abs=1e-3) and d["true_lon"] == pytest.approx(-75.1916, abs=1e-3)
    assert d["error_km"] > 0 and d["engine"] == "onnx" and d["source"] == PHOTO
    # the cells as GeoJSON polygons in [lon, lat] order, closed rings
    fc = d["geojson"]
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 5
    for f, c in zip(fc["features"], top):
        assert f["type"] == "Feature" and f["properties"]["cell"] == c["cell"] and f["properties"]["rank"] == c["rank"]
        g = f["geometry"]
        assert g["type"] in ("Polygon", "MultiPolygon")
        polys = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
        for ring in (p[0] for p in polys):
            assert len(ring) >= 4 and ring[0] == ring[-1]
            assert all(-180 <= lon <= 180 and -90 <= lat <= 90 for lon, lat in ring)
        if g["type"] == "Polygon":
            assert g == cell_polygon_geojson(c["cell"])


def test_top_k_as_query_or_form(client, photos_dir):
    data = (photos_dir / "010_001.jpg").read_bytes()
    assert len(_upload(client, "a.jpg", data, top_k=3).json()["top"]) == 3
    r = client.post("/predict", data={"top_k": "2"}, files={"file": ("a.jpg", data, "image/jpeg")})
    assert r.status_code == 200 and len(r.json()["top"]) == 2
    assert _upload(client, "a.jpg", data, top_k=0).status_code == 422


def test_health_model_docs_and_page(client, server):
    _, geo = server
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["engine"] == "onnx" and h["classes"] == len(geo.classes)
    m = client.get("/model").json()
    assert m["backbone"] == "efficientnet_lite0" and m["num_classes"] == len(geo.classes) and m["h3_resolution"] == 0
    assert m["training_data"]["images"] > 0 and "median_km" in m["metrics"]["test"] and m["run_id"]
    ap = m["answer_point"]
    assert ap["refined"] is False or (ap["gallery_loaded"] is True and ap["params"]["top_k"] >= 1)
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/model"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and 'id="map"' in page.text
    # no CDN, no tiles: every script, stylesheet and fetch is local
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', page.text)
    js = client.get("/static/app.js")
    assert js.status_code == 200 and not re.findall(r'fetch\(\s*["\'`](?:https?:)?//', js.text)
    world = client.get("/static/world.geojson")
    assert world.status_code == 200 and world.json()["type"] == "FeatureCollection"


def test_oversize_upload_413(client, photos_dir):
    big = b"\xff\xd8" + b"\0" * (3 * 1024 * 1024)  # over the 2 MB limit of this app
    r = _upload(client, "big.jpg", big)
    assert r.status_code == 413 and "2 MB" in r.json()["detail"]

    def chunked():  # no Content-Length: the limit is enforced while streaming
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        for _ in range(30):
            yield b"\0" * 100_000
        yield b"\r\n--xyz--\r\n"

    r = client.post("/predict", content=chunked(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413
    assert _upload(client, PHOTO, (photos_dir / PHOTO).read_bytes()).status_code == 200  # still serving


def test_wrong_type_and_corrupt_images(client, photos_dir):
    r = _upload(client, "notes.txt", b"just some text, not a photo\n" * 10, "text/plain")
    assert r.status_code == 415 and "not a recognised image format" in r.json()["detail"]
    r = _upload(client, "page.html", b"<html><body>hi</body></html>", "image/jpeg")  # lying content type
    assert r.status_code == 415
    good = (photos_dir / PHOTO).read_bytes()
    r = _upload(client, "truncated.jpg", good[: len(good) // 3])
    assert r.status_code == 422 and "truncated.jpg" in r.json()["detail"] and "truncated" in r.json()["detail"]
    r = _upload(client, "corrupt.jpg", good[:600] + b"\x00" * 5000)
    assert r.status_code in (415, 422)
    r = _upload(client, "empty.jpg", b"")
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = client.post("/predict")  # no file field at all
    assert r.status_code == 422
    assert _upload(client, PHOTO, good).status_code == 200  # the server keeps serving


def test_views_of_one_place_in_one_request(client, server, photos_dir):
    _, geo = server
    names = [PHOTO, "010_001.jpg", "013_IMG_20180725_163423.jpg", "021_DSCN0010.jpg"]
    files = [("file", (n, (photos_dir / n).read_bytes(), "image/jpeg")) for n in names]
    r = client.post("/predict", files=files)
    assert r.status_code == 200, r.text
    d = r.json()
    expect = geo.predict([[photos_dir / n for n in names]])[0]  # the predictor's multi-view answer, through HTTP
    assert d["views"] == names and d["dropped"] == [] and d["source"] == " + ".join(names)
    assert [c["cell"] for c in d["top"]] == [c.cell for c in expect.top]
    assert [c["probability"] for c in d["top"]] == pytest.approx([c.probability for c in expect.top], abs=1e-6)
    assert len(d["geojson"]["features"]) == 5
    # an unusable view is left out and named; the others answer
    r = client.post("/predict", files=files[:2] + [("file", ("notes.txt", b"not a photo", "text/plain"))])
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["views"] == names[:2] and len(d["dropped"]) == 1 and d["dropped"][0].startswith("notes.txt: not a recognised image")
    # every view unusable: the first one's error
    r = client.post("/predict", files=[("file", ("a.txt", b"text", "text/plain")), ("file", ("b.jpg", b"", "image/jpeg"))])
    assert r.status_code == 415 and "a.txt" in r.json()["detail"]
    # more than 4: refused with a clear message, before any decoding
    r = client.post("/predict", files=files + files[:1])
    assert r.status_code == 422 and r.json()["detail"] == "5 photos in one request: send at most 4 views of one place"
    assert _upload(client, PHOTO, (photos_dir / PHOTO).read_bytes()).status_code == 200


def test_concurrent_load_200_requests_8_at_a_time(server, photos_dir):
    url, _ = server
    names = sorted(p.name for p in photos_dir.glob("*.jpg"))[:16]
    blobs = [(n, (photos_dir / n).read_bytes()) for n in names]
    in_flight = {"now": 0, "max": 0}
    lock = threading.Lock()

    def one(i: int, client: httpx.Client) -> tuple[int, str, float]:
        name, data = blobs[i % len(blobs)]
        with lock:
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
        t = time.perf_counter()
        try:
            r = client.post("/predict", files={"file": (name, data, "image/jpeg")})
        finally:
            with lock:
                in_flight["now"] -= 1
        ok = r.status_code == 200 and len(r.json()["top"]) == 5
        return r.status_code if ok else -r.status_code, name, time.perf_counter() - t

    with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=8)) as client:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: one(i, client), range(200)))
        assert client.get("/health").json()["status"] == "ok"
    codes = [c for c, _, _ in results]
    assert codes.count(200) == 200, [r for r in results if r[0] != 200][:5]
    assert in_flight["max"] >= 4  # requests really overlapped


def test_split_antimeridian_cells():
    for cell in h3.get_res0_cells():
        poly = cell_polygon_geojson(cell)
        out = split_antimeridian(poly)
        rings = [out["coordinates"][0]] if out["type"] == "Polygon" else [p[0] for p in out["coordinates"]]
        for ring in rings:
            assert ring[0] == ring[-1]
            assert all(-180 <= lon <= 180 for lon, _ in ring)
            # no edge jumps across the map (except along a pole, which is a line in this projection)
            assert all(abs(a[0] - b[0]) <= 180 or abs(a[1]) == abs(b[1]) == 90 for a, b in zip(ring, ring[1:]))
    # a cell straddling the antimeridian becomes two pieces, one on each side
    cell = h3.latlng_to_cell(0.0, 180.0, 0)
    out = split_antimeridian(cell_polygon_geojson(cell))
    assert out["type"] == "MultiPolygon"
    sides = sorted(min(lon for lon, _ in p[0]) < 0 for p in out["coordinates"])
    assert sides == [False, True]
    # the pole cell is closed along the pole
    north = h3.latlng_to_cell(90.0, 0.0, 0)
    out = split_antimeridian(cell_polygon_geojson(north))
    assert max(lat for p in out["coordinates"] for lon, lat in p[0]) == 90.0


def test_predict_says_the_set_the_regions_and_the_ood_warning(client, photos_dir):
    d = _upload(client, PHOTO, (photos_dir / PHOTO).read_bytes()).json()
    ps = d["prediction_set"]
    assert ps["coverage"] == 0.9 and ps["size"] == len(ps["cells"]) and ps["sentence"].startswith("the photo is in")
    assert len(d["regions"]) == 5 and {"region", "key", "probability"} <= set(d["regions"][0])
    assert d["ood"] is True and d["warning"].startswith("this photo is unlike the training images") and d["ood_score"] > 0
    assert "abstained" not in d
