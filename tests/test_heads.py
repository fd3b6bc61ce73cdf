"""The label space and the head registry: hand-made cases for every head, and every backbone x head through
forward, loss, decode, the model file and ONNX parity."""
from __future__ import annotations

import h3
import numpy as np
import pytest
import torch

from geolocate.config import Config
from geolocate.geo import haversine_km
from geolocate.labels import LabelSpace, LabelSpaceError
from geolocate.models import BACKBONES, GeoModel, create_backbone, create_head, list_heads, load_model, save_model
from geolocate.models.outputs import latlon_to_offset, offset_to_latlon
from geolocate.training.losses import LossContext


def space(resolution: int = 2, levels=(0, 1)) -> LabelSpace:
    """Fine classes at ``resolution``: the 7 children of two res-1 cells (Sweden, Kenya), 14 classes, 2 res-0 parents."""
    parents = [h3.latlng_to_cell(55.7, 13.2, 1), h3.latlng_to_cell(-1.3, 36.8, 1)]
    cells = sorted(c for p in parents for c in h3.cell_to_children(p, resolution))
    pts = [h3.cell_to_latlng(c) for c in cells]
    classes = [{"index": i, "cell": c, "resolution": resolution, "lat": la, "lon": lo, "place": f"p{i}"}
               for i, (c, (la, lo)) in enumerate(zip(cells, pts))]
    return LabelSpace(classes, resolution).with_levels(list(levels))


def ctx(labels: LabelSpace, loss: str = "geo") -> LossContext:
    return LossContext(torch.as_tensor(labels.lat), torch.as_tensor(labels.lon), None, 600.0, 0.3, loss, 0.5, 1.0)


def test_label_space_levels_link_every_class_to_its_h3_parent_and_round_trip():
    ls = space()
    assert ls.level_names == ["r0", "r1", "cell"] and len(ls.level("r1")) == 2
    for lv in ls.levels:
        for c, p in zip(ls.cells, lv.parent):
            assert h3.cell_to_parent(c, lv.resolution) == lv.cells[p]
    back = LabelSpace.from_dict(ls.to_dict())
    assert back.cells == ls.cells and [lv.cells for lv in back.levels] == [lv.cells for lv in ls.levels]
    assert all(np.array_equal(a.parent, b.parent) for a, b in zip(back.levels, ls.levels))
    # a v1 dict (no version, no levels) is a one-level space
    v1 = {"h3_resolution": 2, "num_classes": len(ls), "classes": ls.classes}
    assert LabelSpace.from_dict(v1).levels == [] and LabelSpace.from_dict(v1).cells == ls.cells


def test_label_space_refuses_damage_with_one_line():
    d = space().to_dict()
    d["levels"][0]["parent"] = d["levels"][0]["parent"][:-1]
    with pytest.raises(LabelSpaceError, match="level 'r0' does not fit its 14 classes"):
        LabelSpace.from_dict(d)
    with pytest.raises(LabelSpaceError, match="labels version 7"):
        LabelSpace.from_dict({**space().to_dict(), "version": 7})
    with pytest.raises(KeyError, match="no label level 'r5': this label space has r0, r1, cell"):
        space().level("r5")


def test_a_merged_coarser_class_is_its_own_parent():
    ls = LabelSpace.from_dict({"h3_resolution": 2, "num_classes": 2, "classes": [
        {"cell": h3.latlng_to_cell(10, 10, 2), "lat": 10, "lon": 10, "place": "a"},
        {"cell": h3.latlng_to_cell(-40, 100, 0), "lat": -40, "lon": 100, "place": "b"}]}).with_levels([1])
    assert ls.levels[0].cells[ls.levels[0].parent[1]] == ls.cells[1]


def test_unknown_head_lists_the_registered_ones():
    with pytest.raises(KeyError, match="unknown head 'nope': choose one of gps, hierarchical, linear, location_encoder, offset"):
        create_head("nope", 8, space())
    cfg = Config()
    cfg.model.head = "nope"
    with pytest.raises(ValueError, match="model.head must be one of"):
        cfg.validate()


def test_hierarchical_joint_is_parent_times_child_given_parent():
    ls = space()
    head = create_head("hierarchical", 6, ls, dropout=0.0, levels=["r1"]).eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        out = head(x)
        p = head.decode(out).probabilities
        parent = torch.softmax(out.logits["r1"], 1)
        pid = torch.as_tensor(ls.level("r1").parent)
        z = out.logits["cell"]
        expect = torch.zeros_like(p)
        for g in range(2):
            m = pid == g
            expect[:, m] = parent[:, g:g + 1] * torch.softmax(z[:, m], 1)
    assert torch.allclose(p.sum(1), torch.ones(5), atol=1e-5) and torch.allclose(p, expect, atol=1e-6)


def test_hierarchical_masking_never_answers_outside_the_chosen_parents():
    """Parent 0 is likelier (0.73), but one child of parent 1 holds all of its parent's mass (joint 0.27 > 0.73 / 7):
    the joint answer is that child; masking to the top parent answers inside parent 0, with 0 outside it."""
    ls = space()
    pid = torch.as_tensor(ls.level("r1").parent)
    heads = {m: create_head("hierarchical", 2, ls, dropout=0.0, levels=["r1"], mode=m, mask_top=1).eval() for m in ("joint", "mask")}
    star = int(torch.nonzero(pid == 1)[0])
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    probs = {}
    for m, head in heads.items():
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()
            head.level_fc[0].weight[0, 0] = 1.0   # parent 0: logit 1, parent 1: logit 0
            head.fc.weight[star, 0] = 30.0         # one child of parent 1 takes its parent's mass
            head.fc.weight[pid == 0, 1] = torch.linspace(0, 1, int((pid == 0).sum()))  # the 2nd row ranks parent 0's children
            probs[m] = head.decode(head(x)).probabilities
    assert int(probs["joint"][0].argmax()) == star
    for row in probs["mask"]:
        assert float(row[pid != 0].max()) == 0 and abs(float(row.sum()) - 1) < 1e-5 and int(pid[row.argmax()]) == 0


def test_an_exact_offset_decodes_to_the_exact_point():
    ls = space()
    head = create_head("offset", ls.num_classes, ls, dropout=0.0, shrink=False).eval()
    rng = np.random.default_rng(0)
    truth_lat = ls.lat + rng.uniform(-0.3, 0.3, len(ls))
    truth_lon = ls.lon + rng.uniform(-0.3, 0.3, len(ls))
    e, n = latlon_to_offset(torch.as_tensor(ls.lat), torch.as_tensor(ls.lon), torch.as_tensor(truth_lat), torch.as_tensor(truth_lon))
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.fc.weight.copy_(torch.eye(len(ls)) * 10)  # one-hot feature k -> class k
        w = torch.zeros(len(ls) * 2, len(ls))
        for k in range(len(ls)):
            w[2 * k, k], w[2 * k + 1, k] = torch.atanh(e[k] / head.bound[k]), torch.atanh(n[k] / head.bound[k])
        head.offset_fc.weight.copy_(w)
        dec = head.decode(head(torch.eye(len(ls))))
    assert torch.equal(dec.probabilities.argmax(1), torch.arange(len(ls)))
    d = haversine_km(truth_lat, truth_lon, dec.point[:, 0].double().numpy(), dec.point[:, 1].double().numpy())
    assert d.max() < 0.01, d
    # shrinking by the top-1 probability: a sure cell follows its offset, an unsure one stays near its anchor
    with torch.no_grad():
        head.fc.weight.mul_(0.01)  # top-1 probability just above 1/14
        head.shrink = True
        dec = head.decode(head(torch.eye(len(ls))))
    p_top = dec.probabilities.max(1).values.double().numpy()
    moved = haversine_km(ls.lat, ls.lon, dec.point[:, 0].double().numpy(), dec.point[:, 1].double().numpy())
    full = haversine_km(ls.lat, ls.lon, truth_lat, truth_lon)
    assert np.allclose(moved, p_top * full, rtol=0.02, atol=0.05) and (p_top < 0.1).all()
    # and the tangent-plane mapping inverts, across the antimeridian too
    la, lo = offset_to_latlon(torch.tensor([10.0]), torch.tensor([179.9]), torch.tensor([50.0]), torch.tensor([-20.0]))
    assert float(lo) < -179 and np.allclose([float(v) for v in latlon_to_offset(torch.tensor([10.0]), torch.tensor([179.9]), la, lo)],
                                            [50.0, -20.0], atol=1e-3)


def test_gps_head_outputs_are_always_valid_coordinates():
    ls = space()
    head = create_head("gps", 4, ls, dropout=0.0).eval()
    with torch.no_grad():
        head.coord_fc.weight.normal_(0, 100)
        pt = head.decode(head(torch.randn(64, 4) * 50)).point
    assert pt[:, 0].abs().max() <= 90 and pt[:, 1].abs().max() <= 180 and torch.isfinite(pt).all()


@pytest.mark.parametrize("name", ["linear", "hierarchical", "offset", "gps", "location_encoder"])
def test_each_head_learns_its_targets(name):
    """A few hundred steps on separable features: loss falls, top-1 is right, and point heads beat the anchor."""
    ls = space()
    g = torch.Generator().manual_seed(0)
    n = 700
    y = torch.randint(0, len(ls), (n,), generator=g)
    lat = torch.as_tensor(ls.lat)[y] + torch.rand(n, generator=g, dtype=torch.float64) * 0.4 - 0.2
    lon = torch.as_tensor(ls.lon)[y] + torch.rand(n, generator=g, dtype=torch.float64) * 0.4 - 0.2
    # features: the class (one-hot) and the position inside it (what an in-cell regressor can learn)
    x = torch.cat([torch.nn.functional.one_hot(y, len(ls)).float(), ((lat - torch.as_tensor(ls.lat)[y]) / 0.2)[:, None].float(),
                   ((lon - torch.as_tensor(ls.lon)[y]) / 0.2)[:, None].float()], 1)
    torch.manual_seed(0)
    head = create_head(name, x.shape[1], ls, dropout=0.0)
    head.prepare(lat.numpy(), lon.numpy())  # the gallery of a gallery head (a no-op for the others)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    c = ctx(ls, "ce")
    first = None
    for _ in range(300):
        loss = head.loss(head(x), y, lat, lon, c)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        dec = head.decode(head(x))
    assert float(loss.detach()) < 0.5 * first
    assert float((dec.probabilities.argmax(1) == y).float().mean()) > 0.95
    if head.has_point:
        d_head = haversine_km(lat.numpy(), lon.numpy(), dec.point[:, 0].double().numpy(), dec.point[:, 1].double().numpy())
        d_anchor = haversine_km(lat.numpy(), lon.numpy(), ls.lat[y.numpy()], ls.lon[y.numpy()])
        if name == "offset":  # in-cell offsets: better than the class anchor
            assert np.median(d_head) < np.median(d_anchor), (np.median(d_head), np.median(d_anchor))
        else:  # one global regressor over two regions ~6,400 km apart: it lands in the right place
            assert np.median(d_head) < 100, np.median(d_head)


OFFLINE_BACKBONES = sorted(BACKBONES)  # efficientnet_lite0 (weights in its package) and small_cnn (from scratch)


@pytest.mark.parametrize("backbone", OFFLINE_BACKBONES)
@pytest.mark.parametrize("name", list_heads())
def test_registry_every_backbone_and_head_through_file_and_onnx(backbone, name, tmp_path):
    """forward, loss (with gradients), decode, the model file (v2) and the ONNX export within parity."""
    from geolocate.serving.export import PARITY_TOL, POINT_TOL_KM, check_batch, export_onnx, point_parity
    from geolocate.serving.engines import OnnxEngine

    ls = space()
    bb = create_backbone(backbone, pretrained=backbone == "efficientnet_lite0")
    torch.manual_seed(0)
    head = create_head(name, bb.num_features, ls, dropout=0.1)
    with torch.no_grad():  # away from the initial all-zero regressors, so the outputs differ per image
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    head.set_temperature(1.7)
    model = GeoModel(bb, head)
    info = {"preprocess": bb.preprocess.to_dict()}
    x = check_batch(info, n=3)
    model.eval()
    head.train()  # dropout on; the backbone's batch-norm statistics stay those the file will rebuild
    out = model(x)
    loss = head.loss(out, torch.tensor([0, 5, 9]), torch.tensor([55.0, 55.5, -1.0]), torch.tensor([13.0, 13.1, 36.0]), ctx(ls))
    loss.backward()
    grads = [p.grad for p in head.parameters()]
    assert torch.isfinite(loss) and all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    model.eval()
    path = save_model(tmp_path / "m.pt", model, backbone, ls, backbone_trained=backbone != "efficientnet_lite0")
    loaded, info = load_model(path)
    assert info["head"] == name and info["labels"]["version"] == 2 and type(loaded.head) is type(head)
    with torch.no_grad():
        a, b = model.decode(x), loaded.decode(x)
    assert torch.allclose(a.probabilities, b.probabilities, atol=1e-6) and abs(float(a.probabilities.sum(1).mean()) - 1) < 1e-5
    assert (a.point is None) == (not head.has_point)
    onnx_path, diff = export_onnx(path)
    assert diff <= PARITY_TOL
    eng = OnnxEngine(onnx_path)
    assert ("point" in eng.output_names) == head.has_point and eng.output_names[-1] == "features"
    assert point_parity(loaded, lambda z: eng.run(z)["point"], x) <= POINT_TOL_KM


def test_a_v1_model_file_still_loads(tmp_path):
    """Files written before the head registry (format /1: labels v1, no buffers) load as a linear head."""
    ls = LabelSpace.from_anchors([10, -20, 45], [5, 30, -70])
    bb = create_backbone("small_cnn", pretrained=False)
    torch.manual_seed(0)
    fc = torch.nn.Linear(bb.num_features, 3)
    old = {"format": "geolocate-model/1", "backbone": "small_cnn", "backbone_state": bb.state_dict(),
           "head_state": {"fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()}, "num_features": bb.num_features,
           "dropout": 0.2, "labels": {"h3_resolution": 1, "num_classes": 3, "classes": ls.classes},
           "preprocess": bb.preprocess.to_dict(), "meta": {}}
    torch.save(old, tmp_path / "old.pt")
    model, info = load_model(tmp_path / "old.pt")
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = torch.softmax(fc(bb.eval()(x)), 1)
        assert torch.allclose(model.decode(x).probabilities, ref, atol=1e-6)
    assert info["head"] == "linear" and info["labels"]["version"] == 2
