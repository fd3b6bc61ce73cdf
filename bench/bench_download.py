"""Mapillary download throughput: 1 vs N workers against the fake API with thumbnail latency.

Runs the real downloader (listing, ledger, atomic writes, JPEG checks, records)
against ``tests/fakes/mapillary_server.py`` on 127.0.0.1, where every thumbnail
answer is delayed by ``--latency-ms`` (a CDN round trip), and reports images/s.
Writes ``bench/results/download.json`` and prints markdown table rows.

    python bench/bench_download.py [--images 200] [--latency-ms 50] [--workers 1 8]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))   # the fake server lives with the tests

from fakes.mapillary_server import DEFAULT_BBOX, TOKEN, FakeMapillary, Faults, make_population  # noqa: E402

from geolocate.config import MapillaryConfig  # noqa: E402
from geolocate.io import write_json  # noqa: E402
from geolocate.sources.mapillary import Area, download  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "download.json"


def run_once(srv: FakeMapillary, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-mapillary-") as tmp:
        mc = MapillaryConfig(base_url=srv.base_url, workers=workers, rate_limit_per_s=0, page_limit=2000)
        t0 = time.perf_counter()
        stats = download(mc, [Area("bench", DEFAULT_BBOX)], tmp, TOKEN)
        seconds = time.perf_counter() - t0
        files = len(list((Path(tmp) / "raw" / "mapillary").glob("*.jpg")))
    assert stats.failed == 0 and files == stats.downloaded, (stats.failed, files, stats.downloaded)
    return {"workers": workers, "images": stats.downloaded, "seconds": round(seconds, 3),
            "images_per_s": round(stats.downloaded / seconds, 1), "api_requests": stats.requests}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200, help="images the fake API holds (about 6/7 are not panoramas)")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="delay of every thumbnail answer")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    os.environ.setdefault("GEOLOCATE_PROGRESS", "0")
    runs = []
    for w in args.workers:
        with FakeMapillary(images=make_population(args.images), faults=Faults(thumb_delay_s=args.latency_ms / 1000)) as srv:
            runs.append(run_once(srv, w))
    base = runs[0]["images_per_s"]
    for r in runs:
        r["speedup"] = round(r["images_per_s"] / base, 2) if base else None
    results = {
        "benchmark": "mapillary_download",
        "what": "fake Graph API v4 on 127.0.0.1; thumbnails 64x48 JPEG; listing + download + decode check + atomic write + ledger + records",
        "latency_ms": args.latency_ms,
        "population": args.images,
        "runs": runs,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    write_json(args.out, results)
    print(f"\n### Mapillary download ({args.latency_ms:.0f} ms per thumbnail, fake API)\n")
    print("| workers | images | seconds | images/s | speedup |")
    print("|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['workers']} | {r['images']} | {r['seconds']:.2f} | {r['images_per_s']:.1f} | {r['speedup']:.2f}x |")
    print(f"\nwritten {args.out}")
    return results


if __name__ == "__main__":
    main()
