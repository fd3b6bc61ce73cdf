"""A fake Mapillary Graph API v4 on 127.0.0.1, faults included (tests and benchmarks only).

It serves the real shapes:

* ``GET /images?bbox=W,S,E,N&fields=...&limit=N`` -> ``{"data": [...], "paging":
  {"cursors": {"after": ...}, "next": url}}`` (``paging`` absent on the last page),
  GeoJSON ``[lon, lat]`` points, ``captured_at`` in ms, ``creator`` as
  ``{"id", "username"}``, signed ``thumb_<size>_url`` fields; bboxes of 0.01
  square degrees or more are refused like the real API.
* ``GET /<id>?fields=thumb_1024_url`` -> the entity with a fresh URL.
* ``GET /thumbs/<id>.jpg?size=..&gen=..&sig=..`` -> a small generated JPEG (no token).
* 401 with the API's OAuthException body when the token is wrong.

Faults (see :class:`Faults`) are injected per request kind or per image id and
every request is counted, so tests can assert how often each thumbnail was
served in full.
"""
from __future__ import annotations

import base64
import collections
import dataclasses as dc
import hashlib
import io
import json
import random
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

from PIL import Image

TOKEN = "MLY|fake-test-token"
QUOTA_BODY = {"error": {"message": "Application request limit reached", "type": "OAuthException", "code": 4,
                        "fbtrace_id": "AbCdEfGhIjK"}}
AUTH_BODY = {"error": {"message": "Invalid OAuth access token - Cannot parse access token", "type": "OAuthException",
                       "code": 190, "fbtrace_id": "AzYxWvUtSrQ"}}
SERVER_ERROR_BODY = {"error": {"message": "An unknown error has occurred.", "type": "OAuthException", "code": 1,
                               "fbtrace_id": "AqPoNmLkJiH"}}
MAX_AREA = 0.01
DEFAULT_BBOX = (4.80, 45.72, 4.92, 45.82)   # 0.012 deg^2: the client must split it once


@dc.dataclass
class FakeImage:
    id: str
    lon: float
    lat: float
    computed: tuple[float, float] | None   # (lon, lat) or absent
    captured_ms: int
    compass: float
    sequence: str
    is_pano: bool
    creator: str
    quality: float

    def field(self, name: str, base: str, gen: int):
        if name == "id":
            return self.id
        if name == "geometry":
            return {"type": "Point", "coordinates": [self.lon, self.lat]}
        if name == "computed_geometry":
            return None if self.computed is None else {"type": "Point", "coordinates": list(self.computed)}
        if name == "captured_at":
            return self.captured_ms
        if name == "compass_angle":
            return self.compass
        if name == "sequence":
            return self.sequence
        if name == "is_pano":
            return self.is_pano
        if name == "creator":
            return {"id": str(int(hashlib.sha1(self.creator.encode()).hexdigest()[:12], 16)), "username": self.creator}
        if name == "quality_score":
            return self.quality
        if name.startswith("thumb_") and name.endswith("_url"):
            size = name[len("thumb_"):-len("_url")]
            sig = hashlib.sha1(f"{self.id}:{size}:{gen}".encode()).hexdigest()[:16]
            return f"{base}/thumbs/{self.id}.jpg?" + urlencode({"size": size, "gen": gen, "sig": sig})
        return None

    def expected_latlon(self) -> tuple[float, float]:
        lon, lat = self.computed if self.computed is not None else (self.lon, self.lat)
        return lat, lon


def make_population(n: int = 120, bbox=DEFAULT_BBOX, seed: int = 0, pano_every: int = 7, no_computed_every: int = 5,
                    cluster: tuple[float, float, int] | None = None) -> list[FakeImage]:
    """``n`` images spread over ``bbox``; ``cluster=(lon, lat, k)`` packs k more within ~50 m of a point."""
    rng = random.Random(seed)
    w, s, e, nn = bbox
    pts = [(rng.uniform(w, e), rng.uniform(s, nn)) for _ in range(n)]
    if cluster is not None:
        cx, cy, k = cluster
        pts += [(cx + rng.uniform(-5e-4, 5e-4), cy + rng.uniform(-5e-4, 5e-4)) for _ in range(k)]
    out = []
    t0 = int(datetime(2019, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)
    for i, (lon, lat) in enumerate(pts):
        computed = None if i % no_computed_every == 0 else (round(lon + 2e-5, 7), round(lat - 1e-5, 7))
        out.append(FakeImage(id=str(100000000000000 + i * 7919), lon=round(lon, 7), lat=round(lat, 7), computed=computed,
                             captured_ms=t0 + i * 6 * 24 * 3600 * 1000,   # one every 6 days from 2019-01-01
                             compass=round((i * 37.5) % 360, 2), sequence=f"seq{i // 10:03d}",
                             is_pano=(i % pano_every == pano_every - 1), creator=f"user{i % 4}", quality=round((i % 10) / 10, 1)))
    return out


def make_jpeg(image_id: str, size: tuple[int, int] = (64, 48)) -> bytes:
    h = hashlib.sha256(image_id.encode()).digest()
    im = Image.new("RGB", size, (h[0], h[1], h[2]))
    px = im.load()
    for x in range(size[0]):
        for y in range(0, size[1], 4):
            px[x, y] = (h[3] ^ x, h[4] ^ y, h[5])
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@dc.dataclass
class Faults:
    """What goes wrong. Id-based faults hit the first request(s) for that id only."""
    token: str = TOKEN
    rate_limit: int = 0                      # the first N API requests answer 429 (quota body)
    retry_after: str | None = None           # Retry-After header on those 429s
    api_errors: list[int] = dc.field(default_factory=list)    # statuses of the first API requests, in order
    thumb_errors: list[int] = dc.field(default_factory=list)  # statuses of the first thumbnail requests, in order
    api_stalls: int = 0                      # the first N API requests stall for stall_s (client timeouts)
    stall_ids: set[str] = dc.field(default_factory=set)       # first thumbnail request of these ids stalls
    stall_s: float = 1.0
    truncated_ids: set[str] = dc.field(default_factory=set)   # first hit: connection closes mid-body
    corrupt_ids: set[str] = dc.field(default_factory=set)     # first hit: complete response, JPEG cut in half
    broken_ids: set[str] = dc.field(default_factory=set)      # every hit, while listed here: JPEG cut in half
    expired_ids: set[str] = dc.field(default_factory=set)     # URLs from a listing (gen 0) answer 403
    api_delay_s: float = 0.0                 # added to every API answer
    thumb_delay_s: float = 0.0               # added to every thumbnail answer
    paginate: bool = True                    # False: a full page has no paging.next (a bounded sample)
    page_cap: int | None = None              # the server returns at most this many per page, whatever `limit` says


class FakeMapillary:
    """Run with ``with FakeMapillary(...) as srv:``; ``srv.base_url`` is the API root."""

    def __init__(self, images: list[FakeImage] | None = None, faults: Faults | None = None):
        self.images = images if images is not None else make_population()
        self.by_id = {im.id: im for im in self.images}
        self.faults = faults or Faults()
        self.lock = threading.Lock()
        self.jpegs: dict[str, bytes] = {}
        self.api_requests = 0
        self.searches: list[str] = []                     # bbox of each search (first pages and next pages)
        self.entity_requests: collections.Counter = collections.Counter()
        self.thumb_requests: collections.Counter = collections.Counter()
        self.thumb_served: collections.Counter = collections.Counter()   # complete, good 200 bodies per id
        self.thumb_sizes: collections.Counter = collections.Counter()    # size parameter of thumbnail requests
        self.bad_bbox = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------
    def start(self) -> "FakeMapillary":
        server = self

        class Handler(_Handler):
            fake = server

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeMapillary":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ---- helpers for tests ------------------------------------------------------
    def jpeg(self, image_id: str) -> bytes:
        with self.lock:
            if image_id not in self.jpegs:
                self.jpegs[image_id] = make_jpeg(image_id)
            return self.jpegs[image_id]

    def ids(self, bbox=None, is_pano: bool | None = False) -> set[str]:
        """Ids the API holds in ``bbox`` (default: all) with the given pano kind (None: both)."""
        return {im.id for im in self.images if (is_pano is None or im.is_pano == is_pano)
                and (bbox is None or (bbox[0] <= im.lon <= bbox[2] and bbox[1] <= im.lat <= bbox[3]))}


def _ms_param(text: str | None) -> int | None:
    if not text:
        return None
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int((dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp() * 1000)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True    # headers and body go in two writes: without this each answer waits ~40 ms
    fake: FakeMapillary

    def log_message(self, fmt, *args):  # quiet
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client gave up (timeouts): nothing to answer

    # ---- responses ---------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None, declared: int | None = None,
              close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if declared is None else declared))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=UTF-8", headers)

    # ---- routing -------------------------------------------------------------
    def do_GET(self):
        fake, f = self.fake, self.fake.faults
        parts = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if parts.path.startswith("/thumbs/"):
            return self._thumb(parts.path[len("/thumbs/"):].removesuffix(".jpg"), q)
        with fake.lock:
            fake.api_requests += 1
            n = fake.api_requests
        if f.api_delay_s:
            time.sleep(f.api_delay_s)
        if n <= f.api_stalls:
            time.sleep(f.stall_s)
            return self._json(200, {"data": []})   # too late: the client timed out
        if self.headers.get("Authorization") != f"OAuth {f.token}":
            return self._json(401, AUTH_BODY)
        if n <= f.rate_limit:
            return self._json(429, QUOTA_BODY, {"Retry-After": f.retry_after} if f.retry_after is not None else None)
        k = n - f.rate_limit - 1
        if 0 <= k < len(f.api_errors):
            return self._json(f.api_errors[k], SERVER_ERROR_BODY)
        if parts.path == "/images":
            return self._search(q)
        image_id = parts.path.strip("/")
        if image_id in fake.by_id:
            return self._entity(image_id, q)
        return self._json(404, {"error": {"message": f"Unsupported get request. Object with ID '{image_id}' does not exist",
                                          "type": "GraphMethodException", "code": 100, "fbtrace_id": "AxXxXx"}})

    def _search(self, q: dict) -> None:
        fake, f = self.fake, self.fake.faults
        try:
            w, s, e, n = (float(v) for v in q["bbox"].split(","))
            limit = int(q.get("limit", 2000))
        except (KeyError, ValueError):
            return self._json(400, {"error": {"message": "Invalid parameter bbox", "type": "OAuthException", "code": 100}})
        if (e - w) * (n - s) >= MAX_AREA + 1e-12 or w >= e or s >= n:
            with fake.lock:
                fake.bad_bbox += 1
            return self._json(400, {"error": {"message": "Bbox area must be smaller than 0.01 square degrees",
                                              "type": "OAuthException", "code": 100}})
        limit = max(1, min(limit, 2000, f.page_cap or 2000))
        fields = [x for x in q.get("fields", "id").split(",") if x]
        since, until = _ms_param(q.get("start_captured_at")), _ms_param(q.get("end_captured_at"))
        pano = q.get("is_pano")
        hits = [im for im in fake.images
                if w <= im.lon <= e and s <= im.lat <= n
                and (pano is None or im.is_pano == (pano == "true"))
                and (since is None or im.captured_ms >= since) and (until is None or im.captured_ms <= until)]
        hits.sort(key=lambda im: im.id)
        offset = int(base64.urlsafe_b64decode(q["after"]).decode()) if q.get("after") else 0
        page = hits[offset:offset + limit]
        with fake.lock:
            fake.searches.append(q["bbox"])
        body: dict = {"data": [{fld: im.field(fld, fake.base_url, 0) for fld in ["id", *fields] if im.field(fld, fake.base_url, 0) is not None}
                               for im in page]}
        if offset + limit < len(hits) and f.paginate:
            after = base64.urlsafe_b64encode(str(offset + limit).encode()).decode()
            nq = {k: v for k, v in q.items() if k != "after"}
            nq["after"] = after
            body["paging"] = {"cursors": {"before": base64.urlsafe_b64encode(str(offset).encode()).decode(), "after": after},
                              "next": f"{fake.base_url}/images?{urlencode(nq)}"}
        self._json(200, body)

    def _entity(self, image_id: str, q: dict) -> None:
        fake = self.fake
        with fake.lock:
            fake.entity_requests[image_id] += 1
            gen = fake.entity_requests[image_id]
        im = fake.by_id[image_id]
        fields = [x for x in q.get("fields", "id").split(",") if x]
        self._json(200, {fld: im.field(fld, fake.base_url, gen) for fld in ["id", *fields] if im.field(fld, fake.base_url, gen) is not None})

    def _thumb(self, image_id: str, q: dict) -> None:
        fake, f = self.fake, self.fake.faults
        with fake.lock:
            fake.thumb_requests[image_id] += 1
            fake.thumb_sizes[q.get("size")] += 1
            nth = fake.thumb_requests[image_id]
            k = sum(fake.thumb_requests.values())
        if f.thumb_delay_s:
            time.sleep(f.thumb_delay_s)
        if image_id not in fake.by_id:
            return self._send(404, b"Not Found", "text/plain")
        if k <= len(f.thumb_errors):
            return self._send(f.thumb_errors[k - 1], b"Service Unavailable", "text/plain")
        if image_id in f.expired_ids and q.get("gen") == "0":
            return self._send(403, b"URL signature expired", "text/plain")
        data = fake.jpeg(image_id)
        if nth == 1 and image_id in f.stall_ids:
            time.sleep(f.stall_s)
            return self._send(200, data, "image/jpeg")   # nobody is listening any more
        if nth == 1 and image_id in f.truncated_ids:
            return self._send(200, data[: len(data) // 2], "image/jpeg", declared=len(data), close=True)
        if (nth == 1 and image_id in f.corrupt_ids) or image_id in f.broken_ids:
            return self._send(200, data[: len(data) // 2], "image/jpeg")
        self._send(200, data, "image/jpeg")
        with fake.lock:
            fake.thumb_served[image_id] += 1
