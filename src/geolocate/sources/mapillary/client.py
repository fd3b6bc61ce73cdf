"""Mapillary Graph API v4 client: auth, rate limit, retries, thumbnails.

* Every API call sends ``Authorization: OAuth <token>`` and first takes a token
  from a shared :class:`TokenBucket` (requests per second).
* 5xx answers, timeouts, dropped connections and broken image bodies are
  retried with exponential backoff plus jitter (tenacity), ``retries`` times.
* 429 / "Application request limit reached" means the quota is spent: every
  thread pauses for ``Retry-After`` seconds when the server sends it (else the
  backoff), then resumes; it gives up only after ``quota_max_wait_s``.
* 401 (bad or expired token) is fatal at once and carries the API's message.
* Thumbnail URLs are signed and expire; they are fetched without the token
  (they live on a CDN) and a 403/404/410 there raises :class:`ExpiredURLError`
  so the caller can ask the API for a fresh URL.
"""
from __future__ import annotations

import dataclasses as dc
import email.utils
import threading
import time
from typing import Any, Callable

import httpx
import tenacity

from ...io import ImageError, check_image

THUMB_SIZES = ("256", "1024", "2048", "original")
LIST_FIELDS = ("id", "geometry", "computed_geometry", "captured_at", "compass_angle", "sequence", "is_pano", "creator", "quality_score")
QUOTA_CODES = {4, 17, 32, 613}     # Graph API "request limit reached" codes
AUTH_CODES = {190, 102}            # invalid / expired OAuth token
MAX_THUMB_BYTES = 64 * 1024 * 1024
USER_AGENT = "geolocate-mapillary/0.1 (+https://www.mapillary.com/developer)"


def thumb_field(size: str) -> str:
    if str(size) not in THUMB_SIZES:
        raise ValueError(f"thumb_size must be one of {', '.join(THUMB_SIZES)}, got {size!r}")
    return f"thumb_{size}_url"


class MapillaryError(RuntimeError):
    """An API or download error; ``str()`` is one readable line."""

    def __init__(self, message: str, status: int | None = None, code: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


class AuthError(MapillaryError):
    """Missing, invalid or expired token: nothing can work, stop at once."""


class QuotaError(MapillaryError):
    """429 / request limit reached: wait (Retry-After if given) and resume."""


class TransientError(MapillaryError):
    """5xx, a broken or truncated body: retry with backoff."""


class BadImageError(TransientError):
    """A thumbnail body that does not decode as an image."""


class ExpiredURLError(MapillaryError):
    """A thumbnail URL that no longer works (signed URLs expire): ask the API for a fresh one."""


class CancelledError(MapillaryError):
    """The client was closed or cancelled (Ctrl-C) while this call waited."""


@dc.dataclass
class RetryPolicy:
    attempts: int = 6            # tries per call on 5xx / timeouts / broken bodies
    backoff_s: float = 1.0       # first wait; doubles each try, plus up to backoff_s of jitter
    backoff_max_s: float = 60.0
    quota_max_wait_s: float = 3600.0


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_response(resp: httpx.Response, what: str, api: bool = True) -> MapillaryError:
    """Turn a non-200 answer into the right error, keeping the API's own message."""
    status = resp.status_code
    message, code = "", None
    try:
        body = resp.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or "")
            code = err.get("code") if isinstance(err.get("code"), int) else None
    except (ValueError, UnicodeDecodeError):
        pass
    if not message:
        text = resp.text.strip().replace("\n", " ") if resp.content else ""
        message = text[:200] or resp.reason_phrase or "no message"
    line = f"{what}: HTTP {status}: {message}"
    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    if status == 429 or code in QUOTA_CODES:
        return QuotaError(line, status, code, retry_after)
    if status >= 500:
        return TransientError(line, status, code, retry_after)
    if api and (status in (401, 403) or code in AUTH_CODES):
        return AuthError(line, status, code)
    if not api and status in (403, 404, 410):
        return ExpiredURLError(line, status, code)
    return MapillaryError(line, status, code)


class TokenBucket:
    """Thread-safe token bucket: ``rate`` calls per second, bursts up to ``burst``.

    Callers reserve a token and sleep outside the lock until it is theirs, so
    waiting threads queue fairly. ``pause(s)`` holds everyone back (quota waits).
    """

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = float(rate)
        self.capacity = float(burst if burst is not None else max(1.0, self.rate))
        self.tokens = self.capacity
        self._clock, self._sleep = clock, sleep
        self._t = clock()
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            wait = 0.0
            if self.rate > 0:
                self.tokens = min(self.capacity, self.tokens + (now - self._t) * self.rate)
                self._t = now
                self.tokens -= 1.0
                if self.tokens < 0:
                    wait = -self.tokens / self.rate
            wait = max(wait, self._paused_until - now)
        if wait > 0:
            self._sleep(wait)
        return wait

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)


WaitHook = Callable[[MapillaryError | BaseException, float], None]


@dc.dataclass
class ClientStats:
    requests: int = 0
    thumbnails: int = 0
    retries: int = 0
    quota_waits: int = 0
    quota_wait_s: float = 0.0


class MapillaryClient:
    """A thread-safe client for one token; use as a context manager."""

    def __init__(self, token: str, base_url: str = "https://graph.mapillary.com", *, timeout_s: float = 30.0,
                 rate_limit_per_s: float = 10.0, retry: RetryPolicy | None = None, pool_size: int = 8,
                 on_wait: WaitHook | None = None, sleep: Callable[[float], None] | None = None):
        if not token or not token.strip():
            raise AuthError("no Mapillary access token: export MAPILLARY_ACCESS_TOKEN=MLY|... "
                            "(create a client token at https://www.mapillary.com/dashboard/developers)")
        self.base_url = base_url.rstrip("/")
        self._base = httpx.URL(self.base_url)
        if self._base.scheme not in ("http", "https") or not self._base.host:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.retry = retry or RetryPolicy()
        self.on_wait = on_wait
        self.stats = ClientStats()
        self._stats_lock = threading.Lock()
        self._cancelled = threading.Event()
        self._sleep = sleep or self._wait_unless_cancelled
        self.bucket = TokenBucket(rate_limit_per_s, sleep=self._sleep)
        limits = httpx.Limits(max_connections=pool_size + 4, max_keepalive_connections=pool_size + 4)
        timeout = httpx.Timeout(timeout_s)
        self._api = httpx.Client(headers={"Authorization": f"OAuth {token.strip()}", "User-Agent": USER_AGENT},
                                 timeout=timeout, limits=limits)
        # thumbnails live on a CDN: never send the token there
        self._cdn = httpx.Client(headers={"User-Agent": USER_AGENT}, timeout=timeout, limits=limits, follow_redirects=True)

    def cancel(self) -> None:
        """Wake every thread waiting on a backoff, the quota or the rate limit: they raise CancelledError."""
        self._cancelled.set()

    def _wait_unless_cancelled(self, seconds: float) -> None:
        # in short slices: a Ctrl-C delivered to another thread only interrupts the
        # main thread once it runs Python code again (quota waits can last minutes)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self._cancelled.wait(min(left, 0.25)):
                raise CancelledError("cancelled")

    def close(self) -> None:
        self.cancel()
        self._api.close()
        self._cdn.close()

    def __enter__(self) -> "MapillaryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- retries -----------------------------------------------------------
    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        policy = self.retry
        transient_failures = 0
        jittered = (tenacity.wait_exponential(multiplier=policy.backoff_s, max=policy.backoff_max_s)
                    + tenacity.wait_random(0, policy.backoff_s))

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, (QuotaError, TransientError, httpx.TimeoutException, httpx.TransportError))

        def stop(rs: tenacity.RetryCallState) -> bool:
            nonlocal transient_failures
            if isinstance(rs.outcome.exception(), QuotaError):
                return rs.seconds_since_start >= policy.quota_max_wait_s
            transient_failures += 1
            return transient_failures >= policy.attempts

        def wait(rs: tenacity.RetryCallState) -> float:
            exc = rs.outcome.exception()
            if isinstance(exc, QuotaError):
                left = max(policy.quota_max_wait_s - rs.seconds_since_start, 0.0)  # never wait past the quota budget
                if exc.retry_after is not None:
                    # as long as the server asks (never less than the first backoff, so "0" cannot make us hammer it)
                    return min(max(exc.retry_after, policy.backoff_s), left)
                return min(float(jittered(rs)), left)
            return float(jittered(rs))

        def before_sleep(rs: tenacity.RetryCallState) -> None:
            exc = rs.outcome.exception()
            seconds = rs.next_action.sleep if rs.next_action else 0.0
            with self._stats_lock:
                self.stats.retries += 1
                if isinstance(exc, QuotaError):
                    self.stats.quota_waits += 1
                    self.stats.quota_wait_s += seconds
            if isinstance(exc, QuotaError):
                self.bucket.pause(seconds)   # the quota is per token: hold every thread back
            if self.on_wait:
                self.on_wait(exc, seconds)

        retrying = tenacity.Retrying(retry=tenacity.retry_if_exception(retryable), stop=stop, wait=wait,
                                     before_sleep=before_sleep, sleep=self._sleep, reraise=True)
        try:
            return retrying(fn)
        except httpx.TimeoutException as e:
            raise TransientError(f"{what}: timed out after {policy.attempts} tries ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise TransientError(f"{what}: connection failed after {policy.attempts} tries ({type(e).__name__}: {e})") from None

    def _count(self, field: str) -> None:
        with self._stats_lock:
            setattr(self.stats, field, getattr(self.stats, field) + 1)

    # ---- API ---------------------------------------------------------------
    def _api_url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            url = httpx.URL(path_or_url)
            if (url.scheme, url.host, url.port) != (self._base.scheme, self._base.host, self._base.port):
                raise MapillaryError(f"refusing to send the token to {url.scheme}://{url.host}: paging URL is not on {self.base_url}")
            return path_or_url
        return f"{self.base_url}/{path_or_url.lstrip('/')}"

    def get_json(self, path_or_url: str, params: dict | None = None, what: str | None = None) -> dict:
        url = self._api_url(path_or_url)
        what = what or f"GET {path_or_url.split('?')[0]}"

        def once() -> dict:
            self.bucket.acquire()
            self._count("requests")
            resp = self._api.get(url, params=params)
            if resp.status_code != 200:
                raise error_from_response(resp, what, api=True)
            try:
                body = resp.json()
            except ValueError:
                raise TransientError(f"{what}: answer is not JSON ({len(resp.content)} bytes)") from None
            if not isinstance(body, dict):
                raise TransientError(f"{what}: answer is not a JSON object")
            return body

        return self._call(once, what)

    def search_images(self, bbox: str, fields: list[str] | tuple[str, ...], limit: int, extra: dict | None = None) -> dict:
        params = {"bbox": bbox, "fields": ",".join(fields), "limit": str(limit), **(extra or {})}
        return self.get_json("/images", params, what=f"image search bbox={bbox}")

    def check_token(self, bbox: str) -> None:
        """One tiny search: raises AuthError with the API's message on a bad token."""
        self.search_images(bbox, ("id",), 1)

    def thumb_url(self, image_id: str, size: str) -> str | None:
        """A fresh thumbnail URL for one image (URLs from a listing expire)."""
        field = thumb_field(size)
        body = self.get_json(f"/{image_id}", {"fields": field}, what=f"image {image_id}")
        url = body.get(field)
        return url if isinstance(url, str) and url else None

    # ---- thumbnails ------------------------------------------------------------
    def fetch_thumbnail(self, url: str, name: str) -> bytes:
        """Download a thumbnail and check it decodes; retried on broken bodies."""
        what = f"thumbnail {name}"

        def once() -> bytes:
            self._count("thumbnails")
            with self._cdn.stream("GET", url) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise error_from_response(resp, what, api=False)
                chunks, total = [], 0
                for chunk in resp.iter_bytes():
                    total += len(chunk)
                    if total > MAX_THUMB_BYTES:
                        raise MapillaryError(f"{what}: larger than {MAX_THUMB_BYTES} bytes, refused")
                    chunks.append(chunk)
                data = b"".join(chunks)
                # httpx already raises when the peer closes early; this catches a short body it let through
                encoded = resp.headers.get("Content-Encoding", "identity") not in ("", "identity")
                declared = None if encoded else resp.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) != len(data):
                raise TransientError(f"{what}: truncated body ({len(data)} of {declared} bytes)")
            try:
                check_image(data, name=what)
            except ImageError as e:
                raise BadImageError(str(e)) from None
            return data

        return self._call(once, what)
