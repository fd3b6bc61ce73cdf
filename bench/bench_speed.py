"""The fast path against its limit: each production path vs the cheapest possible code, in one run.

LIMIT B is the cheapest decode (Pillow JPEG draft at the model size, crop+resize in one call,
uint8 -> float32 normalisation) + ONNX Runtime, on 2 workers x 1 intra-op thread, over the
same images and the same exported network. Each row compares a real path with the LIMIT of
the same work, measured in this process at this time:

- ``predict (default engine)``: ``Geolocator.from_pretrained(model).predict(paths)``, model loaded;
- ``predict CLI end to end``: ``geolocate predict DIR --json`` in a fresh process (start-up,
  model load, decode, inference, printing) vs the LIMIT's time for the same images;
- ``embedding extraction``: ``embed_paths`` of the frozen backbone (export cached) vs the LIMIT
  over the backbone-only network;
- ``index build + split``: the real ``build_index`` + ``make_splits`` on 1M synthetic records vs a plain
  polars read of the same files (rows/s in the img_per_s columns).

Writes ``bench/results/speed.json``: ``rows`` of ``{"path", "img_per_s", "limit_img_per_s", "ratio"}``.

    python bench/bench_speed.py [--images 256] [--model models/best.pt]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GEOLOCATE_PROGRESS", "0")

from geolocate.io import write_json  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "speed.json"
WORKERS = 2


def limit_b(onnx_file: Path, files: list[Path], size: int, mean, std, batch: int = 32):
    """A callable running the cheapest decode + ORT over ``files`` on WORKERS threads x 1 intra-op thread."""
    import onnxruntime as ort
    from PIL import Image

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    out = sess.get_outputs()[-1].name
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
    bias = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)

    def decode(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            im.draft("RGB", (size, size))
            w, h = im.size
            s = min(w, h)
            im = im.convert("RGB").resize((size, size), Image.BILINEAR, box=((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        return np.asarray(im, np.float32) * scale + bias

    def work(i: int) -> None:
        x = np.stack([decode(p) for p in files[i:i + batch]]).transpose(0, 3, 1, 2)
        sess.run([out], {inp: np.ascontiguousarray(x)})

    def run() -> None:
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(work, range(0, len(files), batch)))

    work(0)
    return run


def compare(path: str, n: int, fn, limit, repeat: int = 3) -> dict:
    """Best-of-``repeat`` images/s of ``fn`` and ``limit``, run alternately so both see the same machine load."""
    best = {"fn": float("inf"), "limit": float("inf")}
    for _ in range(repeat):
        for key, f in (("limit", limit), ("fn", fn)):
            t0 = time.perf_counter()
            f()
            best[key] = min(best[key], time.perf_counter() - t0)
    ips, lim = n / best["fn"], n / best["limit"]
    return {"path": path, "img_per_s": round(ips, 1), "limit_img_per_s": round(lim, 1), "ratio": round(ips / lim, 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--index-rows", type=int, default=1_000_000, help="rows for the index row (0: skip it)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from bench_predict import find_or_train_model, image_files

    from geolocate.serving import Geolocator

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp_s:
        tmp = Path(tmp_s)
        source_model, model_desc = find_or_train_model(args.model, tmp)
        model = tmp / "model.pt"
        shutil.copy(source_model, model)
        files, images_desc = image_files(args.images, tmp)
        geo = Geolocator.from_pretrained(model)  # exports model.onnx beside the copy (parity-checked)
        assert geo.engine_name == "onnx", geo.engine_name
        pp = geo.preprocess
        lim = limit_b(model.with_suffix(".onnx"), files, pp.size, pp.mean, pp.std)
        geo.predict(files[:32])
        rows.append(compare("predict (default engine, Geolocator.predict)", len(files), lambda: geo.predict(files), lim))

        # the CLI in a fresh process, everything included: a folder of the same images
        d = tmp / "imgs"
        d.mkdir()
        for i, f in enumerate(files):
            os.symlink(f, d / f"{i:04d}_{f.name}")
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "geolocate.predict", str(d), "--model", str(model), "--json"]

        def cli() -> None:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            assert r.returncode == 0 and r.stdout.count("\n") == len(files), r.stderr[-2000:]

        rows.append(compare("predict CLI end to end (geolocate predict DIR --json, start-up included)", len(files), cli, lim))

        # embedding extraction: the frozen backbone, export cached, vs LIMIT B over the backbone alone
        from geolocate.models import create_backbone
        from geolocate.models.onnx import backbone_onnx
        from geolocate.training.embeddings import embed_paths

        bb = create_backbone(geo.info["backbone"]).eval()
        cache = tmp / "onnx-cache"
        bb_file = backbone_onnx(bb, cache)
        lim_bb = limit_b(bb_file, files, pp.size, pp.mean, pp.std)
        embed_paths(bb, files[:32], onnx_cache=cache)
        rows.append(compare("embedding extraction (embed_paths, frozen backbone)", len(files),
                            lambda: embed_paths(bb, files, onnx_cache=cache), lim_bb))

    # the index: the real build_index + make_splits against a plain polars read of the same records (rows/s)
    if args.index_rows:
        from bench_index import real_index, synthetic

        t, _ = real_index(synthetic(args.index_rows), 4, 8, (0.8, 0.15, 0.05))
        rows.append({"path": f"index build + split ({args.index_rows:,} rows; coverage plot not included)",
                     "img_per_s": round(args.index_rows / t["index_plus_split"], 1),
                     "limit_img_per_s": round(args.index_rows / t["polars_read_ndjson"], 1),
                     "ratio": round(t["polars_read_ndjson"] / t["index_plus_split"], 3)})

    result = {
        "benchmark": "speed",
        "what": f"each path vs LIMIT B (cheapest decode + ONNX Runtime, {WORKERS} workers x 1 thread) on the same "
                f"{len(files)} images in one run; {images_desc}; model: {model_desc}",
        "rows": rows,
        "targets": {"predict (default engine, Geolocator.predict)": 0.8, "predict CLI end to end": 0.6,
                    "embedding extraction": 0.8, "index build + split": 0.5},
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    write_json(args.out, result)
    for r in rows:
        print(f"{r['ratio']:>6.2f}x  {r['img_per_s']:>7.1f} / {r['limit_img_per_s']:>7.1f} img/s  {r['path']}")
    return result


if __name__ == "__main__":
    main()
