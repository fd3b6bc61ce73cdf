"""The resumable downloader: list bbox tiles, fetch thumbnails at once, record them.

For each area the main thread walks the quadtree of bbox tiles (split while a
tile is >= ``max_area_deg2`` or a page comes back full), records each listed
image in the ledger and hands its fresh thumbnail URL to a bounded thread
pool. A worker downloads, checks the JPEG decodes, and writes it atomically to
``data/raw/mapillary/<id>.jpg``; the main thread then marks it done in the
ledger and only after that appends its record to ``data/records/mapillary.jsonl``.

A re-run (after Ctrl-C or kill -9) first reconciles: images done in the ledger
with a file on disk but no record get their record; a file already on disk is
adopted without a download. Tiles listed completely are skipped; images left
pending get a fresh URL from their tile's new listing, or from
``GET /<id>?fields=thumb_..._url``. So nothing is downloaded twice.
"""
from __future__ import annotations

import contextlib
import dataclasses as dc
import hashlib
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from ...io import ImageError, check_image, write_bytes, write_json
from ...progress import console, progress_bar
from ..base import ImageRecord, append_records, read_records, records_dir, write_records
from .areas import Area, AreaError, BBox, can_split, find_city, format_bbox, leaf_tiles, parse_bbox, read_cities_csv, split4
from .client import CancelledError as ClientCancelled
from .client import (LIST_FIELDS, THUMB_SIZES, AuthError, ExpiredURLError, MapillaryClient, MapillaryError, QuotaError,
                     RetryPolicy, thumb_field)
from .ledger import Ledger, ListedImage, row_to_listed, row_to_record, run_lock

TOKEN_ENV = "MAPILLARY_ACCESS_TOKEN"
MAX_ATTEMPTS_PER_IMAGE = 5      # runs that may retry an image that keeps failing
URL_REFRESHES = 2               # fresh thumbnail URLs asked for per image and run
FLUSH_EVERY_S = 1.0             # records are appended at least this often
FLUSH_EVERY_N = 200


class OptionError(ValueError):
    """A bad downloader option; one line naming the option."""


def token_from_env() -> str:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise AuthError(f"{TOKEN_ENV} is not set: create a client token at https://www.mapillary.com/dashboard/developers "
                        f"and run `export {TOKEN_ENV}='MLY|...'`")
    return token


def _parse_when(text: str, name: str, end: bool) -> int | None:
    """ms since epoch for an ISO date or date-time (UTC when naive); a bare end date includes its whole day."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            dt = datetime(d.year, d.month, d.day, tzinfo=timezone.utc) + (timedelta(days=1) if end else timedelta())
        else:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
            dt = dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
    except ValueError:
        raise OptionError(f"{name} must be an ISO date like 2023-06-01 (or 2023-06-01T12:00:00Z), got {text!r}") from None
    return int(dt.timestamp() * 1000)


def _iso_param(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dc.dataclass(frozen=True)
class Filters:
    is_pano: bool | None = False      # None: both kinds
    min_quality: float = 0.0
    since_ms: int | None = None
    until_ms: int | None = None       # exclusive

    def api_params(self) -> dict[str, str]:
        p: dict[str, str] = {}
        if self.is_pano is not None:
            p["is_pano"] = "true" if self.is_pano else "false"
        if self.since_ms is not None:
            p["start_captured_at"] = _iso_param(self.since_ms)
        if self.until_ms is not None:
            p["end_captured_at"] = _iso_param(self.until_ms)
        return p

    def signature(self) -> str:
        """Tiles listed under other filters must be listed again: this keys them."""
        return f"pano={self.is_pano};q={self.min_quality:g};since={self.since_ms};until={self.until_ms}"

    def accepts(self, im: ListedImage) -> bool:
        if self.is_pano is not None and im.is_pano is not None and bool(im.is_pano) != self.is_pano:
            return False
        if self.min_quality > 0 and (im.quality is None or im.quality < self.min_quality):
            return False
        if self.since_ms is not None and (im.captured_ms is None or im.captured_ms < self.since_ms):
            return False
        if self.until_ms is not None and (im.captured_ms is None or im.captured_ms >= self.until_ms):
            return False
        return True


@dc.dataclass(frozen=True)
class Options:
    """Checked, typed downloader options (from ``cfg.source.mapillary``)."""
    filters: Filters
    max_images: int
    thumb_size: str
    workers: int
    page_limit: int
    max_area_deg2: float
    base_url: str
    timeout_s: float
    rate_limit_per_s: float
    retry: RetryPolicy

    @classmethod
    def from_config(cls, mc: Any) -> "Options":
        pano = str(mc.is_pano).strip().lower()
        pano_map = {"false": False, "no": False, "0": False, "true": True, "yes": True, "1": True, "any": None, "all": None}
        if pano not in pano_map:
            raise OptionError(f"is_pano must be false (skip panoramas), true (panoramas only) or any, got {mc.is_pano!r}")
        size = str(mc.thumb_size).strip().lower()
        if size not in THUMB_SIZES:
            raise OptionError(f"thumb_size must be one of {', '.join(THUMB_SIZES)}, got {mc.thumb_size!r}")
        since = _parse_when(mc.since, "since", end=False)
        until = _parse_when(mc.until, "until", end=True)
        if since is not None and until is not None and since >= until:
            raise OptionError(f"since ({mc.since}) must be before until ({mc.until})")
        checks = [
            (mc.max_images >= 0, f"max_images must be >= 0 (0 = no cap), got {mc.max_images}"),
            (mc.min_quality >= 0, f"min_quality must be >= 0, got {mc.min_quality}"),
            (1 <= mc.workers <= 64, f"workers must be 1..64, got {mc.workers}"),
            (1 <= mc.page_limit <= 2000, f"page_limit must be 1..2000 (the API maximum), got {mc.page_limit}"),
            (0 < mc.max_area_deg2 <= 0.01, f"max_area_deg2 must be in (0, 0.01] (the API refuses larger boxes), got {mc.max_area_deg2}"),
            (mc.timeout_s > 0, f"timeout_s must be > 0, got {mc.timeout_s}"),
            (mc.rate_limit_per_s >= 0, f"rate_limit_per_s must be >= 0 (0 = unlimited), got {mc.rate_limit_per_s}"),
            (mc.retries >= 1, f"retries must be >= 1, got {mc.retries}"),
            (mc.backoff_s >= 0 and mc.backoff_max_s >= 0 and mc.quota_max_wait_s >= 0, "backoff_s, backoff_max_s and quota_max_wait_s must be >= 0"),
            (str(mc.base_url).startswith(("http://", "https://")), f"base_url must start with http:// or https://, got {mc.base_url!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise OptionError(msg)
        return cls(filters=Filters(is_pano=pano_map[pano], min_quality=float(mc.min_quality), since_ms=since, until_ms=until),
                   max_images=int(mc.max_images), thumb_size=size, workers=int(mc.workers), page_limit=int(mc.page_limit),
                   max_area_deg2=float(mc.max_area_deg2), base_url=str(mc.base_url), timeout_s=float(mc.timeout_s),
                   rate_limit_per_s=float(mc.rate_limit_per_s),
                   retry=RetryPolicy(attempts=int(mc.retries), backoff_s=float(mc.backoff_s),
                                     backoff_max_s=float(mc.backoff_max_s), quota_max_wait_s=float(mc.quota_max_wait_s)))

    @property
    def list_fields(self) -> list[str]:
        return [*LIST_FIELDS, thumb_field(self.thumb_size)]


def areas_from_config(mc: Any) -> list[Area]:
    """Areas named by ``bbox``, ``city`` and ``cities_csv`` (any combination, in that order)."""
    areas: list[Area] = []
    if mc.bbox:
        b = parse_bbox(mc.bbox)
        areas.append(Area(name=f"bbox {format_bbox(b)}", bbox=b))
    if mc.city:
        areas.append(find_city(mc.city, radius_km=mc.radius_km))
    if mc.cities_csv:
        areas.extend(read_cities_csv(mc.cities_csv, default_radius_km=mc.radius_km))
    if not areas:
        raise AreaError("nothing to download: give --bbox W,S,E,N, --city NAME or --batch cities/batch_01.csv "
                        "(config: source.mapillary.bbox, .city or .cities_csv)")
    return areas


# ---- API items -----------------------------------------------------------------
def _point(geom: Any) -> tuple[float, float] | None:
    """(lat, lon) from a GeoJSON Point, whose coordinates are [lon, lat]."""
    if not isinstance(geom, dict):
        return None
    coords = geom.get("coordinates")
    if not isinstance(coords, (list, tuple)) or len(coords) < 2:
        return None
    try:
        lon, lat = float(coords[0]), float(coords[1])
    except (TypeError, ValueError):
        return None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    return lat, lon


def _ms(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                return None
            return int((dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp() * 1000)
    return None


def _float(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def parse_item(item: Any, url_field: str) -> ListedImage | None:
    """One element of a search answer's ``data``; None when it has no usable id or location."""
    if not isinstance(item, dict):
        return None
    image_id = str(item.get("id") or "").strip()
    if not image_id or not image_id.replace("_", "").replace("-", "").isalnum():
        return None  # the id becomes a file name: accept only plain ids
    where = _point(item.get("computed_geometry")) or _point(item.get("geometry"))
    if where is None:
        return None
    creator = item.get("creator")
    username = creator.get("username") if isinstance(creator, dict) else (creator if isinstance(creator, str) else None)
    seq = item.get("sequence")
    seq = seq.get("id") if isinstance(seq, dict) else seq
    url = item.get(url_field)
    return ListedImage(id=image_id, lat=where[0], lon=where[1], sequence_id=str(seq) if seq else f"mly-{image_id}",
                       captured_ms=_ms(item.get("captured_at")), creator=username, heading=_float(item.get("compass_angle")),
                       is_pano=item.get("is_pano") if isinstance(item.get("is_pano"), bool) else None,
                       quality=_float(item.get("quality_score")), thumb_url=url if isinstance(url, str) and url else None)


# ---- results -------------------------------------------------------------------
@dc.dataclass
class Fetched:
    id: str
    path: str
    nbytes: int
    sha256: str
    adopted: bool          # the file was already on disk (a killed run wrote it): no download


@dc.dataclass
class RunStats:
    areas: int = 0
    tiles_listed: int = 0      # bbox searches made (first pages)
    tiles_skipped: int = 0     # tiles already listed completely by an earlier run
    splits: int = 0            # full pages that split their tile
    truncated_tiles: int = 0   # full pages at the smallest tile size (some images unreachable)
    pages: int = 0
    listed: int = 0            # images new to the ledger this run
    filtered: int = 0          # listed by the API but excluded by the filters (pano, quality, dates)
    unusable: int = 0          # items without a valid id or location
    downloaded: int = 0
    adopted: int = 0           # files already on disk, taken without a download
    failed: int = 0
    url_refreshes: int = 0     # expired thumbnail URLs re-listed
    records_appended: int = 0
    reconciled: int = 0        # records appended at start for images done but unrecorded
    done_total: int = 0        # images done in the ledger after the run
    failed_total: int = 0
    requests: int = 0
    retries: int = 0
    quota_waits: int = 0
    quota_wait_s: float = 0.0
    bytes: int = 0
    elapsed_s: float = 0.0
    failures: list[str] = dc.field(default_factory=list)

    def to_dict(self) -> dict:
        return dc.asdict(self)


def _no_progress(n: int = 1, description: str | None = None) -> None:
    return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- reconcile ------------------------------------------------------------------
def reconcile_records(ledger: Ledger, records_path: Path) -> tuple[set[str], int]:
    """Make the records file agree with the ledger; returns (ids recorded, records appended).

    Duplicate ids (never written by this code, but cheap to repair) are dropped
    by rewriting the file atomically; done images with a file on disk and no
    record get their record.
    """
    seen: set[str] = set()
    if records_path.exists():
        records, dup = [], False
        for r in read_records(records_path):
            if r.id in seen:
                dup = True
                continue
            seen.add(r.id)
            records.append(r)
        if dup:
            write_records(records_path, records)
    missing = [row_to_record(row) for row in ledger.done_rows() if row["id"] not in seen and row["path"] and Path(row["path"]).is_file()]
    if missing:
        append_records(records_path, missing)
        seen.update(r.id for r in missing)
    return seen, len(missing)


class Downloader:
    """One run over some areas; see the module docstring for the order of writes."""

    def __init__(self, opts: Options, data_dir: str | Path, client: MapillaryClient, raw_dir: str | Path | None = None,
                 progress: Callable[..., None] | None = None):
        self.opts = opts
        self.data_dir = Path(data_dir)
        # absolute, so records, ledger and clean-raw agree whatever the working directory
        self.raw_dir = (Path(raw_dir) if raw_dir is not None else self.data_dir / "raw" / "mapillary").resolve()
        self.state_dir = self.data_dir / "state"
        self.ledger_path = self.state_dir / "mapillary.sqlite"
        self.records_path = records_dir(self.data_dir) / "mapillary.jsonl"
        self.client = client
        self.external_progress = progress
        self.stats = RunStats()
        self._url_field = thumb_field(opts.thumb_size)
        self._inflight: dict[Future, str] = {}
        self._inflight_ids: set[str] = set()
        self._failed_now: set[str] = set()     # failed in this run: not retried again until the next run
        self._pending_records: list[ImageRecord] = []
        self._recorded: set[str] = set()
        self._last_flush = time.monotonic()
        self._advance: Callable[..., None] = _no_progress
        self._label = "mapillary"
        self._pool: ThreadPoolExecutor | None = None
        self._ledger: Ledger | None = None
        self._stats_lock = threading.Lock()   # workers count URL refreshes

    # ---- progress ----------------------------------------------------------
    @contextlib.contextmanager
    def _bar(self, description: str, total: int | None) -> Iterator[None]:
        """Our own bar, or, when the caller passed ``progress``, only its per-image ticks (one live bar at a time)."""
        if self.external_progress is not None:
            tick = self.external_progress
            self._advance = lambda n=1, description=None: tick(n) if n else None
            try:
                yield
            finally:
                self._advance = _no_progress
            return
        with progress_bar(description, total) as advance:
            self._advance = advance
            try:
                yield
            finally:
                self._advance = _no_progress

    def on_wait(self, exc: BaseException, seconds: float) -> None:
        """Called by the client before each retry sleep: show quota waits on the bar."""
        if isinstance(exc, QuotaError):
            msg = f"{self._label}: quota reached, waiting {seconds:.0f}s (HTTP 429)"
            self._advance(0, description=msg)
            if seconds >= 10:
                console.print(f"warning: {msg}: {exc}", markup=False, highlight=False, soft_wrap=True)
        else:
            self._advance(0, description=f"{self._label}: retrying in {seconds:.1f}s ({str(exc)[:60]})")

    def _describe(self) -> None:
        s = self.stats
        self._advance(0, description=f"{self._label}: listed {s.listed}, downloaded {s.downloaded + s.adopted}"
                                      + (f", failed {s.failed}" if s.failed else ""))

    # ---- run -----------------------------------------------------------------
    def run(self, areas: list[Area]) -> RunStats:
        t0 = time.monotonic()
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        with run_lock(self.state_dir), Ledger(self.ledger_path) as ledger:
            self._ledger = ledger
            for tmp in self.raw_dir.glob(".*.jpg.*.tmp"):   # left by a killed run (we hold the lock: nobody writes them now)
                tmp.unlink(missing_ok=True)
            self._recorded, self.stats.reconciled = reconcile_records(ledger, self.records_path)
            pool = ThreadPoolExecutor(max_workers=self.opts.workers, thread_name_prefix="mapillary")
            self._pool = pool
            try:
                for area in areas:
                    self._do_area(area)
                    self.stats.areas += 1
                self._do_pending()
            except BaseException:
                self.client.cancel()     # Ctrl-C or a fatal error: wake workers out of backoff/quota waits
                raise
            finally:
                # drop queued work, let running downloads end, keep what finished
                pool.shutdown(wait=True, cancel_futures=True)
                self._drain(block=False, final=True)
                self._flush(force=True)
            self.stats.done_total = ledger.count("done")
            self.stats.failed_total = ledger.count("failed")
        cs = self.client.stats
        self.stats.requests, self.stats.retries = cs.requests, cs.retries
        self.stats.quota_waits, self.stats.quota_wait_s = cs.quota_waits, round(cs.quota_wait_s, 3)
        self.stats.elapsed_s = round(time.monotonic() - t0, 3)
        write_json(self.state_dir / "mapillary_last_run.json", self.stats.to_dict())
        return self.stats

    def _do_area(self, area: Area) -> None:
        ledger, cap = self._ledger, self.opts.max_images
        self._label = area.name
        done_before = ledger.count_area(area.name, "done")
        with self._bar(f"mapillary {area.name}", total=cap or None):
            if self.external_progress is None:
                self._advance(min(done_before, cap) if cap else done_before)
            have = ledger.count_area(area.name)
            if cap and have >= cap:
                self._advance(0, description=f"{area.name}: {have} images listed already (cap {cap})")
            else:
                for items in self._walk(area):
                    taken = self._take(area, items, cap - have if cap else None)
                    have += taken
                    self._describe()
                    self._drain(block=False)
                    self._backpressure()
                    if cap and have >= cap:
                        break
            self._drain(block=True)
            self._flush(force=True)
            self._describe()

    def _walk(self, area: Area) -> Iterator[list]:
        """Yield pages of raw items for an area; a tile is marked done once all its pages were taken."""
        ledger, opts, stats = self._ledger, self.opts, self.stats
        sig = opts.filters.signature()
        params = opts.filters.api_params()
        stack: list[BBox] = list(reversed(leaf_tiles(area.bbox, opts.max_area_deg2)))
        while stack:
            tile = stack.pop()
            key = f"{sig}|{format_bbox(tile)}"
            if ledger.tile_done(key):
                stats.tiles_skipped += 1
                continue
            page = self.client.search_images(format_bbox(tile), opts.list_fields, opts.page_limit, params)
            stats.tiles_listed += 1
            stats.pages += 1
            data = page.get("data") or []
            if len(data) >= opts.page_limit:
                if can_split(tile):
                    # a full page hides more images: list the quarters instead (this page's
                    # URLs are fresh, so download them now; the quarters list them again)
                    stats.splits += 1
                    yield data
                    stack.extend(reversed(split4(tile)))
                    continue
                stats.truncated_tiles += 1
            count = len(data)
            yield data
            seen_next: set[str] = set()
            while data:
                nxt = (page.get("paging") or {}).get("next")
                if not nxt or nxt in seen_next:
                    break
                seen_next.add(nxt)
                page = self.client.get_json(nxt, what=f"image search bbox={format_bbox(tile)} (next page)")
                stats.pages += 1
                data = page.get("data") or []
                count += len(data)
                yield data
            ledger.mark_tile_done(key, area.name, count)

    def _take(self, area: Area, items: list, room: int | None) -> int:
        """Record a page's acceptable images and start their downloads; returns how many were new."""
        ledger, stats = self._ledger, self.stats
        parsed: dict[str, ListedImage] = {}
        for item in items:
            im = parse_item(item, self._url_field)
            if im is None:
                stats.unusable += 1
            elif not self.opts.filters.accepts(im):
                stats.filtered += 1
            else:
                parsed.setdefault(im.id, im)
        known = ledger.statuses(parsed, MAX_ATTEMPTS_PER_IMAGE)
        new = [im for i, im in parsed.items() if i not in known]
        if room is not None:
            new = new[:max(room, 0)]
        if new:
            stats.listed += ledger.add_listed(area.name, new)
        # new images, and ones an earlier run left pending (this listing brings them a fresh URL)
        for im in new + [im for i, im in parsed.items() if known.get(i) in ("listed", "failed") and i not in self._failed_now]:
            self._submit(im)
        return len(new)

    def _do_pending(self) -> None:
        """Images listed but not on disk (killed run, failures): fetch with a fresh URL from the API."""
        skip = self._inflight_ids | self._failed_now
        rows = [r for r in self._ledger.pending(MAX_ATTEMPTS_PER_IMAGE) if r["id"] not in skip]
        rows = [r for r in rows if self.opts.filters.accepts(row_to_listed(r))]
        if not rows:
            return
        self._label = "pending"
        with self._bar("mapillary: finishing pending images", total=len(rows)):
            for r in rows:
                self._submit(row_to_listed(r))
                self._drain(block=False)
                self._backpressure()
            self._drain(block=True)
            self._flush(force=True)

    # ---- workers ---------------------------------------------------------------
    def _submit(self, im: ListedImage) -> None:
        if im.id in self._inflight_ids:
            return
        fut = self._pool.submit(self._fetch, im.id, im.thumb_url)
        self._inflight[fut] = im.id
        self._inflight_ids.add(im.id)

    def _backpressure(self) -> None:
        limit = max(16, 4 * self.opts.workers)
        while len(self._inflight) > limit:
            self._drain(block=True, one=True)

    def _fetch(self, image_id: str, url: str | None) -> Fetched:
        """Worker: adopt a verified file already on disk, else download, verify, write atomically."""
        path = self.raw_dir / f"{image_id}.jpg"
        if path.is_file():
            try:
                data = path.read_bytes()
                check_image(data, name=str(path))
                return Fetched(image_id, str(path), len(data), _sha256(data), adopted=True)
            except ImageError:
                path.unlink(missing_ok=True)
        refreshes = 0
        while True:
            if url is None:
                url = self.client.thumb_url(image_id, self.opts.thumb_size)
                with self._stats_lock:
                    self.stats.url_refreshes += 1
                refreshes += 1
                if url is None:
                    raise MapillaryError(f"image {image_id}: the API gives no {self._url_field}")
            try:
                data = self.client.fetch_thumbnail(url, image_id)
                break
            except ExpiredURLError:
                if refreshes >= URL_REFRESHES:
                    raise
                url = None
        write_bytes(path, data)
        return Fetched(image_id, str(path), len(data), _sha256(data), adopted=False)

    def _drain(self, block: bool, one: bool = False, final: bool = False) -> None:
        """Handle finished downloads (main thread only: it owns the ledger)."""
        while self._inflight:
            # short waits, not one long one: a Ctrl-C may land on a worker thread, and the
            # main thread only raises KeyboardInterrupt once it runs Python code again
            done, _ = wait(list(self._inflight), timeout=0.2 if block else 0, return_when=FIRST_COMPLETED)
            if not done:
                if block:
                    continue
                return
            for fut in done:
                image_id = self._inflight.pop(fut)
                self._inflight_ids.discard(image_id)
                self._handle(image_id, fut, final)
            self._flush()
            if one or not block:
                return

    def _handle(self, image_id: str, fut: Future, final: bool) -> None:
        stats, ledger = self.stats, self._ledger
        try:
            res: Fetched = fut.result()
        except (CancelledError, ClientCancelled):
            return   # stopped by Ctrl-C or a fatal error: still pending, not failed
        except (AuthError, QuotaError) as e:
            if final:
                return
            raise e  # the token is refused or the quota never came back: stop the whole run
        except Exception as e:  # noqa: BLE001 - one image failing must not stop the others
            msg = str(e) or type(e).__name__
            ledger.mark_failed(image_id, msg)
            self._failed_now.add(image_id)
            stats.failed += 1
            if len(stats.failures) < 20:
                stats.failures.append(f"{image_id}: {msg}")
            return
        ledger.mark_done(image_id, res.path, res.nbytes, res.sha256)
        if res.adopted:
            stats.adopted += 1
        else:
            stats.downloaded += 1
            stats.bytes += res.nbytes
        if image_id not in self._recorded:
            self._pending_records.append(row_to_record(ledger.row(image_id)))
            self._recorded.add(image_id)
        self._advance(1)

    def _flush(self, force: bool = False) -> None:
        """Append finished records (after their file and ledger row are in place)."""
        if not self._pending_records:
            return
        if force or len(self._pending_records) >= FLUSH_EVERY_N or time.monotonic() - self._last_flush >= FLUSH_EVERY_S:
            append_records(self.records_path, self._pending_records)
            self.stats.records_appended += len(self._pending_records)
            self._pending_records = []
            self._last_flush = time.monotonic()


def download(mc: Any, areas: list[Area], data_dir: str | Path, token: str, raw_dir: str | Path | None = None,
             progress: Callable[..., None] | None = None, check_token: bool = True) -> RunStats:
    """Check the options and token (one tiny request), then download every area."""
    opts = Options.from_config(mc)
    dl: Downloader | None = None

    def on_wait(exc: BaseException, seconds: float) -> None:
        if dl is not None:
            dl.on_wait(exc, seconds)

    with MapillaryClient(token, opts.base_url, timeout_s=opts.timeout_s, rate_limit_per_s=opts.rate_limit_per_s,
                         retry=opts.retry, pool_size=opts.workers, on_wait=on_wait) as client:
        dl = Downloader(opts, data_dir, client, raw_dir=raw_dir, progress=progress)
        if check_token and areas:
            w, s, e, n = areas[0].bbox
            cx, cy = (w + e) / 2, (s + n) / 2
            client.check_token(format_bbox((cx - 1e-4, cy - 1e-4, cx + 1e-4, cy + 1e-4)))
        return dl.run(areas)
