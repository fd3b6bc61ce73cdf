"""CPU throughput: embedding extraction, a training epoch over cached embeddings, prediction.

On real Earth patches (the demo's 112 px JPEGs, cut into a temp dir):

- decode + preprocess only (Pillow, 2 threads) — img/s
- backbone forward on preprocessed batches: PyTorch vs ONNX Runtime (same
  exported EfficientNet-Lite0, same threads) — img/s and their ratio, with the
  max feature difference as a parity check
- ``embed_paths`` end to end (decode on threads + PyTorch forward) — img/s
- one head-training epoch over cached embeddings at the demo's size (1920
  train, 360 val, 1280-d, geo loss, checkpoint each epoch) — s/epoch
- ``Geolocator.predict`` on paths (EXIF, decode, forward, top-5) — img/s

Writes ``bench/results/throughput.json``.

    python bench/bench_throughput.py [--images 192] [--batch-size 32] [--epochs 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GEOLOCATE_PROGRESS", "0")

from geolocate.config import Config  # noqa: E402
from geolocate.io import write_json  # noqa: E402
from geolocate.labels import LabelSpace  # noqa: E402
from geolocate.models import CellHead, GeoModel, create_backbone  # noqa: E402
from geolocate.serving import Geolocator  # noqa: E402
from geolocate.sources import get_source  # noqa: E402
from geolocate.training import Split, Trainer, embed_paths  # noqa: E402
from geolocate.training.embeddings import load_batch  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "throughput.json"


def make_images(tmp: Path, n: int) -> list[str]:
    cfg = Config()
    cfg.paths.data_dir = str(tmp / "data")
    cfg.source.earth.count = n
    res = get_source("earth")(cfg, tmp / "data" / "raw" / "earth")
    return [r.path for r in res.records]


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")


def bench_decode(paths: list[str], backbone, batch_size: int) -> tuple[float, list[torch.Tensor]]:
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        out = list(pool.map(lambda s: torch.from_numpy(load_batch(paths[s:s + batch_size], backbone.preprocess)[0]),
                            range(0, len(paths), batch_size)))
    return time.perf_counter() - t0, out


@torch.inference_mode()
def bench_torch(backbone, batches: list[torch.Tensor], repeats: int) -> tuple[float, np.ndarray]:
    backbone.eval()
    backbone(batches[0][:2])  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        feats = [backbone(x).numpy() for x in batches]
    return time.perf_counter() - t0, np.concatenate(feats)


def bench_onnx(backbone, batches: list[torch.Tensor], repeats: int, tmp: Path) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"error": "onnxruntime not installed"}
    path = tmp / "backbone.onnx"
    x0 = batches[0][:2]
    torch.onnx.export(backbone.eval(), (x0,), str(path), input_names=["x"], output_names=["f"],
                      dynamic_axes={"x": {0: "b"}, "f": {0: "b"}}, opset_version=17, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": x0.numpy()})
    t0 = time.perf_counter()
    for _ in range(repeats):
        feats = [sess.run(None, {"x": x.numpy()})[0] for x in batches]
    return {"seconds": time.perf_counter() - t0, "feats": np.concatenate(feats)}


def bench_train_epoch(feats: np.ndarray, epochs: int, n_classes: int, tmp: Path, threads: int | None = None) -> dict:
    """Head training over cached embeddings at the demo's split sizes (features resampled + noise)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train_epoch(feats, epochs, n_classes, tmp)
    finally:
        torch.set_num_threads(before)


def _train_epoch(feats: np.ndarray, epochs: int, n_classes: int, tmp: Path) -> dict:
    rng = np.random.default_rng(0)
    n_train, n_val = 1920, 360
    idx = rng.integers(0, len(feats), n_train + n_val)
    x = torch.as_tensor(feats[idx] + rng.normal(0, 0.05, (len(idx), feats.shape[1])).astype(np.float32))
    class_lat = np.degrees(np.arcsin(rng.uniform(-0.9, 0.9, n_classes)))
    class_lon = rng.uniform(-180, 180, n_classes)
    y = rng.integers(0, n_classes, len(idx))
    lat = torch.as_tensor(class_lat[y] + rng.normal(0, 1, len(y)))
    lon = torch.as_tensor(class_lon[y] + rng.normal(0, 1, len(y)))
    y = torch.as_tensor(y)
    train = Split(labels=y[:n_train], lat=lat[:n_train], lon=lon[:n_train], feats=x[:n_train])
    val = Split(labels=y[n_train:], lat=lat[n_train:], lon=lon[n_train:], feats=x[n_train:])
    cfg = Config()
    cfg.train.epochs = epochs
    cfg.train.patience = epochs + 1
    labels = LabelSpace.from_anchors(class_lat, class_lon)
    trainer = Trainer(cfg, labels, np.bincount(train.labels.numpy(), minlength=n_classes), tmp / "ckpt")
    t0 = time.perf_counter()
    state = trainer.fit_head(CellHead(x.shape[1], labels, cfg.model.dropout), train, val)
    total = time.perf_counter() - t0
    per_epoch = [r["seconds"] for r in state["history"]]
    return {"train_images": n_train, "val_images": n_val, "classes": n_classes, "epochs": len(per_epoch),
            "loss": cfg.train.loss, "batch_size": cfg.train.batch_size,
            "torch_threads": torch.get_num_threads(),
            "median_epoch_s": round(float(np.median(per_epoch)), 3), "total_s": round(total, 3),
            "train_img_per_s": rate(n_train, float(np.median(per_epoch)))}


def bench_predict(backbone, paths: list[str], n_classes: int, batch_size: int) -> dict:
    rng = np.random.default_rng(0)
    labels = LabelSpace.from_anchors(rng.uniform(-60, 60, n_classes), rng.uniform(-180, 180, n_classes))
    geo = Geolocator(GeoModel(backbone, CellHead(backbone.num_features, labels)), {"labels": labels.to_dict(),
                                                                                   "preprocess": backbone.preprocess.to_dict()})
    geo.predict(paths[:2], top_k=5)
    t0 = time.perf_counter()
    preds = geo.predict(paths, top_k=5, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    assert all(p.error is None for p in preds)
    return {"images": len(paths), "seconds": round(seconds, 3), "img_per_s": rate(len(paths), seconds)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="passes over the batches for the forward-only timings")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--classes", type=int, default=150, help="cells for the training epoch (demo: ~150 at H3 res 1)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        paths = make_images(tmp, args.images)
        t_images = time.perf_counter() - t0
        backbone = create_backbone("efficientnet_lite0")
        n = len(paths)

        t_dec, batches = bench_decode(paths, backbone, args.batch_size)
        t_torch, f_torch = bench_torch(backbone, batches, args.repeats)
        onnx = bench_onnx(backbone, batches, args.repeats, tmp)
        t0 = time.perf_counter()
        feats, ok = embed_paths(backbone, paths, batch_size=args.batch_size)
        t_embed = time.perf_counter() - t0
        assert ok.all()
        train = bench_train_epoch(feats, args.epochs, args.classes, tmp)
        train_1 = bench_train_epoch(feats, args.epochs, args.classes, tmp, threads=1)
        predict = bench_predict(backbone, paths, args.classes, args.batch_size)

    torch_rate = rate(n * args.repeats, t_torch)
    res_onnx = {}
    if "error" not in onnx:
        ort_rate = rate(n * args.repeats, onnx["seconds"])
        res_onnx = {"img_per_s": ort_rate, "speedup_vs_torch": round(ort_rate / torch_rate, 2),
                    "max_abs_feature_diff": float(np.abs(onnx["feats"] - f_torch).max())}
    else:
        res_onnx = onnx
    results = {
        "benchmark": "throughput",
        "what": f"{n} Earth patches (112 px JPEG, resized to 224), EfficientNet-Lite0, batch {args.batch_size}, "
                f"{threads} torch threads, CPU",
        "images": n, "cut_images_s": round(t_images, 2),
        "decode_preprocess": {"img_per_s": rate(n, t_dec)},
        "forward_torch": {"img_per_s": torch_rate},
        "forward_onnxruntime": res_onnx,
        "embed_paths": {"img_per_s": rate(n, t_embed), "seconds": round(t_embed, 2)},
        "train_epoch_cached": train,
        "train_epoch_cached_1_thread": train_1,
        "predict": predict,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": threads,
                    "torch": torch.__version__, "platform": platform.platform()},
    }
    results["headline"] = [
        {"name": "decode + preprocess (2 threads)", "value": results["decode_preprocess"]["img_per_s"], "unit": "img/s"},
        {"name": "backbone forward, PyTorch", "value": torch_rate, "unit": "img/s"},
        {"name": "backbone forward, ONNX Runtime", "value": res_onnx.get("img_per_s"), "unit": "img/s"},
        {"name": "ONNX Runtime / PyTorch", "value": res_onnx.get("speedup_vs_torch"), "unit": "x"},
        {"name": "embedding extraction end to end (embed_paths)", "value": results["embed_paths"]["img_per_s"], "unit": "img/s"},
        {"name": f"head training epoch over cached embeddings ({train['train_images']} imgs, {train['classes']} cells)",
         "value": train["median_epoch_s"], "unit": "s"},
        {"name": f"the same epoch with 1 torch thread (instead of {threads})", "value": train_1["median_epoch_s"], "unit": "s"},
        {"name": "Geolocator.predict on paths (top-5)", "value": predict["img_per_s"], "unit": "img/s"},
    ]
    write_json(args.out, results)
    print(f"\n### Throughput ({results['what']})\n")
    print("| stage | value | unit |\n|---|---:|---|")
    for h in results["headline"]:
        print(f"| {h['name']} | {h['value']} | {h['unit']} |")
    print(f"\nwritten {args.out}")
    return results


if __name__ == "__main__":
    main()
