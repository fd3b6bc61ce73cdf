"""Decode-time reranking (prior, top-k geographic smoothing, gated feature reranking): hand-made cases."""
import numpy as np
import pytest

from geolocate.geo import haversine_km
from geolocate.tasks.refine import Gallery
from geolocate.tasks.rerank import (RERANKERS, RerankContext, Stage, answer_points, apply_reranking, cell_similarity,
                                    choose_reranking)

# 5 cells: 0 alone in the Pacific, 1..3 a cluster in Europe, 4 in Africa
LAT = np.array([0.0, 50.0, 51.0, 49.0, -10.0])
LON = np.array([-150.0, 10.0, 12.0, 9.0, 25.0])


def _ctx(**kw):
    return RerankContext(LAT, LON, **kw)


def test_every_stage_keeps_rows_distributions_and_the_mass_outside_its_cells():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=20)
    g = Gallery.build(rng.normal(size=(10, 4)).astype(np.float32), rng.uniform(-60, 60, 10), rng.uniform(-170, 170, 10),
                      np.arange(10) % 5, "f", 5)
    ctx = _ctx(counts=np.array([1, 50, 20, 5, 3]), gallery=g, feats=rng.normal(size=(20, 4)))
    for name in RERANKERS:
        for params in RERANKERS[name].grid[:3] or ({"t": 0.5}, {"t": 2.0}):
            out = RERANKERS[name].apply(p, ctx, None, **params)
            assert out.shape == p.shape and np.all(out >= 0)
            np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-12)
    q = RERANKERS["smooth"].apply(p, ctx, None, k=2, tau_km=500.0)
    rest = np.argsort(-p, axis=1)[:, 2:]  # the cells outside the top 2 keep their probability exactly
    np.testing.assert_array_equal(np.take_along_axis(q, rest, 1), np.take_along_axis(p, rest, 1))


def test_prior_leans_towards_frequent_cells_and_alpha_zero_is_the_identity():
    p = np.array([[0.50, 0.45, 0.05, 0.0, 0.0]])
    ctx = _ctx(counts=np.array([1, 100, 1, 1, 1]))
    assert RERANKERS["prior"].apply(p, ctx, alpha=1.0).argmax() == 1
    assert RERANKERS["prior"].apply(p, ctx, alpha=-1.0).argmax() == 0
    np.testing.assert_allclose(RERANKERS["prior"].apply(p, ctx, alpha=0.0), p)


def test_smoothing_prefers_a_cell_with_probable_neighbours_to_an_isolated_one():
    p = np.array([[0.34, 0.30, 0.18, 0.18, 0.0]])  # the lone Pacific cell is top-1; Europe holds 0.66 together
    out = RERANKERS["smooth"].apply(p, _ctx(), k=4, tau_km=500.0)
    assert out.argmax() == 1
    far = RERANKERS["smooth"].apply(p, _ctx(), k=4, tau_km=1.0)  # a tiny kernel changes nothing
    np.testing.assert_allclose(far, p, atol=1e-6)


def _gallery():
    feats = np.eye(5, dtype=np.float32)  # one item per cell, orthogonal
    return Gallery.build(feats, LAT, LON, np.arange(5), "f", 5)


def test_feature_rerank_moves_an_uncertain_query_to_the_cell_it_looks_like_and_leaves_confident_ones():
    g = _gallery()
    feats = np.array([[0, 0, 1.0, 0, 0], [0, 0, 1.0, 0, 0]])  # both look exactly like cell 2's item
    p = np.array([[0.40, 0.35, 0.25, 0.0, 0.0],              # uncertain: top-1 0.40
                  [0.80, 0.10, 0.10, 0.0, 0.0]])             # confident: above the gate
    ctx = _ctx(gallery=g, feats=feats)
    out = RERANKERS["feature"].apply(p, ctx, k=3, beta=5.0, gate=0.5)
    assert out[0].argmax() == 2
    np.testing.assert_array_equal(out[1], p[1])
    assert out[0, 3:].sum() == 0  # no mass moved outside the top 3


def test_cell_similarity_equals_the_dense_search():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(40, 6)).astype(np.float32)
    labels = rng.integers(0, 5, 40)
    g = Gallery.build(f, rng.uniform(-50, 50, 40), rng.uniform(-50, 50, 40), labels, "f", 5)
    q = rng.normal(size=(7, 6))
    top = np.argsort(-rng.random((7, 5)), axis=1)[:, :3]
    _, sim = cell_similarity(g, q, top)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = f / np.linalg.norm(f, axis=1, keepdims=True)
    dense = qn @ gn.T
    want = np.array([[dense[i, labels == c].max() if (labels == c).any() else -np.inf for c in row] for i, row in enumerate(top)])
    np.testing.assert_allclose(sim, want, atol=2e-3)  # the gallery is float16


def test_the_head_point_is_kept_only_where_the_top_cell_did_not_change():
    before = np.array([[0.6, 0.4, 0, 0, 0], [0.6, 0.4, 0, 0, 0]])
    after = np.array([[0.6, 0.4, 0, 0, 0], [0.3, 0.7, 0, 0, 0]])
    la, lo = answer_points(before, after, _ctx(), (np.array([1.0, 2.0]), np.array([3.0, 4.0])))
    assert (la[0], lo[0]) == (1.0, 3.0) and (la[1], lo[1]) == (LAT[1], LON[1])


def test_choice_on_validation_keeps_a_stage_that_helps_and_drops_those_that_do_not():
    # the truth is always the frequent cell 1, but the head gives cell 0 a little more: the prior fixes it
    n = 50
    p = np.tile([0.40, 0.38, 0.12, 0.05, 0.05], (n, 1))
    ctx = _ctx(counts=np.array([2, 200, 10, 10, 10]))
    r = choose_reranking(p, ctx, np.full(n, LAT[1]), np.full(n, LON[1]), order=("prior",))
    assert [s.name for s in r.stages] == ["prior"] and r.stages[0].params["alpha"] > 0
    assert r.val["prior"]["median_km"] == pytest.approx(0.0, abs=1e-6)
    assert r.alone["prior"] == r.stages[0]
    # already right everywhere: nothing can improve, nothing is kept
    right = choose_reranking(p, ctx, np.full(n, LAT[0]), np.full(n, LON[0]), order=("prior", "smooth"))
    assert right.stages == [] and right.val["prior"]["kept"] is False and right.val["smooth"]["kept"] is False
    assert set(right.alone) == {"prior", "smooth"}  # each stage's best alone is still reported
    out = apply_reranking(r.stages, p, ctx)
    d = haversine_km(LAT[1], LON[1], *answer_points(p, out, ctx))
    assert np.all(d < 1e-6)


def test_feature_stage_needs_a_gallery_and_unknown_names_list_the_known_ones():
    p = np.array([[0.4, 0.35, 0.25, 0, 0]])
    skipped = []
    out = apply_reranking([Stage("feature", {"k": 3, "beta": 5.0, "gate": 0.5})], p, _ctx(), on_skip=skipped.append)
    np.testing.assert_array_equal(out, p)
    assert "needs gallery" in skipped[0]
    assert "feature" not in choose_reranking(p, _ctx(), LAT[:1], LON[:1]).alone  # not available: not tried
    with pytest.raises(KeyError, match="choose one of feature, prior, smooth, temperature"):
        choose_reranking(p, _ctx(), LAT[:1], LON[:1], order=("prior", "nope"))


@pytest.fixture()
def rerank_run(trained_copy):
    """(cfg, run_dir, model_path) of a run with every reranking stage available (refinement on: a gallery exists)."""
    from geolocate.runs.experiment import run_experiment

    cfg, _, _ = trained_copy
    cfg.eval.refine = "always"
    run_dir = run_experiment(cfg)
    return cfg, run_dir, run_dir / "checkpoints" / "model.pt"


def test_the_run_tries_every_stage_on_validation_and_reports_each_alone(rerank_run):
    import json

    _, run_dir, _ = rerank_run
    s = json.loads((run_dir / "summary.json").read_text())
    ap = s["answer_point"]
    assert set(ap["rerank"]["alone"]) == {"prior", "smooth", "feature"}
    for name, st in ap["rerank"]["alone"].items():  # every stage alone, at its best grid point on validation
        assert set(ap["ablation"][f"rerank_{name}"]) == {"val", "test"}
        kept = ap["rerank"]["validation"][name]["kept"]
        assert not kept or any(x["name"] == name for x in ap["rerank"]["stages"])
    chosen = ("reranked_refined" if ap["reranked"] else "refined") if ap["refined"] else ("reranked" if ap["reranked"] else "cell_anchor")
    assert s["metrics"]["val"] == ap["ablation"][chosen]["val"]
    # the shipped answer is the best of the measured ones on validation (test never decides)
    shipped_val = s["metrics"]["val"]["median_km"]
    others = [ap["ablation"][k]["val"]["median_km"] for k in ("refined", "reranked_refined") if ap["ablation"].get(k)]
    assert shipped_val <= min(others) + 1e-9


def test_the_predictor_applies_the_models_stages_to_its_probabilities(rerank_run, photos_dir):
    from geolocate.serving import Geolocator

    _, _, model_path = rerank_run
    files = sorted(photos_dir.glob("*.jpg"))[:6]
    geo = Geolocator.from_pretrained(model_path, engine="torch")
    assert geo.gallery is not None
    stages = [{"name": "prior", "params": {"alpha": 1.0}}, {"name": "smooth", "params": {"k": 5, "tau_km": 1000.0}},
              {"name": "feature", "params": {"k": 3, "beta": 20.0, "gate": 1.0}}]
    counts = np.arange(len(geo.classes)) * 10.0 + 1
    geo.info = {**geo.info, "meta": {**geo.info["meta"], "rerank": {"stages": stages, "counts": counts.tolist()}}}
    arrays = [geo._prepare(f, None)[0] for f in files]
    out = geo.engine.run(np.stack(arrays))
    want = apply_reranking(stages, out["probabilities"], RerankContext(geo.class_lat, geo.class_lon, counts, geo.gallery,
                                                                       out["features"]))
    assert not np.allclose(want, out["probabilities"])  # the stages do move probability here
    preds = geo.predict(files, top_k=3)
    for p, w in zip(preds, want):
        order = np.argsort(-w)[:3]
        assert [c.cell for c in p.top] == [geo.classes[i]["cell"] for i in order]
        np.testing.assert_allclose([c.probability for c in p.top], w[order], rtol=1e-5, atol=1e-7)
    assert geo.model_card()["rerank"] == stages


def test_answer_outputs_is_the_predictors_own_answer(rerank_run, photos_dir):
    """Outputs computed elsewhere go through the same decode-time steps as predict (benchmarks score shifted images so)."""
    from geolocate.serving import Geolocator

    _, _, model_path = rerank_run
    files = sorted(photos_dir.glob("*.jpg"))[:5]
    geo = Geolocator.from_pretrained(model_path, engine="torch")
    truths = [(10.0, 20.0)] * len(files)
    want = geo.predict(files, truths=truths)
    out = geo.engine.run(np.stack([geo._prepare(f, None)[0] for f in files]))
    got = geo.answer_outputs(out["probabilities"], out["features"], out.get("point"), truths=truths)
    for a, b in zip(got, want):
        assert [c.cell for c in a.top] == [c.cell for c in b.top]
        assert (a.lat, a.lon, a.point, a.place) == (b.lat, b.lon, b.point, b.place)
        assert a.error_km == pytest.approx(b.error_km)


def test_the_temperature_stage_keeps_the_ranking_and_sharpens_or_flattens():
    p = np.array([[0.5, 0.3, 0.2, 0.0, 0.0]])
    sharp, flat = (RERANKERS["temperature"].apply(p, _ctx(), t=t) for t in (0.5, 2.0))
    for q in (sharp, flat):
        assert list(np.argsort(-q[0])[:3]) == [0, 1, 2] and q[0, 3:].sum() == 0
    assert sharp[0, 0] > 0.5 > flat[0, 0]
    with pytest.raises(ValueError, match="not chosen from a grid"):
        choose_reranking(p, _ctx(), LAT[:1], LON[:1], order=("temperature",))


def test_a_kept_chain_ends_with_a_temperature_and_the_answer_stays_calibrated(rerank_run):
    import json

    _, run_dir, _ = rerank_run
    s = json.loads((run_dir / "summary.json").read_text())
    stages = s["answer_point"]["rerank"]["stages"]
    if any(st["name"] != "temperature" for st in stages):
        assert stages[-1]["name"] == "temperature" and stages[-1]["params"]["t"] == s["calibration"]["answer_temperature"]
    else:
        assert stages == []


def test_a_feature_chain_without_refinement_ships_its_gallery_pinned_once(trained_copy, monkeypatch, photos_dir, capsys):
    """Feature reranking ships without refinement: the gallery beside the model is the one its record pins (the OOD
    flag reuses the same one), and the predictor loads it and applies the stage."""
    import geolocate.runs.experiment as E
    from geolocate.io import file_sha256
    from geolocate.serving import Geolocator
    from geolocate.tasks.refine import gallery_path
    from geolocate.tasks.rerank import Reranking

    cfg, _, _ = trained_copy
    cfg.eval.refine, cfg.eval.rerank = "off", ["feature"]
    stage = Stage("feature", {"k": 3, "beta": 20.0, "gate": 1.0})
    monkeypatch.setattr(E, "choose_reranking", lambda *a, **k: Reranking([stage], {}, {}))
    first = []

    def val_km(self, val):  # the reranked answer wins the choice, whatever the tiny data says
        first.append(id(self.probs)) if not first else None
        return 1.0 if id(self.probs) == first[0] else 0.0

    monkeypatch.setattr(E.Answer, "val_km", val_km)
    run_dir = E.run_experiment(cfg)
    model = run_dir / "checkpoints" / "model.pt"
    geo = Geolocator.from_pretrained(model, engine="torch")
    meta = geo.info["meta"]
    assert "refine" not in meta and meta["rerank"]["stages"][0] == stage.to_dict()
    assert meta["rerank"]["gallery_sha256"] == file_sha256(gallery_path(model)) == meta["ood"]["gallery_sha256"]
    assert geo.gallery is not None and geo.refine_params is None
    capsys.readouterr()
    (p,) = geo.predict([sorted(photos_dir.glob("*.jpg"))[0]])
    assert p.error is None and p.point == "cell" and "skipped" not in capsys.readouterr().err
