"""Refinement inside the top cells from a gallery of training embeddings (hand-made cases)."""
import numpy as np
import pytest

from geolocate.tasks.refine import Gallery, GalleryError, RefineParams, choose_params, refine


def _gallery():
    # 3 classes; class 0 holds two items, class 1 two, class 2 one
    feats = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1], [0, 0, 1]], np.float32)
    lat = np.array([10.0, 11.0, 40.0, 41.0, -30.0])
    lon = np.array([20.0, 21.0, -70.0, -71.0, 150.0])
    return Gallery.build(feats, lat, lon, [0, 0, 1, 1, 2], "test-features", 3)


def test_refinement_returns_the_gallery_point_that_holds_the_truth():
    g = _gallery()
    q = np.array([[0.0, 1.0, 0.0], [0.0, 0.88, 0.12]], np.float32)  # exactly item 2; closest to item 3
    probs = np.array([[0.2, 0.7, 0.1], [0.2, 0.7, 0.1]])
    la, lo, idx = refine(g, q, probs, RefineParams(top_k=2, temperature=0.05))
    assert idx.tolist() == [2, 3]
    assert (la[0], lo[0]) == (40.0, -70.0) and (la[1], lo[1]) == (41.0, -71.0)


def test_refinement_never_leaves_the_top_cells():
    g = _gallery()
    q = np.array([[0.0, 0.0, 1.0]], np.float32)  # looks exactly like item 4 (class 2) ...
    probs = np.array([[0.6, 0.35, 0.05]])        # ... but class 2 is not in the top 2
    la, lo, idx = refine(g, q, probs, RefineParams(top_k=2, temperature=0.05))
    assert g.labels[idx[0]] in (0, 1)
    la, lo, idx = refine(g, q, probs, RefineParams(top_k=3, temperature=0.05))
    assert idx[0] == 4  # with all 3 cells allowed, similarity wins


def test_cells_without_gallery_items_fall_back_to_the_anchor():
    g = Gallery.build(np.eye(3, dtype=np.float32)[:2], [1.0, 2.0], [3.0, 4.0], [0, 1], "f", 3)
    probs = np.array([[0.05, 0.05, 0.9]])
    anchors = (np.array([0.0, 0.0, 55.0]), np.array([0.0, 0.0, 13.0]))
    la, lo, idx = refine(g, np.ones((1, 3), np.float32), probs, RefineParams(top_k=1), *anchors)
    assert (la[0], lo[0], idx[0]) == (55.0, 13.0, -1)


def test_neighbour_averaging_stays_between_the_neighbours():
    g = _gallery()
    q = np.array([[0.95, 0.05, 0.0]], np.float32)
    la, lo, _ = refine(g, q, np.array([[0.9, 0.05, 0.05]]), RefineParams(top_k=1, temperature=1.0, neighbours=2))
    assert 10.0 < la[0] < 11.0 and 20.0 < lo[0] < 21.0


def test_blocks_give_the_same_answers():
    rng = np.random.default_rng(0)
    g = Gallery.build(rng.normal(size=(200, 8)), rng.uniform(-60, 60, 200), rng.uniform(-180, 180, 200),
                      rng.integers(0, 10, 200), "f", 10)
    q = rng.normal(size=(50, 8)).astype(np.float32)
    p = rng.dirichlet(np.ones(10), 50)
    a = refine(g, q, p, RefineParams(3, 0.1))
    b = refine(g, q, p, RefineParams(3, 0.1), max_block_bytes=8 * 200 * 7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_parameters_are_chosen_on_validation():
    g = _gallery()
    q = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    probs = np.array([[0.5, 0.4, 0.1], [0.4, 0.5, 0.1]])  # the top-1 cell is wrong for both
    true_lat, true_lon = np.array([40.0, 10.0]), np.array([-70.0, 20.0])
    anchors = (np.zeros(3), np.zeros(3))
    params, km = choose_params(g, q, probs, true_lat, true_lon, *anchors, grid_k=(1, 2), grid_t=(0.05,), grid_n=(1,))
    assert params.top_k == 2 and km == pytest.approx(0.0, abs=1e-6)


def test_gallery_round_trip_and_bad_files(tmp_path):
    g = _gallery()
    sha = g.save(tmp_path / "g.npz")
    h = Gallery.load(tmp_path / "g.npz", sha256=sha, features="test-features", num_classes=3)
    assert h.feats.dtype == np.float16 and np.array_equal(h.labels, g.labels) and np.allclose(h.lat, g.lat)
    with pytest.raises(GalleryError, match="cannot be read"):
        Gallery.load(tmp_path / "missing.npz")
    data = (tmp_path / "g.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(GalleryError, match="sha256 does not match"):
        Gallery.load(tmp_path / "t.npz", sha256=sha)
    with pytest.raises(GalleryError, match="not a readable gallery"):
        Gallery.load(tmp_path / "t.npz")
    with pytest.raises(GalleryError, match="features of"):
        Gallery.load(tmp_path / "g.npz", features="other-backbone")
    with pytest.raises(GalleryError, match="3 classes"):
        Gallery.load(tmp_path / "g.npz", num_classes=7)


@pytest.fixture()
def refined_run(trained_copy):
    """(cfg, run_dir, model_path) of a run that ships refinement (eval.refine=always) and became models/best.pt."""
    import shutil
    from pathlib import Path

    from geolocate.runs.experiment import run_experiment

    cfg, _, _ = trained_copy
    shutil.rmtree(Path(cfg.paths.models_dir), ignore_errors=True)
    cfg.eval.refine = "always"
    cfg.train.epochs = 8
    run_dir = run_experiment(cfg)
    return cfg, run_dir, run_dir / "checkpoints" / "model.pt"


def test_auto_refines_only_when_it_wins_on_validation(trained):
    import json

    _, run_dir, _ = trained
    ap = json.loads((run_dir / "summary.json").read_text())["answer_point"]
    assert set(ap["ablation"]["cell_anchor"]) == {"val", "test"} and set(ap["ablation"]["refined"]) == {"val", "test"}
    wins = ap["ablation"]["refined"]["val"]["median_km"] < ap["ablation"]["cell_anchor"]["val"]["median_km"]
    assert ap["refined"] == wins


def test_run_refines_and_the_predictor_answers_the_same(refined_run):
    """The shipped predictor (ONNX, from image files) gives the run's own refined test points."""
    import json
    from pathlib import Path

    import polars as pl

    from geolocate.index import load_index
    from geolocate.serving import Geolocator
    from geolocate.tasks.refine import gallery_path

    cfg, run_dir, model_path = refined_run
    s = json.loads((run_dir / "summary.json").read_text())
    ap = s["answer_point"]
    assert ap["refined"] and s["metrics"]["val"] == ap["ablation"]["reranked_refined" if ap["reranked"] else "refined"]["val"]
    assert gallery_path(model_path).is_file()
    best = Path(cfg.paths.models_dir) / "best.pt"
    assert gallery_path(best).read_bytes() == gallery_path(model_path).read_bytes()  # promoted together
    rows = pl.read_parquet(run_dir / "predictions_test.parquet")
    df, _, _ = load_index(cfg)
    paths = dict(zip(df["id"].to_list(), df["path"].to_list()))
    geo = Geolocator.from_pretrained(model_path)
    preds = geo.predict([paths[i] for i in rows["id"].to_list()])
    assert all(p.point == "refined" or p.point == "cell" for p in preds)
    got = np.array([(p.lat, p.lon) for p in preds])
    want = rows.select("pred_lat", "pred_lon").to_numpy()
    assert np.mean(np.abs(got - want).max(1) < 1e-3) >= 0.95  # same points (a near-tie may flip under ONNX rounding)


def test_a_bad_gallery_warns_and_answers_with_cell_anchors(refined_run, photos_dir, capsys):
    from geolocate.serving import Geolocator
    from geolocate.tasks.refine import gallery_path

    cfg, run_dir, model_path = refined_run
    f = sorted(photos_dir.glob("*.jpg"))[0]
    g = gallery_path(model_path)
    data = g.read_bytes()
    for broken in (data[: len(data) // 3], None):
        if broken is None:
            g.unlink()
        else:
            g.write_bytes(broken)
        geo = Geolocator.from_pretrained(model_path)
        assert geo.gallery is None
        (p,) = geo.predict([f])
        assert p.point == "cell" and (p.lat, p.lon) == (p.top[0].lat, p.top[0].lon)
        err = capsys.readouterr().err + capsys.readouterr().out
        assert "answering with cell anchors" in err


def test_a_regressed_point_is_used_only_where_it_beats_the_anchor_on_validation(trained_copy, photos_dir):
    """A gps head (cell + coordinate regression): the run keeps its regressed point only if it beats the top cell's
    anchor on validation, records that, and the predictor follows the record."""
    import json

    from geolocate.runs.experiment import run_experiment
    from geolocate.serving import Geolocator

    cfg, _, _ = trained_copy
    cfg.model.head, cfg.eval.refine, cfg.eval.rerank = "gps", "off", []
    run_dir = run_experiment(cfg)
    s = json.loads((run_dir / "summary.json").read_text())
    abl = s["answer_point"]["ablation"]
    wins = abl["head_point"]["val"]["median_km"] < abl["cell_anchor"]["val"]["median_km"]
    assert s["answer_point"]["head_point"] == wins
    assert s["metrics"]["val"] == abl["head_point" if wins else "cell_anchor"]["val"]
    files = sorted(photos_dir.glob("*.jpg"))[:3]
    geo = Geolocator.from_pretrained(run_dir / "checkpoints" / "model.pt", engine="torch")
    assert geo.info["meta"]["use_head_point"] == wins
    for flag in (True, False):
        geo.info = {**geo.info, "meta": {**geo.info["meta"], "use_head_point": flag}}
        for p in geo.predict(files):
            assert p.point == ("regressed" if flag else "cell")
            if not flag:
                assert (p.lat, p.lon) == (p.top[0].lat, p.top[0].lon)


def test_choosing_from_one_search_gives_every_grid_point_refine_gives():
    """choose_params searches the gallery once (largest top_k and neighbours) and reads every grid point off it:
    each point's answers are refine's own, cells without items and the fallback included."""
    from geolocate.geo import haversine_km
    from geolocate.tasks.refine import candidates, refine_from

    rng = np.random.default_rng(3)
    g = Gallery.build(rng.normal(size=(400, 16)), rng.uniform(-60, 60, 400), rng.uniform(-180, 180, 400),
                      rng.integers(0, 20, 400), "f", 22, max_block_bytes=4 * 16 * 50)  # classes 20, 21: no items
    q = rng.normal(size=(80, 16)).astype(np.float32)
    probs = rng.dirichlet(np.ones(22) * 0.3, 80)
    probs[:4, 20:] += 5  # their top cells hold no item
    probs /= probs.sum(1, keepdims=True)
    true_lat, true_lon = rng.uniform(-60, 60, 80), rng.uniform(-180, 180, 80)
    anchors = rng.uniform(-50, 50, 22), rng.uniform(-170, 170, 22)
    fallback = rng.uniform(-50, 50, 80), rng.uniform(-170, 170, 80)
    grid = dict(grid_k=(1, 3, 5, 10), grid_t=(0.02, 0.1, 0.5), grid_n=(1, 4))
    cands = candidates(g, q, probs, 10, 4)
    assert cands.top.shape == (80, 10) and cands.cos.shape == (80, 10, 4)
    assert np.array_equal(cands.top[:, 0], probs.argmax(1)) and (np.diff(np.maximum(cands.cos, -9), axis=2) <= 0).all()
    assert np.isinf(cands.cos[:4, :2]).all() and (cands.idx[:4, :2] == -1).all()  # the two empty cells
    brute = []
    for k in grid["grid_k"]:
        for t in grid["grid_t"]:
            for nb in grid["grid_n"]:
                p = RefineParams(k, t, nb)
                la, lo, idx = refine(g, q, probs, p, *anchors, fallback=fallback)
                la2, lo2, idx2 = refine_from(g, cands, p, probs, *anchors, fallback=fallback)
                # the same items; averaged points up to the float32 order of the similarities' sums: 1 ulp of a
                # cosine over T = 0.02 moves a mean of items thousands of km apart (random places) by metres
                assert np.array_equal(idx, idx2) and np.allclose(la, la2, atol=1e-3) and np.allclose(lo, lo2, atol=1e-3)
                if nb == 1:
                    assert np.array_equal(la, la2) and np.array_equal(lo, lo2)
                if k == 1:
                    assert (idx[:4] == -1).all() and np.array_equal(la[:4], fallback[0][:4])  # fall back when no item
                brute.append((float(np.median(haversine_km(true_lat, true_lon, la, lo))), p))
    best = min(brute, key=lambda x: x[0])  # the first of equal medians: grid order
    params, km = choose_params(g, q, probs, true_lat, true_lon, *anchors, fallback=fallback, **grid)
    assert params == best[1] and km == pytest.approx(best[0], rel=1e-6)
    assert len({round(m, 6) for m, _ in brute}) > 5  # the grid points do answer differently
    with pytest.raises(ValueError, match="from candidates of 10 cells, 4 items"):
        refine_from(g, cands, RefineParams(12, 0.1, 1), probs, *anchors)


def test_top_cells_break_ties_by_the_lower_class_even_across_the_kth_place():
    from geolocate.tasks.refine import top_cells

    p = np.array([[0.2, 0.1, 0.1, 0.1, 0.5], [0.0, 0.0, 0.0, 0.0, 1.0]])
    assert top_cells(p, 3).tolist() == [[4, 0, 1], [4, 0, 1]]
    rng = np.random.default_rng(4)
    many = np.round(rng.dirichlet(np.ones(30), 500), 2)  # many ties, many zeros
    full = np.argsort(-many, axis=1, kind="stable")
    for k in (1, 3, 10, 30, 99):
        assert np.array_equal(top_cells(many, k, rows=64), full[:, :min(k, 30)])
