"""The location_encoder head: its gallery (classes of points, dedup), the decode it owes (class mass = the gallery's
softmax summed per class; the answer = the best gallery point), and a gallery that survives the model file."""
from __future__ import annotations

import h3
import numpy as np
import pytest
import torch

from geolocate.geo import haversine_km
from geolocate.labels import LabelSpace
from geolocate.models import GeoModel, create_backbone, create_head, load_model, save_model
from geolocate.models.location import assign_classes, dedupe_subsample, land_grid, unit_np
from geolocate.models.outputs import latlon_to_unit
from geolocate.training.losses import LossContext

# eight places far apart, on land
PLACES = np.array([[55.7, 13.2], [-1.3, 36.8], [40.4, -3.7], [-33.9, 151.2], [35.7, 139.7], [-23.5, -46.6], [45.5, -73.6],
                   [28.6, 77.2]])


def labels() -> LabelSpace:
    return LabelSpace.from_anchors(PLACES[:, 0], PLACES[:, 1], resolution=1)


def identity_head(ls: LabelSpace, **kw):
    """A head whose image projection is the identity (features = a location embedding), logit scale at its cap."""
    dim = 16
    head = create_head("location_encoder", dim, ls, dropout=0.0, dim=dim, hidden=2 * dim, grid_resolution=-1, **kw).eval()
    eye = torch.eye(dim)
    with torch.no_grad():  # relu(x) - relu(-x) = x
        head.image_proj[0].weight.copy_(torch.cat([eye, -eye]))
        head.image_proj[0].bias.zero_()
        head.image_proj[2].weight.copy_(torch.cat([eye, -eye], 1))
        head.image_proj[2].bias.zero_()
        head.logit_scale.fill_(10.0)
    return head


def test_gallery_points_join_the_class_of_their_cell_else_the_nearest_anchor():
    ls = labels()
    inside = [h3.cell_to_latlng(h3.cell_to_children(c["cell"], 3)[5]) for c in ls.classes]
    lat = np.array([p[0] for p in inside] + [60.0, -70.0])
    lon = np.array([p[1] for p in inside] + [20.0, 150.0])  # near Sweden's class; Antarctica, nearest to Sydney
    got = assign_classes(ls, lat, lon)
    assert got[:8].tolist() == list(range(8)) and got[8] == 0 and got[9] == 3


def test_training_locations_are_deduplicated_and_bounded():
    lat = np.array([10.0, 10.000001, 20.0, 30.0, 40.0])
    lon = np.array([5.0, 5.000001, 5.0, 5.0, 5.0])
    a, _ = dedupe_subsample(lat, lon, 100, seed=0)
    assert a.tolist() == [10.0, 20.0, 30.0, 40.0]
    b, _ = dedupe_subsample(lat, lon, 2, seed=0)
    assert len(b) == 2 and set(b) <= {10.0, 20.0, 30.0, 40.0}
    glat, glon = land_grid(1)
    assert 150 < len(glat) < 400  # the land among H3's 842 resolution-1 cells


def test_the_gallery_holds_the_truth_and_the_head_returns_it():
    """Gallery = the 8 anchors + 5 true places; an image whose embedding is a true place's location embedding is
    answered with that exact place, and its class is that place's class."""
    ls = labels()
    rng = np.random.default_rng(0)
    truth = PLACES[:5] + rng.uniform(-1, 1, (5, 2))
    head = identity_head(ls, point_top=1)
    head.prepare(truth[:, 0], truth[:, 1])
    assert len(head.gallery_unit) == 8 + 5
    with torch.no_grad():
        feats = head.location(latlon_to_unit(torch.as_tensor(truth[:, 0]), torch.as_tensor(truth[:, 1])).float())
        dec = head.decode(head(feats))
    d = haversine_km(truth[:, 0], truth[:, 1], dec.point[:, 0].double().numpy(), dec.point[:, 1].double().numpy())
    assert d.max() < 0.05, d
    assert dec.probabilities.argmax(1).tolist() == assign_classes(ls, truth[:, 0], truth[:, 1]).tolist() == [0, 1, 2, 3, 4]


def test_class_probabilities_are_the_gallery_softmax_summed_per_class():
    ls = labels()
    head = identity_head(ls)
    head.prepare(PLACES[:, 0] + 0.5, PLACES[:, 1] - 0.5)  # a second point in every class
    with torch.no_grad():
        out = head(torch.randn(4, 16))
        p_gal = torch.softmax(out.logits["gallery"].double(), 1)
        expect = torch.zeros(4, 8, dtype=torch.float64).index_add_(1, head.gallery_class, p_gal)
        got = head.decode(out).probabilities.double()
    assert torch.allclose(got, expect, atol=1e-6) and torch.allclose(got.sum(1), torch.ones(4, dtype=torch.float64))


def test_the_loss_pulls_images_to_their_true_places():
    """Contrastive + cell loss on separable features: after training, each image retrieves its own place."""
    ls = labels()
    torch.manual_seed(0)
    head = create_head("location_encoder", 8, ls, dropout=0.0, dim=32, hidden=64, grid_resolution=-1, point_top=1)
    head.prepare(PLACES[:, 0], PLACES[:, 1])
    y = torch.arange(8).repeat(20)
    x = torch.nn.functional.one_hot(y, 8).float() + 0.05 * torch.randn(len(y), 8)
    lat, lon = torch.as_tensor(PLACES[y.numpy(), 0]), torch.as_tensor(PLACES[y.numpy(), 1])
    ctx = LossContext(torch.as_tensor(ls.lat), torch.as_tensor(ls.lon), None, 600.0, 0.3, "geo", contrastive_weight=1.0)
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    losses = []
    for step in range(150):
        idx = torch.randperm(len(y))[:32]
        loss = head.loss(head(x[idx]), y[idx], lat[idx], lon[idx], ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    head.eval()
    with torch.no_grad():
        dec = head.decode(head(x))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    d = haversine_km(lat.numpy(), lon.numpy(), dec.point[:, 0].double().numpy(), dec.point[:, 1].double().numpy())
    assert float((dec.probabilities.argmax(1) == y).float().mean()) > 0.95 and np.median(d) < 1, np.median(d)


def test_a_prepared_gallery_survives_the_model_file(tmp_path):
    ls = labels()
    bb = create_backbone("small_cnn", pretrained=False)
    torch.manual_seed(0)
    head = create_head("location_encoder", bb.num_features, ls, grid_resolution=1)
    head.prepare(PLACES[:, 0] + 0.3, PLACES[:, 1])
    n = len(head.gallery_unit)
    model = GeoModel(bb, head).eval()
    path = save_model(tmp_path / "m.pt", model, "small_cnn", ls, backbone_trained=True)
    loaded, info = load_model(path)
    assert info["head_kwargs"]["gallery_points"] == n and torch.equal(loaded.head.gallery_unit, head.gallery_unit)
    assert torch.equal(loaded.head.gallery_class, head.gallery_class)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        a, b = model.decode(x), loaded.decode(x)
    assert torch.allclose(a.probabilities, b.probabilities, atol=1e-6) and torch.allclose(a.point, b.point, atol=1e-4)


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ValueError, match="location_encoder: scales must be > 0"):
        create_head("location_encoder", 8, labels(), scales=[0.0])
    assert np.allclose(np.linalg.norm(unit_np([10, -80], [170, -20]), axis=1), 1)
