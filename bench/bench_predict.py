"""Prediction throughput, PyTorch eager vs ONNX Runtime, and HTTP server latency under load.

On the same N real photos (``../shared/photos`` repeated to N, or generated
JPEGs when that folder is absent):

- ``Geolocator.predict`` end to end (decode on 2 threads, EXIF, preprocess,
  forward, top-5) with the PyTorch eager engine and with the ONNX Runtime
  engine — images/s;
- model only (preprocessed float batches in, probabilities out, no decoding):
  ONNX Runtime and PyTorch — images/s, with the max probability difference;
- ``geolocate serve`` in a separate process on 127.0.0.1: R requests at C
  concurrent (``POST /predict`` multipart uploads of those photos) — p50/p95
  latency, requests/s and the error count, per engine.

The model is ``--model``, else ``models/best.pt``, else a tiny one trained on the
spot the way tests/conftest.py's ``trained`` fixture does (frozen
EfficientNet-Lite0: the backbone, which dominates the cost, is the real one).
Writes ``bench/results/predict.json``.

    python bench/bench_predict.py [--images 256] [--batch-size 32] [--requests 200] [--concurrency 8]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GEOLOCATE_PROGRESS", "0")

from geolocate.io import load_image, write_json  # noqa: E402
from geolocate.serving import Geolocator  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "predict.json"
PHOTOS = ROOT.parent / "shared" / "photos"


# ---- inputs ---------------------------------------------------------------------------
def find_or_train_model(explicit: Path | None, tmp: Path) -> tuple[Path, str]:
    if explicit is not None:
        return explicit, str(explicit)
    best = ROOT / "models" / "best.pt"
    if best.is_file():
        return best, "models/best.pt"
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_config  # the fixture's recipe: 480 Earth patches, frozen EfficientNet-Lite0

    from geolocate.index import build_index, make_splits
    from geolocate.runs.experiment import run_experiment
    from geolocate.sources import get_source

    cfg = tiny_config(tmp / "ws")
    print("no models/best.pt: training a tiny model (tests/conftest.py recipe)…", flush=True)
    get_source("earth")(cfg, Path(cfg.paths.data_dir) / "raw" / "earth")
    build_index(cfg)
    make_splits(cfg)
    run_dir = run_experiment(cfg)
    return run_dir / "checkpoints" / "model.pt", "tiny model trained by the benchmark (tests/conftest.py recipe)"


def image_files(n: int, tmp: Path) -> tuple[list[Path], str]:
    photos = sorted(PHOTOS.glob("*.jpg")) if PHOTOS.is_dir() else []
    if photos:
        return [photos[i % len(photos)] for i in range(n)], f"{len(photos)} real photos from ../shared/photos, repeated to {n}"
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(min(n, 64)):
        base = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((1024, 768), Image.BICUBIC)
        p = tmp / f"gen_{i:03d}.jpg"
        im.save(p, quality=90)
        out.append(p)
    return [out[i % len(out)] for i in range(n)], f"{len(out)} generated 1024x768 JPEGs, repeated to {n}"


# ---- measurements ------------------------------------------------------------------------
def end_to_end(geo: Geolocator, files: list[Path], batch_size: int) -> dict:
    geo.predict(files[:batch_size], batch_size=batch_size)  # warm-up (allocations, lazy init)
    t0 = time.perf_counter()
    preds = geo.predict(files, batch_size=batch_size)
    s = time.perf_counter() - t0
    assert all(p.error is None for p in preds)
    return {"images": len(files), "seconds": round(s, 3), "images_per_s": round(len(files) / s, 1),
            "top1": [p.top[0].cell for p in preds]}


def model_only(geo: Geolocator, batch: np.ndarray, batch_size: int) -> tuple[dict, np.ndarray]:
    geo.probabilities(batch[:batch_size])  # warm-up
    outs = []
    t0 = time.perf_counter()
    for i in range(0, len(batch), batch_size):
        outs.append(geo.probabilities(batch[i:i + batch_size]))
    s = time.perf_counter() - t0
    return {"images": len(batch), "seconds": round(s, 3), "images_per_s": round(len(batch) / s, 1)}, np.concatenate(outs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_load(model: Path, engine: str, files: list[Path], requests: int, concurrency: int) -> dict:
    """Start ``geolocate serve`` in its own process and hit it with ``requests`` uploads, ``concurrency`` at a time."""
    import httpx

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-c", "from geolocate.cli import app; app()", "serve", "--model", str(model),
           "--port", str(port), "--engine", engine]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not start in 120 s")
            time.sleep(0.2)
        blobs = [(p.name, p.read_bytes()) for p in files[:max(concurrency, 32)]]
        lat: list[float] = []
        codes: list[int] = []
        lock = threading.Lock()
        with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
            def one(i: int) -> None:
                name, data = blobs[i % len(blobs)]
                t = time.perf_counter()
                try:
                    code = client.post("/predict", files={"file": (name, data, "image/jpeg")}).status_code
                except httpx.HTTPError:
                    code = -1
                with lock:
                    lat.append(time.perf_counter() - t)
                    codes.append(code)

            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(one, range(concurrency)))  # warm-up round
                lat.clear(), codes.clear()
                t0 = time.perf_counter()
                list(pool.map(one, range(requests)))
                wall = time.perf_counter() - t0
        ms = np.array(lat) * 1000
        return {"engine": engine, "requests": requests, "concurrency": concurrency, "ok": codes.count(200),
                "errors": len(codes) - codes.count(200), "p50_ms": round(float(np.percentile(ms, 50)), 1),
                "p95_ms": round(float(np.percentile(ms, 95)), 1), "max_ms": round(float(ms.max()), 1),
                "requests_per_s": round(requests / wall, 1), "seconds": round(wall, 2)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- main ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--server-engines", nargs="+", default=["onnx", "torch"], choices=["onnx", "torch"])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp_s:
        tmp = Path(tmp_s)
        source_model, model_desc = find_or_train_model(args.model, tmp)
        model = tmp / "model.pt"  # a private copy: the ONNX file is exported next to it, not next to the user's model
        shutil.copy(source_model, model)
        files, images_desc = image_files(args.images, tmp)
        t0 = time.perf_counter()
        onnx_geo = Geolocator.from_pretrained(model, engine="onnx")
        export_s = time.perf_counter() - t0
        torch_geo = Geolocator.from_pretrained(model, engine="torch")
        print(f"model {model_desc}; {images_desc}; ONNX export {export_s:.1f} s", flush=True)

        e2e_torch = end_to_end(torch_geo, files, args.batch_size)
        e2e_onnx = end_to_end(onnx_geo, files, args.batch_size)
        agree = float(np.mean([a == b for a, b in zip(e2e_torch.pop("top1"), e2e_onnx.pop("top1"))]))

        pp = torch_geo.preprocess
        uniq = {p: pp.load_array(p) for p in dict.fromkeys(files)}
        batch = np.stack([uniq[p] for p in files]).astype(np.float32)
        mo_onnx, p_onnx = model_only(onnx_geo, batch, args.batch_size)
        mo_torch, p_torch = model_only(torch_geo, batch, args.batch_size)

        servers = {eng: server_load(model, eng, files, args.requests, args.concurrency) for eng in args.server_engines}

    results = {
        "benchmark": "predict",
        "what": "Geolocator.predict on image files (decode+EXIF+preprocess+forward+top-5) per engine; model-only "
                "forward on preprocessed batches; `geolocate serve` (separate process, loopback) under concurrent uploads",
        "model": model_desc,
        "images": images_desc,
        "batch_size": args.batch_size,
        "onnx_export_s": round(export_s, 2),
        "end_to_end": {"torch": e2e_torch, "onnx": e2e_onnx,
                       "onnx_speedup": round(e2e_onnx["images_per_s"] / e2e_torch["images_per_s"], 2),
                       "top1_agreement": agree},
        "model_only": {"onnx": mo_onnx, "torch": mo_torch,
                       "onnx_speedup": round(mo_onnx["images_per_s"] / mo_torch["images_per_s"], 2),
                       "max_abs_prob_diff": float(np.abs(p_onnx - p_torch).max())},
        "server": servers,
        "headline": [
            {"name": "predict, PyTorch eager (end to end)", "value": e2e_torch["images_per_s"], "unit": "images/s"},
            {"name": "predict, ONNX Runtime (end to end)", "value": e2e_onnx["images_per_s"], "unit": "images/s"},
            {"name": "model only, ONNX Runtime (preprocessed batches)", "value": mo_onnx["images_per_s"], "unit": "images/s"},
            {"name": "model only, PyTorch eager (preprocessed batches)", "value": mo_torch["images_per_s"], "unit": "images/s"},
        ] + [item for eng, s in servers.items() for item in (
            {"name": f"server ({eng}) p50, {s['requests']} requests at {s['concurrency']} concurrent", "value": s["p50_ms"], "unit": "ms"},
            {"name": f"server ({eng}) p95", "value": s["p95_ms"], "unit": "ms"},
            {"name": f"server ({eng}) throughput ({s['errors']} errors)", "value": s["requests_per_s"], "unit": "requests/s"},
        )],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch_threads": torch.get_num_threads(), "load_average_1m": round(os.getloadavg()[0], 2)},
    }
    write_json(args.out, results)
    print(f"\n### Prediction throughput ({results['images']}, batch {args.batch_size})\n")
    print("| engine | end to end images/s | model only images/s |")
    print("|---|---:|---:|")
    for eng in ("torch", "onnx"):
        print(f"| {eng} | {results['end_to_end'][eng]['images_per_s']:.1f} | {results['model_only'][eng]['images_per_s']:.1f} |")
    print(f"\n| server engine | requests | concurrency | p50 ms | p95 ms | requests/s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s in servers.values():
        print(f"| {s['engine']} | {s['requests']} | {s['concurrency']} | {s['p50_ms']} | {s['p95_ms']} | {s['requests_per_s']} | {s['errors']} |")
    print(f"\nwritten {args.out}")
    return results


if __name__ == "__main__":
    main()
