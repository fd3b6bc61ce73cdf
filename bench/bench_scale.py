"""Scale: frozen-phase training, kNN and gallery search over 100k and 1M embeddings, and 1 vs 2 DDP processes.

Synthetic embeddings (``--dim`` 1280, ``--classes`` 300 cells, class centre + noise, positions near the cell's
centre) are written once into the sharded float16 store (``geolocate.training.store``) under ``--workdir``; every
measurement then runs in a fresh process (``--child``) that reports its own peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which counts the store's memory-mapped pages it touched):

- ``head``: one epoch of ``Trainer.fit_head`` (the real loop: AdamW, warmup+cosine, geo loss, clipping,
  validation, checkpoint) with the train split read from the store per batch (``store``) or, at the smaller
  size, from one float32 tensor in RAM (``dense``, the loop's lower bound for the old in-memory cache);
- ``knn``: ``knn_predict`` (k=1) of ``--queries`` queries against the whole store as gallery;
- ``gallery``: ``Gallery.build`` from the store (float16 in RAM) and ``refine`` (top 5 cells) of the queries;
- ``choose_params`` (the smaller store): refinement's validation grid (top_k 1/3/5/10 x 4 temperatures x 1/4
  neighbours, 32 points) from one gallery search (``choose_params``), against a search per grid point (32
  ``refine`` calls, how it was chosen before); both must choose the same parameters;
- ``ddp``: one epoch on the smaller store in 1 process and in 2 gloo processes (``torch.multiprocessing``,
  1 intra-op thread each, same global batch): epoch time and whether the head weights are equal (allclose).

Writes ``bench/results/scale.json``.

    python bench/bench_scale.py [--sizes 100000 1000000] [--batch-size 256] [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GEOLOCATE_PROGRESS", "0")

RESULTS = ROOT / "bench" / "results" / "scale.json"
VAL = 2000


def peak_rss_mb() -> float:
    """This process's peak resident set (MB): VmHWM, which starts afresh at exec (``ru_maxrss`` inherits the
    parent's peak across fork+exec on Linux, so it would report the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


# ---- data -------------------------------------------------------------------------------------------------------------
def make_store(root: Path, n: int, dim: int, classes: int, seed: int = 0) -> None:
    """``n`` synthetic embeddings in ``root/store`` plus labels.npy, lat.npy, lon.npy and the class centres."""
    from geolocate.progress import progress_bar
    from geolocate.training.store import SHARD_ROWS, EmbeddingStore

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    z = rng.uniform(-0.9, 0.9, classes)
    class_lat, class_lon = np.degrees(np.arcsin(z)), rng.uniform(-180, 180, classes)
    labels = rng.integers(0, classes, n)
    store = EmbeddingStore.open(root, "store", dim)
    with progress_bar(f"synthetic store ({n:,})", n) as advance:
        for s in range(0, n, SHARD_ROWS):
            lab = labels[s:s + SHARD_ROWS]
            f = rng.standard_normal((len(lab), dim), dtype=np.float32)
            f *= 1.5
            f += centres[lab]
            store.append([str(i) for i in range(s, s + len(lab))], [""] * len(lab), [""] * len(lab), f)
            advance(len(lab))
    lat = np.clip(class_lat[labels] + rng.normal(scale=2, size=n), -89, 89)
    lon = (class_lon[labels] + rng.normal(scale=2, size=n) + 180) % 360 - 180
    np.savez(root / "meta.npz", labels=labels, lat=lat, lon=lon, class_lat=class_lat, class_lon=class_lon, centres=centres)


def load(root: Path):
    from geolocate.training.store import EmbeddingStore

    meta = dict(np.load(root / "meta.npz"))
    store = EmbeddingStore(root / "store", meta["centres"].shape[1])
    view = store.view(store.location(np.arange(len(store.index))))
    return view, meta


def queries(meta: dict, n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, len(meta["centres"]), n)
    q = meta["centres"][lab] + 1.5 * rng.standard_normal((n, meta["centres"].shape[1]), dtype=np.float32)
    return q.astype(np.float32), lab


def cell_probs(lab: np.ndarray, n_cls: int, rng: np.random.Generator) -> np.ndarray:
    """Random cell probabilities of queries of true classes ``lab``, their own class lifted 3 nats (a head's output)."""
    logits = rng.normal(size=(len(lab), n_cls))
    logits[np.arange(len(lab)), lab] += 3
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


# ---- children ---------------------------------------------------------------------------------------------------------
def fit_one_epoch(root: Path, mode: str, batch_size: int, ckpt: Path, threads: int = 1) -> tuple[dict, float]:
    import torch

    from geolocate.config import Config
    from geolocate.labels import LabelSpace
    from geolocate.models import CellHead
    from geolocate.training import Split, Trainer

    torch.set_num_threads(threads)
    view, meta = load(root)
    n = len(view)
    t = lambda a: torch.as_tensor(a)  # noqa: E731
    lab = t(meta["labels"]).long()
    val = Split(labels=lab[n - VAL:], lat=t(meta["lat"][n - VAL:]), lon=t(meta["lon"][n - VAL:]),
                feats=torch.from_numpy(view[n - VAL:n]))
    tr_view = view.select(np.arange(n - VAL))
    feats = tr_view if mode == "store" else torch.from_numpy(np.asarray(tr_view))
    train = Split(labels=lab[:n - VAL], lat=t(meta["lat"][:n - VAL]), lon=t(meta["lon"][:n - VAL]), feats=feats)
    cfg = Config()
    cfg.train.epochs, cfg.train.batch_size, cfg.train.warmup_epochs, cfg.train.device = 1, batch_size, 0, "cpu"
    torch.manual_seed(0)
    classes = len(meta["centres"])
    labels = LabelSpace.from_anchors(meta["class_lat"], meta["class_lon"])
    head = CellHead(view.num_features, labels, dropout=0.0)
    trainer = Trainer(cfg, labels, np.bincount(meta["labels"][:n - VAL], minlength=classes), ckpt)
    t0 = time.perf_counter()
    state = trainer.fit_head(head, train, val)
    return {k: v.clone() for k, v in head.state_dict().items()}, {
        "epoch_s": round(state["history"][0]["seconds"], 2), "fit_s": round(time.perf_counter() - t0, 2),
        "val_top1": round(state["history"][0]["val_top1"], 4)}


def _ddp_worker(rank: int, world: int, port: int, root: str, batch_size: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GEOLOCATE_PROGRESS="0")
    import torch

    from geolocate.training import distributed as D

    D.init_distributed("cpu")
    try:
        weights, row = fit_one_epoch(Path(root), "store", batch_size, Path(out) / f"ckpt{rank}")
        if rank == 0:
            torch.save({"weights": weights, "row": row, "rss": peak_rss_mb()}, Path(out) / "ddp.pt")
    finally:
        D.shutdown()


def child(task: str, root: Path, args) -> dict:
    if task == "make":
        t0 = time.perf_counter()
        make_store(root, args.n, args.dim, args.classes)
        return {"seconds": round(time.perf_counter() - t0, 1)}
    if task == "head":
        _, row = fit_one_epoch(root, args.mode, args.batch_size, Path(tempfile.mkdtemp(dir=root)))
        return row
    if task == "knn":
        from geolocate.evaluation import knn_predict

        view, meta = load(root)
        q, lab = queries(meta, args.queries)
        t0 = time.perf_counter()
        scores, _, _ = knn_predict(view, meta["labels"], meta["lat"], meta["lon"], q, len(meta["centres"]), k=1)
        return {"seconds": round(time.perf_counter() - t0, 2), "top1": round(float((scores.argmax(1) == lab).mean()), 4)}
    if task == "gallery":
        from geolocate.tasks.refine import Gallery, RefineParams, refine

        view, meta = load(root)
        q, lab = queries(meta, args.queries)
        t0 = time.perf_counter()
        g = Gallery.build(view, meta["lat"], meta["lon"], meta["labels"], "synthetic", len(meta["centres"]))
        t1 = time.perf_counter()
        probs = cell_probs(lab, len(meta["centres"]), np.random.default_rng(2))
        refine(g, q, probs, RefineParams(top_k=5, temperature=0.05, neighbours=1), meta["class_lat"], meta["class_lon"])
        return {"build_s": round(t1 - t0, 2), "seconds": round(time.perf_counter() - t1, 2)}
    if task == "choose":
        from geolocate.geo import haversine_km
        from geolocate.tasks.refine import Gallery, RefineParams, choose_params, refine

        view, meta = load(root)
        q, lab = queries(meta, args.queries)
        g = Gallery.build(view, meta["lat"], meta["lon"], meta["labels"], "synthetic", len(meta["centres"]))
        rng = np.random.default_rng(3)
        probs = cell_probs(lab, len(meta["centres"]), rng)
        true_lat, true_lon = meta["lat"][rng.integers(0, len(meta["lat"]), len(q))], meta["lon"][rng.integers(0, len(meta["lon"]), len(q))]
        anchors = meta["class_lat"], meta["class_lon"]
        grid = dict(grid_k=(1, 3, 5, 10), grid_t=(0.02, 0.05, 0.1, 0.2), grid_n=(1, 4))
        t0 = time.perf_counter()
        params, km = choose_params(g, q, probs, true_lat, true_lon, *anchors, **grid)
        t1 = time.perf_counter()
        best = None
        for k in grid["grid_k"]:
            for t in grid["grid_t"]:
                for nb in grid["grid_n"]:
                    la, lo, _ = refine(g, q, probs, RefineParams(k, t, nb), *anchors)
                    med = float(np.median(haversine_km(true_lat, true_lon, la, lo)))
                    if best is None or med < best[0] - 1e-9:
                        best = (med, RefineParams(k, t, nb))
        t2 = time.perf_counter()
        return {"one_search_s": round(t1 - t0, 2), "per_point_s": round(t2 - t1, 2), "same_params": best[1] == params,
                "val_km_diff": abs(best[0] - km), "grid_points": int(np.prod([len(v) for v in grid.values()]))}
    if task == "ddp":
        import torch
        import torch.multiprocessing as mp

        out = Path(tempfile.mkdtemp(dir=root))
        res = {}
        w1, row1 = fit_one_epoch(root, "store", args.batch_size, out / "single")
        res["1"] = {**row1, "peak_rss_mb": peak_rss_mb()}
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.perf_counter()
        mp.spawn(_ddp_worker, args=(2, port, str(root), args.batch_size, str(out)), nprocs=2, join=True)
        wall = time.perf_counter() - t0
        got = torch.load(out / "ddp.pt", weights_only=True)
        diff = max(float((got["weights"][k] - w1[k]).abs().max()) for k in w1)
        res["2"] = {**got["row"], "peak_rss_mb": got["rss"], "spawn_wall_s": round(wall, 2)}
        # equal up to float summation order (the shares' gradients are summed in another order), after every step
        res["weights_equal"] = all(torch.allclose(got["weights"][k], w1[k], atol=1e-4, rtol=1e-3) for k in w1)
        res["max_abs_weight_diff"] = diff
        res["max_abs_weight"] = max(float(w1[k].abs().max()) for k in w1)
        return res
    raise SystemExit(f"unknown child task {task!r}")


def run_child(task: str, root: Path, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", task, "--workdir", str(root), "--batch-size", str(args.batch_size),
           "--queries", str(args.queries), "--dim", str(args.dim), "--classes", str(args.classes)] + [x for k, v in extra.items() for x in (f"--{k}", str(v))]
    threads = "1" if task in ("head", "ddp") else str(args.search_threads)  # training: train.threads=1; search: BLAS threads
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"bench_scale child {task} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_s"] = round(time.perf_counter() - t0, 1)
    print(f"  {task} {extra or ''}: {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--search-threads", type=int, default=2, help="BLAS threads of the kNN / gallery children")
    ap.add_argument("--workdir", type=Path, default=None, help="where the synthetic stores go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic stores (reused by the next run)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="store", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        out = child(args.child, args.workdir, args)
        print(json.dumps({**out, "peak_rss_mb": out.get("peak_rss_mb", peak_rss_mb())}))
        return out

    from geolocate.io import write_json

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    sizes = sorted(args.sizes)
    rows, search, ddp, choose = [], [], {}, {}
    t_all = time.perf_counter()
    try:
        for n in sizes:
            root = work / f"n{n}-d{args.dim}-c{args.classes}"
            if not (root / "meta.npz").exists():
                shutil.rmtree(root, ignore_errors=True)
                r = run_child("make", root, args, n=n)
                print(f"store of {n:,} x {args.dim} written in {r['process_s']:.1f} s", flush=True)
            modes = ["store", "dense"] if n == sizes[0] else ["store"]
            for mode in modes:
                r = run_child("head", root, args, mode=mode)
                rows.append({"embeddings": n, "features": mode, "epoch_s": r["epoch_s"], "peak_rss_mb": r["peak_rss_mb"],
                             "samples_per_s": round((n - VAL) / r["epoch_s"]), "val_top1": r["val_top1"]})
            if n == sizes[-1]:
                for task in ("knn", "gallery"):
                    r = run_child(task, root, args)
                    search.append({"task": task, "gallery": n, "queries": args.queries, "seconds": r["seconds"],
                                   "build_s": r.get("build_s"), "peak_rss_mb": r["peak_rss_mb"]})
            if n == sizes[0]:
                r = run_child("choose", root, args)
                choose = {"gallery": n, "queries": args.queries, **{k: r[k] for k in ("one_search_s", "per_point_s", "same_params",
                                                                                     "val_km_diff", "grid_points")},
                          "peak_rss_mb": r["peak_rss_mb"]}
                r = run_child("ddp", root, args)
                ddp = {"embeddings": n, "batch_size": args.batch_size, "epoch_s_1_process": r["1"]["epoch_s"],
                       "epoch_s_2_processes": r["2"]["epoch_s"], "peak_rss_mb_1": r["1"]["peak_rss_mb"],
                       "peak_rss_mb_2_rank0": r["2"]["peak_rss_mb"], "weights_equal": r["weights_equal"],
                       "max_abs_weight_diff": r["max_abs_weight_diff"], "max_abs_weight": r["max_abs_weight"],
                       "steps": -(-(n - VAL) // args.batch_size)}
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    big = [r for r in rows if r["embeddings"] == sizes[-1] and r["features"] == "store"]
    headline = [{"name": f"head epoch, {r['embeddings']:,} embeddings ({r['features']})", "value": r["epoch_s"], "unit": "s"} for r in rows]
    headline += [{"name": f"peak RSS, head epoch, {r['embeddings']:,} ({r['features']})", "value": r["peak_rss_mb"], "unit": "MB"} for r in rows]
    headline += [{"name": f"{s['task']} {s['queries']:,} queries x {s['gallery']:,} gallery", "value": s["seconds"], "unit": "s"} for s in search]
    headline += [{"name": f"peak RSS, {s['task']} over {s['gallery']:,}", "value": s["peak_rss_mb"], "unit": "MB"} for s in search]
    if choose:
        headline += [{"name": f"choose_params {choose['queries']:,} queries x {choose['gallery']:,} gallery: one search", "value": choose["one_search_s"], "unit": "s"},
                     {"name": f"choose_params {choose['queries']:,} queries x {choose['gallery']:,} gallery: a search per grid point", "value": choose["per_point_s"], "unit": "s"}]
    if ddp:
        headline += [{"name": f"DDP epoch {ddp['embeddings']:,}: 1 process", "value": ddp["epoch_s_1_process"], "unit": "s"},
                     {"name": f"DDP epoch {ddp['embeddings']:,}: 2 gloo processes", "value": ddp["epoch_s_2_processes"], "unit": "s"},
                     {"name": "DDP head weights equal to 1 process (allclose)", "value": ddp["weights_equal"], "unit": ""}]
    result = {
        "what": f"synthetic {args.dim}-d embeddings, {args.classes} cells, batch {args.batch_size}; peak RSS per fresh process",
        "headline": headline, "head": rows, "search": search, "choose_params": choose, "ddp": ddp,
        "target_peak_rss_mb_1m": 8000, "meets_target": bool(big) and big[0]["peak_rss_mb"] < 8000,
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    write_json(RESULTS, result)
    print(f"written {RESULTS}")
    return result


if __name__ == "__main__":
    main()
