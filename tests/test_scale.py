"""Devices and scale: the sharded float16 embedding store, streamed kNN / gallery search, precision and DDP."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from geolocate.training.store import EmbeddingStore, FeatureView


# ---- the sharded float16 store ------------------------------------------------------------------------------------
def test_store_round_trip_in_float16_shards(tmp_path, monkeypatch):
    import geolocate.training.store as S

    monkeypatch.setattr(S, "SHARD_ROWS", 40)  # 100 rows -> three shards
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(100, 12)).astype(np.float32)
    store = EmbeddingStore.open(tmp_path, "bb", 12)
    ids = [f"i{k}" for k in range(100)]
    loc = store.append(ids, [f"d{k}" for k in range(100)], ["s"] * 100, feats)
    assert sorted((tmp_path / "bb").glob("shard-*.npy")) == [tmp_path / "bb" / f"shard-00{k}.npy" for k in range(3)]
    assert np.load(tmp_path / "bb" / "shard-000.npy", mmap_mode="r").dtype == np.float16
    view = store.view(loc)
    assert len(view) == 100 and view.shape == (100, 12)
    np.testing.assert_allclose(np.asarray(view), feats, rtol=1e-3, atol=1e-3)   # float16 tolerance
    # a fresh process (a new store object) reads the same; by id, in any order; sub-views and concatenation
    again = EmbeddingStore.open(tmp_path, "bb", 12)
    got = again.features(["i7", "i93", "nope", "i0"])
    np.testing.assert_allclose(got[[0, 1, 3]], feats[[7, 93, 0]], rtol=1e-3, atol=1e-3)
    assert np.isnan(got[2]).all()
    idx = rng.permutation(100)[:30]
    assert np.array_equal(view.rows(idx), np.asarray(view)[idx])
    assert np.array_equal(view.rows(torch.as_tensor(idx)), np.asarray(view)[idx])
    sub = view.select(np.arange(100) % 2 == 0)
    both = FeatureView.concat([sub, view.select([3, 5])])
    assert np.array_equal(np.asarray(both), np.asarray(view)[list(range(0, 100, 2)) + [3, 5]])
    assert np.array_equal(view[10:20], np.asarray(view)[10:20]) and np.array_equal(view[7], np.asarray(view)[7])
    # long consecutive runs are read from the files, random rows through the maps: the same values
    monkeypatch.setattr(S, "CONTIGUOUS_READ", 10**9)
    mapped = np.asarray(view)
    monkeypatch.setattr(S, "CONTIGUOUS_READ", 2)
    assert np.array_equal(np.asarray(view), mapped) and np.array_equal(view[35:85], mapped[35:85])
    # replacing one id's features: a new shard, the index points there; the others are untouched
    store.append(["i3"], ["new"], ["s2"], np.full((1, 12), 0.5, np.float32))
    again = EmbeddingStore.open(tmp_path, "bb", 12)
    assert len(again.index) == 100 and np.allclose(again.features(["i3"]), 0.5)
    np.testing.assert_allclose(again.features(["i4"])[0], feats[4], rtol=1e-3, atol=1e-3)


def test_store_rejects_bad_features_and_rebuilds_an_unreadable_index(tmp_path, capsys):
    store = EmbeddingStore.open(tmp_path, "bb", 4)
    with pytest.raises(ValueError, match=r"features of shape \(2, 3\), expected \(n, 4\)"):
        store.append(["a", "b"], ["x", "y"], ["s", "s"], np.zeros((2, 3), np.float32))
    store.append(["a"], ["x"], ["s"], np.ones((1, 4), np.float32))
    (tmp_path / "bb" / "index.parquet").write_bytes(b"not parquet")
    fresh = EmbeddingStore.open(tmp_path, "bb", 4)
    assert len(fresh.index) == 0 and "index unreadable" in capsys.readouterr().err
    # a store of another feature size is started afresh too
    EmbeddingStore.open(tmp_path, "cc", 4).append(["a"], ["x"], ["s"], np.ones((1, 4), np.float32))
    assert len(EmbeddingStore.open(tmp_path, "cc", 8).index) == 0


def test_compaction_keeps_every_id_and_its_features_and_frees_the_rest(tmp_path, monkeypatch):
    import gc

    import geolocate.training.store as S
    from typer.testing import CliRunner

    from geolocate.cli import app

    monkeypatch.setattr(S, "SHARD_ROWS", 40)
    rng = np.random.default_rng(2)
    cache = tmp_path / "data" / "cache" / "embeddings"
    store = EmbeddingStore.open(cache, "bb", 12)
    root = cache / "bb"
    ids = [f"i{k}" for k in range(100)]
    store.append(ids, [f"d{k}" for k in range(100)], ["s"] * 100, rng.normal(size=(100, 12)).astype(np.float32))  # shards 0-2
    store.append(["i3"], ["new"], ["s2"], np.full((1, 12), 0.5, np.float32))                # shard 3; i3's old row is dead
    store.append([f"n{k}" for k in range(5)], ["e"] * 5, ["s"] * 5, rng.normal(size=(5, 12)).astype(np.float32))  # shard 4
    i10 = store.location(np.asarray([store.entries()["i10"]]))[0]
    store.commit({"dup": ("d10", "s", int(i10[0]), int(i10[1]))})                          # two ids, one row
    np.save(root / "shard-007.npy", np.zeros((9, 12), np.float16))                          # a crashed append's shard
    (root / ".shard-008.npy.x1y2.npy").write_bytes(b"half a shard")                         # and a temp file
    all_ids = ids + [f"n{k}" for k in range(5)] + ["dup"]
    before = store.features(all_ids)
    index_before = (store.index.ids.tolist(), store.index.digests.tolist(), store.index.stamps.tolist())
    files_before = {f.name: f.read_bytes() for f in root.iterdir() if f.is_file()}
    # another reader has the store open (a run, a bench): refused, nothing touched
    with pytest.raises(S.StoreBusy, match="in use by another reader"):
        EmbeddingStore.at(root).compact()
    assert {f.name: f.read_bytes() for f in root.iterdir() if f.is_file()} == files_before
    runner = CliRunner()
    r = runner.invoke(app, ["cache-compact", "--set", f"paths.data_dir={tmp_path / 'data'}"])
    assert r.exit_code == 1 and "in use by another reader" in r.output and "not compacted" in r.output
    del store
    gc.collect()
    rep = EmbeddingStore.at(root).compact()
    assert (rep.entries, rep.rows_before, rep.rows_after, rep.shards_before, rep.shards_after) == (106, 115, 105, 6, 3)
    assert sorted(f.name for f in root.glob("*shard-*")) == ["shard-008.npy", "shard-009.npy", "shard-010.npy"]
    assert rep.bytes_freed == sum(len(b) for n, b in files_before.items() if "shard-" in n) - sum(
        f.stat().st_size for f in root.glob("shard-*.npy"))
    again = EmbeddingStore.open(cache, "bb", 12)  # a fresh process: every id, digest and stamp, the same float16 values
    assert (again.index.ids.tolist(), again.index.digests.tolist(), again.index.stamps.tolist()) == index_before
    assert np.array_equal(again.features(all_ids), before) and np.allclose(again.features(["i3"]), 0.5)
    loc = again.location(np.asarray([again.entries()[i] for i in ("i10", "dup")]))
    assert (loc[0] == loc[1]).all()  # the shared row stays shared
    # appends go on after it; a compact store is left as it is; the command says what it did
    again.append(["z"], ["dz"], ["s"], np.ones((1, 12), np.float32))
    assert (root / "shard-011.npy").exists() and np.allclose(again.features(["z"]), 1.0)
    del again
    gc.collect()
    r = runner.invoke(app, ["cache-compact", "--set", f"paths.data_dir={tmp_path / 'data'}"])
    assert r.exit_code == 0 and "bb: 107 entries; 106 rows in 4 shard file(s) -> 106 in 3, freed" in r.output, r.output
    files = {f.name: f.read_bytes() for f in root.iterdir() if f.is_file()}
    assert EmbeddingStore.at(root).compact().bytes_freed == 0 and {f.name: f.read_bytes() for f in root.iterdir() if f.is_file()} == files
    r = runner.invoke(app, ["cache-compact", "--set", f"paths.data_dir={tmp_path / 'nothing'}"])
    assert r.exit_code == 0 and "no embedding store under" in r.output


def test_an_npz_cache_of_the_previous_version_is_migrated(tmp_path, capsys):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(5, 6)).astype(np.float32)
    np.savez(tmp_path / "bb.npz", ids=np.asarray([f"i{k}" for k in range(5)]), digests=np.asarray([f"d{k}" for k in range(5)]),
             stamps=np.asarray(["1:2"] * 5), feats=feats)
    store = EmbeddingStore.open(tmp_path, "bb", 6)
    assert "5 entries migrated" in capsys.readouterr().err
    assert store.index.digests.tolist() == [f"d{k}" for k in range(5)]
    np.testing.assert_allclose(store.features(["i4", "i0"]), feats[[4, 0]], rtol=1e-3, atol=1e-3)
    EmbeddingStore.open(tmp_path, "bb", 6)
    assert "migrated" not in capsys.readouterr().err   # once


# ---- streamed kNN and gallery search ----------------------------------------------------------------------------
def _dense_knn(tf, tl, tla, tlo, q, C, k):
    gn = tf / np.linalg.norm(tf, axis=1, keepdims=True)
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ gn.T
    scores = np.full((len(q), C), -2.0)
    for c in np.unique(tl):
        scores[:, c] = sim[:, tl == c].max(1)
    nn_idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    plat, plon = tla[nn_idx[:, 0]].copy(), tlo[nn_idx[:, 0]].copy()
    for r, row in enumerate(nn_idx):
        if k == 1:
            continue
        vals, cnt = np.unique(tl[row], return_counts=True)
        best = vals[cnt == cnt.max()]
        j = next(j for j in row if tl[j] in best)
        plat[r], plon[r] = tla[j], tlo[j]
        scores[r, best] += 1.0
    return scores, plat, plon


@pytest.mark.parametrize("k", [1, 4])
def test_knn_streamed_over_gallery_blocks_equals_dense(tmp_path, k):
    from geolocate.evaluation import knn_predict

    rng = np.random.default_rng(k)
    tf = rng.normal(size=(250, 16)).astype(np.float16).astype(np.float32)
    tl = rng.integers(0, 9, 250)
    tla, tlo = rng.uniform(-60, 60, 250), rng.uniform(-180, 180, 250)
    q = rng.normal(size=(41, 16)).astype(np.float32)
    ref = _dense_knn(tf, tl, tla, tlo, q, 9, k)
    view = EmbeddingStore.open(tmp_path, "g", 16)
    view = view.view(view.append([str(i) for i in range(250)], ["d"] * 250, ["s"] * 250, tf))
    for feats, block in ((tf, 4 * 16 * 37), (view, 4 * 16 * 37), (tf, 1 << 30)):  # 37-row gallery blocks, or one
        got = knn_predict(feats, tl, tla, tlo, q, 9, k=k, max_block_bytes=block)
        assert np.allclose(got[0], ref[0], atol=1e-5)
        assert np.array_equal(got[1], ref[1]) and np.array_equal(got[2], ref[2])


def _dense_refine(g, q, probs, p, anchor_lat, anchor_lon):
    """The refinement as one dense (queries x gallery) score matrix (the implementation before streaming)."""
    from geolocate.tasks.refine import _to_latlon, _to_xyz

    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    sim = q @ g.feats.astype(np.float32).T
    logp = np.log(np.clip(probs, 1e-12, None))
    k = min(p.top_k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    allowed = np.zeros((len(q), g.num_classes), bool)
    np.put_along_axis(allowed, top, True, axis=1)
    score = np.where(allowed[:, g.labels], logp[:, g.labels] + sim / p.temperature, -np.inf)
    order = np.argsort(-score, axis=1, kind="stable")[:, :p.neighbours]
    sc = np.take_along_axis(score, order, axis=1)
    ok = np.isfinite(sc[:, 0])
    with np.errstate(invalid="ignore"):  # rows without any item: -inf - -inf, replaced by the anchor below
        w = np.where(np.isfinite(sc), np.exp(sc - sc[:, :1]), 0.0)
    la, lo = _to_latlon((w[..., None] * _to_xyz(g.lat[order], g.lon[order])).sum(1))
    top1 = probs.argmax(1)
    return np.where(ok, la, anchor_lat[top1]), np.where(ok, lo, anchor_lon[top1]), np.where(ok, order[:, 0], -1)


@pytest.mark.parametrize("neighbours", [1, 3])
def test_refine_streamed_over_gallery_blocks_equals_dense(neighbours):
    from geolocate.tasks.refine import Gallery, RefineParams, refine

    rng = np.random.default_rng(neighbours)
    g = Gallery.build(rng.normal(size=(300, 8)), rng.uniform(-60, 60, 300), rng.uniform(-180, 180, 300),
                      rng.integers(0, 12, 300), "f", 14, max_block_bytes=4 * 8 * 64)   # classes 12, 13: no items
    q = rng.normal(size=(60, 8)).astype(np.float32)
    probs = rng.dirichlet(np.ones(14), 60)
    probs[:3, 12:] += 10   # three queries whose top cells hold no gallery item: the anchor
    probs /= probs.sum(1, keepdims=True)
    anchors = rng.uniform(-50, 50, 14), rng.uniform(-170, 170, 14)
    p = RefineParams(top_k=2, temperature=0.1, neighbours=neighbours)
    ref = _dense_refine(g, q, probs, p, *anchors)
    for block in (4 * 8 * 45, 1 << 30):  # 45-row gallery blocks, or one
        la, lo, idx = refine(g, q, probs, p, *anchors, max_block_bytes=block)
        assert np.array_equal(idx, ref[2]) and (idx[:3] == -1).all()
        assert np.allclose(la, ref[0], atol=1e-9) and np.allclose(lo, ref[1], atol=1e-9)


# ---- device and precision ---------------------------------------------------------------------------------------------
def test_device_and_precision_are_validated():
    from geolocate.config import Config, ConfigError
    from geolocate.training.precision import Precision, resolve_device

    for bad, msg in (("train.device=tpu", "train.device must be one of auto, cpu, cuda"),
                     ("train.precision=fp8", "train.precision must be one of fp32, bf16, fp16")):
        cfg = Config()
        cfg.set(bad)
        with pytest.raises((ConfigError, ValueError), match=msg):
            cfg.validate()
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Precision("fp16", torch.device("cpu"))


def _tiny_problem(n=65, dim=16, classes=7, seed=0):
    from geolocate.training.loop import Split

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2
    labels = torch.randint(0, classes, (n + 30,), generator=g)
    feats = centres[labels] + torch.randn(n + 30, dim, generator=g)
    class_lat, class_lon = np.linspace(-60, 60, classes), np.linspace(-150, 150, classes)
    lat, lon = torch.as_tensor(class_lat)[labels], torch.as_tensor(class_lon)[labels]
    mk = lambda s: Split(labels=labels[s], lat=lat[s], lon=lon[s], feats=feats[s])  # noqa: E731
    return mk(slice(0, n)), mk(slice(n, None)), class_lat, class_lon


def _fit(ckpt_dir: Path, precision: str = "fp32", feats_view: bool = False, **train):
    from geolocate.config import Config
    from geolocate.labels import LabelSpace
    from geolocate.models import CellHead
    from geolocate.training import Trainer

    cfg = Config()
    cfg.train.epochs, cfg.train.batch_size, cfg.train.warmup_epochs, cfg.train.patience = 3, 32, 1, 10
    cfg.train.min_epochs, cfg.train.device, cfg.train.precision = 0, "cpu", precision
    for k, v in train.items():
        setattr(cfg.train, k, v)
    train_s, val, class_lat, class_lon = _tiny_problem()
    if feats_view:
        train_s.feats = FeatureView.of(train_s.feats.numpy())
    torch.manual_seed(0)
    labels = LabelSpace.from_anchors(class_lat, class_lon)
    head = CellHead(16, labels, dropout=0.0)
    trainer = Trainer(cfg, labels, np.bincount(train_s.labels.numpy(), minlength=7), ckpt_dir)
    state = trainer.fit_head(head, train_s, val)
    return head.state_dict(), state


def test_head_trains_from_a_store_view_as_from_a_tensor(tmp_path):
    a, sa = _fit(tmp_path / "a")
    b, sb = _fit(tmp_path / "b", feats_view=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_loss"] for r in sa["history"]] == [r["val_loss"] for r in sb["history"]]


def test_bf16_autocast_trains_on_cpu(tmp_path):
    ref, ref_state = _fit(tmp_path / "fp32")
    got, state = _fit(tmp_path / "bf16", precision="bf16")
    assert all(v.dtype == torch.float32 for v in got.values())   # weights stay float32
    assert all(torch.isfinite(v).all() for v in got.values())
    assert not torch.equal(got["fc.weight"], ref["fc.weight"])   # it really ran in bfloat16...
    assert torch.allclose(got["fc.weight"], ref["fc.weight"], atol=0.05)  # ...close to fp32
    for a, b in zip(state["history"], ref_state["history"]):   # the same descent, within bfloat16 rounding
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.01)
    assert state["history"][-1]["train_loss"] < state["history"][0]["train_loss"]


# ---- data parallel: 2 gloo processes == 1 process -----------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GEOLOCATE_PROGRESS="0")
    from geolocate.training import distributed as D

    env = D.init_distributed("cpu")
    assert env.world_size == world and env.rank == rank
    torch.set_num_threads(1)
    try:
        weights, state = _fit(Path(out) / f"rank{rank}", loss="geo", grad_clip=0.5)
        torch.save({"weights": weights, "history": state["history"]}, Path(out) / f"result{rank}.pt")
    finally:
        D.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_the_same_head_as_one(tmp_path):
    """65 samples in global batches of 32 (the last one has 1: rank 1 gets an empty share), geo loss, clipping."""
    import torch.multiprocessing as mp

    one, one_state = _fit(tmp_path / "single", loss="geo", grad_clip=0.5)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(2)]
    for r in results:
        for k in one:
            assert torch.allclose(r["weights"][k], one[k], atol=1e-5, rtol=1e-4), k
    assert all(torch.equal(results[0]["weights"][k], results[1]["weights"][k]) for k in one)   # ranks agree exactly
    assert [round(h["train_loss"], 4) for h in results[0]["history"]] == [round(h["train_loss"], 4) for h in one_state["history"]]
    # rank 0 writes the checkpoint, rank 1 writes nothing
    assert (tmp_path / "rank0" / "last.pt").is_file() and not (tmp_path / "rank1").exists()


def _ddp_experiment(rank: int, world: int, port: int, cfg, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GEOLOCATE_PROGRESS="0")
    from geolocate.runs.experiment import run_experiment
    from geolocate.training import distributed as D

    try:
        run_dir = run_experiment(cfg)
        Path(out, f"run{rank}.txt").write_text(str(run_dir))
    finally:
        D.shutdown()


def test_a_two_process_run_writes_once_and_matches_one_process(trained_copy, tmp_path):
    """run_experiment on 2 gloo ranks: one run folder (rank 0's), world_size 2 in its summary, the 1-process
    run's validation curve; rank 1 creates no run of its own."""
    import torch.multiprocessing as mp

    from geolocate.io import read_json
    from geolocate.runs.experiment import run_experiment

    cfg, _, _ = trained_copy
    cfg.train.epochs, cfg.train.min_epochs, cfg.model.dropout, cfg.eval.refine = 3, 0, 0.0, "off"
    runs = Path(cfg.paths.runs_dir)
    before = {p.name for p in runs.iterdir()}
    mp.spawn(_ddp_experiment, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    new = {p.name for p in runs.iterdir()} - before
    run_dir = Path((tmp_path / "run0.txt").read_text())
    assert new == {run_dir.name} and (tmp_path / "run1.txt").read_text() == str(run_dir)
    assert read_json(run_dir / "summary.json")["config"]["world_size"] == 2
    single = run_experiment(cfg)
    assert read_json(single / "summary.json")["config"] | {"world_size": 2} == read_json(run_dir / "summary.json")["config"]
    import polars as pl

    a, b = pl.read_csv(run_dir / "metrics.csv"), pl.read_csv(single / "metrics.csv")
    assert np.allclose(a["val_loss"].to_numpy(), b["val_loss"].to_numpy(), atol=1e-5)
    assert np.allclose(a["train_loss"].to_numpy(), b["train_loss"].to_numpy(), atol=1e-5)


def test_train_on_a_missing_device_fails_with_one_line_before_any_run(trained_copy):
    from geolocate.runs.experiment import run_experiment

    cfg, _, _ = trained_copy
    runs = sorted(Path(cfg.paths.runs_dir).iterdir())
    cfg.train.precision = "fp16"
    cfg.train.device = "cpu"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        run_experiment(cfg)
    assert sorted(Path(cfg.paths.runs_dir).iterdir()) == runs
