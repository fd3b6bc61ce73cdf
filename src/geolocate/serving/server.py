"""The HTTP API and the web page: ``geolocate serve`` (FastAPI + uvicorn).

``create_app(geolocator)`` builds the app around one shared :class:`Geolocator`:

- ``POST /predict`` (multipart field ``file``, repeated up to :data:`MAX_VIEWS` times for the views of one
  place, whose probabilities are averaged; ``top_k`` as query or form field)
  -> top-k H3 cells (id, place, probability, centroid), the predicted lat/lon,
  the true position and error when the photo carries EXIF GPS, and the cells
  as a GeoJSON FeatureCollection (polygons split at the antimeridian).
- ``GET /health``, ``GET /model`` (model card), OpenAPI docs at ``/docs``.
- ``GET /``: a static page (``serving/static``: no CDN, no tiles) to drop a
  photo and see the top cells on a bundled world outline.

Decoding and inference run in the threadpool (never on the event loop); the
engine serialises model calls, so the model is shared safely. Uploads over
``max_upload_mb`` get 413 (checked from Content-Length before reading, and
while streaming); non-images get 415, corrupt or truncated images 422.

Hardening: at most ``max_inflight`` uploads are decoded or inferred at once
and ``max_queued`` more wait for a slot (the next gets 503 with Retry-After); POSTs whose ``Origin`` is not this host
get 403 (no cross-site form posts); ``allowed_hosts`` answers other ``Host``
headers with 400; and :func:`server_config` gives uvicorn a header-read
timeout (slowloris), a keep-alive timeout and a connection limit.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import io
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence
from urllib.parse import urlsplit

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.middleware.gzip import GZipMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..geo import cell_polygon_geojson
from .batching import BatchingEngine
from .confidence import set_sentence
from .predictor import Geolocator, Prediction

STATIC_DIR = Path(__file__).resolve().parent / "static"
MB = 1024 * 1024
MAX_VIEWS = 4  # photos one POST /predict may carry: the views of one place (N/E/S/W)
_ENVELOPE_SLACK = 256 * 1024  # multipart boundaries, part headers and the top_k field


# ---- response schemas (for /docs) ----------------------------------------------
class CellOut(BaseModel):
    rank: int
    cell: str = Field(description="H3 cell id")
    place: str = Field(description="nearest GeoNames place to the cell centroid")
    probability: float
    lat: float = Field(description="cell centroid latitude (degrees)")
    lon: float = Field(description="cell centroid longitude (degrees)")


class RegionOut(BaseModel):
    region: str = Field(description="GeoNames admin1 and country code, e.g. 'Skane, SE'")
    key: str = Field(description="CC/admin1, as in the --csv answer file")
    probability: float = Field(description="summed over the region's cells")


class PredictionSetOut(BaseModel):
    coverage: float = Field(description="target coverage the threshold was fit for on validation (e.g. 0.9)")
    size: int = Field(description="cells in the set")
    area_km2: float
    cells: list[str] = Field(description="H3 cells, most probable first")
    sentence: Optional[str] = None


class PredictionOut(BaseModel):
    source: str
    lat: float = Field(description="predicted latitude: a training location inside the top cells (point=refined) or the top cell's anchor")
    lon: float
    point: Optional[str] = Field(None, description="refined | cell: where lat/lon come from")
    confidence: float
    place: str
    top: list[CellOut]
    geojson: dict[str, Any] = Field(description="GeoJSON FeatureCollection of the top cells' polygons ([lon, lat])")
    views: list[str] = Field(default_factory=list, description="several photos of one place: the ones the answer uses")
    dropped: list[str] = Field(default_factory=list, description="photos of this request left out, each 'name: why'")
    true_lat: Optional[float] = Field(None, description="from the photo's EXIF GPS, when present")
    true_lon: Optional[float] = None
    error_km: Optional[float] = None
    regions: list[RegionOut] = Field(default_factory=list, description="top-5 regions (country + admin1)")
    prediction_set: Optional[PredictionSetOut] = Field(None, description="conformal cell set (threshold fit on validation)")
    ood: Optional[bool] = Field(None, description="true: the photo is unlike the training images (null: the model has no OOD threshold)")
    ood_score: Optional[float] = None
    warning: Optional[str] = Field(None, description="one line for the user (the out-of-distribution warning)")
    engine: str
    run_id: Optional[str] = None
    elapsed_ms: float


class HealthOut(BaseModel):
    status: str
    engine: str
    classes: int
    uptime_s: float
    requests: int
    in_flight: int = Field(0, description="uploads being processed or waiting for a slot")


# ---- geometry -------------------------------------------------------------------
def _wrap(d: float) -> float:
    return (d + 180.0) % 360.0 - 180.0


def _clip(poly: list[list[float]], c: float, keep_ge: bool) -> list[list[float]]:
    """Sutherland-Hodgman clip of an open ring against the half-plane lon >= c (or <= c)."""
    out: list[list[float]] = []
    for i, cur in enumerate(poly):
        prev = poly[i - 1]
        cin = cur[0] >= c if keep_ge else cur[0] <= c
        pin = prev[0] >= c if keep_ge else prev[0] <= c
        if cin != pin:
            t = (c - prev[0]) / (cur[0] - prev[0])
            out.append([c, prev[1] + t * (cur[1] - prev[1])])
        if cin:
            out.append(list(cur))
    return out


def _area(ring: list[list[float]]) -> float:
    return 0.5 * abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(ring, ring[1:] + ring[:1])))


def split_antimeridian(polygon: dict) -> dict:
    """A GeoJSON Polygon ring as RFC 7946 wants it: cut at ±180° (MultiPolygon), poles closed.

    H3 boundaries give each vertex in [-180, 180]; a cell crossing the
    antimeridian would otherwise be drawn across the whole map.
    """
    ring = polygon["coordinates"][0]
    pts = ring[:-1] if ring[0] == ring[-1] else list(ring)
    un = [[float(pts[0][0]), float(pts[0][1])]]
    for lon, lat in pts[1:]:
        un.append([un[-1][0] + _wrap(lon - un[-1][0]), float(lat)])
    winding = un[-1][0] + _wrap(pts[0][0] - un[-1][0]) - un[0][0]
    if abs(winding) > 180:  # the ring goes round a pole: close it along the pole
        pole = 90.0 if sum(p[1] for p in un) > 0 else -90.0
        end = un[0][0] + winding
        un += [[end, un[0][1]], [end, pole], [un[0][0], pole]]
    lo, hi = min(p[0] for p in un), max(p[0] for p in un)
    if lo >= -180 and hi <= 180 and abs(winding) <= 180:
        return polygon
    pieces = []
    for k in range(-2, 3):
        shifted = [[p[0] + 360.0 * k, p[1]] for p in un]
        if max(p[0] for p in shifted) <= -180 or min(p[0] for p in shifted) >= 180:
            continue
        part = _clip(_clip(shifted, -180.0, True), 180.0, False)
        if len(part) >= 3 and _area(part) > 1e-9:
            part = [[round(x, 6), round(y, 6)] for x, y in part]
            pieces.append([part + [part[0]]])
    if len(pieces) == 1:
        return {"type": "Polygon", "coordinates": pieces[0]}
    return {"type": "MultiPolygon", "coordinates": pieces}


@functools.lru_cache(maxsize=8192)
def cell_geometry(cell: str) -> dict:
    """A cell's polygon, split at the antimeridian; computed once per cell (treat as read-only)."""
    return split_antimeridian(cell_polygon_geojson(cell))


def cells_feature_collection(pred: Prediction) -> dict:
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": c.cell, "geometry": cell_geometry(c.cell),
         "properties": {"rank": i, "cell": c.cell, "place": c.place, "probability": c.probability, "lat": c.lat, "lon": c.lon}}
        for i, c in enumerate(pred.top, 1)]}


# ---- upload size limit ------------------------------------------------------------
class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Answer 413 for request bodies over ``max_bytes``: from Content-Length, or while streaming."""

    def __init__(self, app, max_bytes: int, message: str):
        self.app, self.max_bytes, self.message = app, max_bytes, message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"-1"))
        except ValueError:
            declared = -1
        if declared > self.max_bytes:
            return await self._reject(scope, receive, send)
        state = {"received": 0, "exceeded": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["exceeded"] = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            if state["exceeded"]:
                return  # the app's answer to a cut-off body is replaced by the 413 below
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        if state["exceeded"] and not state["started"]:
            await self._reject(scope, receive, send)

    async def _reject(self, scope, receive, send):
        await JSONResponse({"detail": self.message}, status_code=413, headers={"Connection": "close"})(scope, receive, send)


# ---- cross-origin posts -------------------------------------------------------------
class SameOriginMiddleware:
    """403 for state-changing requests whose ``Origin`` header names another site than the ``Host`` asked for.

    Browsers send ``Origin`` on every cross-origin POST (forms included); a request without one (curl, scripts)
    is not a browser acting for another site and passes.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            headers = dict(scope.get("headers") or [])
            origin = headers.get(b"origin")
            if origin is not None and not _same_origin(origin.decode("latin-1"), headers.get(b"host", b"").decode("latin-1")):
                return await JSONResponse({"detail": "cross-origin request refused: post from this server's own page"},
                                          status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


def _same_origin(origin: str, host: str) -> bool:
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(netloc) and netloc.lower() == host.lower()


# ---- the app ------------------------------------------------------------------------
def create_app(geolocator: Geolocator, max_upload_mb: float = 20, max_inflight: int = 4, max_queued: int = 16,
               allowed_hosts: Sequence[str] | None = None, batch_wait_ms: float = 2.0, max_batch: int = 16) -> FastAPI:
    """The FastAPI app serving ``geolocator`` (shared by all requests).

    ``max_inflight``: uploads decoded/inferred at once; ``max_queued``: how many more may wait for a slot, beyond
    which requests get 503 (load shedding: memory stays bounded under any load). ``allowed_hosts``: accepted ``Host`` header
    names (``*.example.org`` patterns allowed); None accepts any. Concurrent requests are micro-batched: each is
    decoded in its own worker thread, then uploads arriving within ``batch_wait_ms`` of each other (at most
    ``max_batch``) share one engine call (``batch_wait_ms=0`` with ``max_batch=1`` turns this off).
    """
    if max_inflight < 1 or max_queued < 0:
        raise ValueError(f"max_inflight must be >= 1 and max_queued >= 0, got {max_inflight} and {max_queued}")
    max_bytes = int(max_upload_mb * MB)
    geolocator = copy.copy(geolocator)  # the caller's Geolocator keeps its own engine
    geolocator.engine = BatchingEngine(geolocator.engine, max_batch=max_batch, max_wait_ms=batch_wait_ms)
    admitted = threading.BoundedSemaphore(max_inflight + max_queued)  # taken without waiting: 503 when none is left
    working = threading.Semaphore(max_inflight)                       # waited for in the worker thread
    in_flight = {"n": 0}
    too_large = f"upload exceeds the {max_upload_mb:g} MB limit"
    card = geolocator.model_card()
    num_classes = len(geolocator.classes)
    started = time.time()
    counter = {"n": 0}
    counter_lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        geolocator.engine.close()  # the micro-batching threads end with the server

    app = FastAPI(
        title="geolocate",
        summary="Predict where a photo was taken: top-k H3 cells with place names and probabilities.",
        version="1",
        lifespan=lifespan,
    )
    app.state.geolocator = geolocator
    app.add_middleware(GZipMiddleware, minimum_size=4096)
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_VIEWS * (max_bytes + _ENVELOPE_SLACK),
                       message=f"upload exceeds the limit of {MAX_VIEWS} photos of {max_upload_mb:g} MB")
    app.add_middleware(SameOriginMiddleware)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def infer(uploads: list[tuple[bytes, str]], top_k: int) -> dict:
        with working:
            return _infer(uploads, top_k)

    def _check(data: bytes, name: str) -> HTTPException | None:
        """Why an upload is not an image Pillow can open (415/422), else None."""
        from PIL import Image, UnidentifiedImageError

        if not data:
            return HTTPException(422, f"{name}: empty file (0 bytes)")
        try:
            with Image.open(io.BytesIO(data)):
                pass
        except UnidentifiedImageError:
            return HTTPException(415, f"{name}: not a recognised image format (send a JPEG, PNG, WebP, TIFF, BMP or GIF photo)")
        except Exception as e:  # noqa: BLE001 - a header Pillow cannot even parse
            return HTTPException(422, f"{name}: corrupt image ({e})")
        return None

    def _infer(uploads: list[tuple[bytes, str]], top_k: int) -> dict:
        t0 = time.perf_counter()
        problems = [_check(d, n) for d, n in uploads]
        good = [u for u, e in zip(uploads, problems) if e is None]
        if not good:  # every photo is unusable: the first one's answer (one photo: exactly as before)
            raise problems[0]
        if len(uploads) == 1:
            pred = geolocator.predict_one(good[0][0], top_k=top_k, name=good[0][1])
        else:  # the views of one place: predicted together; the unusable ones are named in "dropped"
            pred = geolocator.predict_one([d for d, _ in good], top_k=top_k, name=[n for _, n in good])
            pred.dropped = [e.detail for e in problems if e is not None] + pred.dropped
            pred.source = " + ".join(n for _, n in uploads)
        if pred.error:
            raise HTTPException(422, pred.error)
        with counter_lock:
            counter["n"] += 1
        out = pred.to_dict()
        out["top"] = [{"rank": i, **c} for i, c in enumerate(out["top"], 1)]
        out.pop("error", None)
        out.pop("abstained", None)
        if out.get("prediction_set"):
            out["prediction_set"]["sentence"] = set_sentence(pred.prediction_set)
        out.update(geojson=cells_feature_collection(pred), engine=geolocator.engine_name, run_id=card.get("run_id"),
                   elapsed_ms=round(1000 * (time.perf_counter() - t0), 2))
        return out

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/health", response_model=HealthOut, summary="Liveness and a few counters")
    def health() -> dict:
        return {"status": "ok", "engine": geolocator.engine_name, "classes": num_classes,
                "uptime_s": round(time.time() - started, 1), "requests": counter["n"], "in_flight": in_flight["n"]}

    @app.get("/model", summary="Model card: backbone, classes, H3 resolution, training data, metrics")
    def model() -> dict:
        public = card | {"model_file": Path(card["model_file"]).name if card.get("model_file") else None}
        if card.get("ensemble"):  # file names only, as for model_file: the server's folders are not the public's business
            ens = card["ensemble"]
            public["ensemble"] = ens | {"members": [Path(m).name for m in ens["members"]],
                                        "refined_with": Path(ens["refined_with"]).name if ens.get("refined_with") else None}
        return public | {"max_upload_mb": max_upload_mb}

    @app.post("/predict", response_model=PredictionOut, summary="Where was this photo taken?",
              responses={413: {"description": "upload too large"}, 415: {"description": "not an image"},
                         422: {"description": f"corrupt or truncated image, more than {MAX_VIEWS} photos, or bad parameters"}})
    async def predict(
        file: list[UploadFile] = File(..., description=f"the photo (JPEG, PNG, WebP, TIFF, BMP, GIF); up to {MAX_VIEWS} "
                                                       "photos of one place (views) in repeated file fields"),
        top_k: Optional[int] = Query(None, ge=1, description="how many cells to return (default 5)"),
        top_k_form: Optional[int] = Form(None, alias="top_k", ge=1, description="the same as a form field"),
    ) -> dict:
        k = top_k or top_k_form or 5
        if not admitted.acquire(blocking=False):
            for f in file:
                await f.close()
            raise HTTPException(503, f"busy: {max_inflight} photos are being processed and {max_queued} are waiting; "
                                     "retry in a moment", headers={"Retry-After": "1"})
        with counter_lock:
            in_flight["n"] += 1
        try:
            if len(file) > MAX_VIEWS:
                raise HTTPException(422, f"{len(file)} photos in one request: send at most {MAX_VIEWS} views of one place")
            uploads = []
            for i, f in enumerate(file, 1):
                data = await f.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise HTTPException(413, f"{f.filename or 'upload'}: {too_large}" if len(file) > 1 else too_large)
                uploads.append((data, f.filename or (f"upload {i}" if len(file) > 1 else "upload")))
            return await run_in_threadpool(infer, uploads, min(k, num_classes))
        finally:
            for f in file:
                await f.close()
            with counter_lock:
                in_flight["n"] -= 1
            admitted.release()

    return app


# ---- running ----------------------------------------------------------------------
HEADER_TIMEOUT_S = 10.0   # a client gets this long to send a request's line and headers (slowloris)
KEEP_ALIVE_S = 5          # idle keep-alive connections are closed after this
MAX_CONNECTIONS = 64      # more concurrent connections or tasks get 503 from uvicorn
MAX_HEADER_BYTES = 32 * 1024


def _header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol, closing a connection whose request line and headers take longer than ``timeout_s``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # still no complete request head

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the head arrived; the body is bounded by the upload limit

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request on this keep-alive connection gets the same deadline

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  header_timeout_s: float = HEADER_TIMEOUT_S, **kw: Any):
    """The uvicorn Config every server runs with: header-read and keep-alive timeouts, header size and connection limits."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=_header_timeout_protocol(header_timeout_s),
                          timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=MAX_CONNECTIONS,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, **kw)


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                    header_timeout_s: float = HEADER_TIMEOUT_S) -> Iterator[str]:
    """Run uvicorn for ``app`` in a background thread; yield its base URL (port 0 picks a free one)."""
    import uvicorn

    server = uvicorn.Server(server_config(app, host, port, log_level, header_timeout_s, access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, name="geolocate-uvicorn", daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)

