"""H3-adjacency-aware soft targets: the true cell keeps 1 - eps, its ring-1 neighbour classes share eps."""
import h3
import numpy as np
import pytest
import torch

from geolocate.labels import LabelSpace
from geolocate.training.losses import LossContext, adjacency_loss, class_neighbours


def _space():
    """A res-1 cell, its 6 neighbours, a far cell (no neighbour classes) and a merged res-0 class next to nothing."""
    centre = h3.latlng_to_cell(48.0, 11.0, 1)
    ring = sorted(h3.grid_ring(centre, 1))
    far = h3.latlng_to_cell(-33.0, 151.0, 1)
    cells = [centre, *ring, far]
    classes = [{"cell": c, "resolution": 1, "lat": h3.cell_to_latlng(c)[0], "lon": h3.cell_to_latlng(c)[1], "place": c}
               for c in cells]
    return LabelSpace(classes, 1), cells


def test_neighbours_are_the_ring_classes_and_merged_parents_count():
    ls, cells = _space()
    nb = class_neighbours(ls)
    assert sorted(int(j) for j in nb[0] if j >= 0) == list(range(1, 7))
    assert all(0 in [int(j) for j in nb[i]] for i in range(1, 7))  # each ring cell has the centre as a neighbour
    assert (nb[7] < 0).all()  # the far cell has none
    # a merged coarser class: a res-1 cell whose neighbour lies inside a res-0 class is next to that class
    a = h3.latlng_to_cell(10.0, 10.0, 1)
    n = next(c for c in h3.grid_ring(a, 1) if h3.cell_to_parent(c, 0) != h3.cell_to_parent(a, 0))
    merged = h3.cell_to_parent(n, 0)
    ls2 = LabelSpace([{"cell": a, "lat": 10, "lon": 10, "place": "a"}, {"cell": merged, "lat": 0, "lon": 0, "place": "m"}], 1)
    assert 1 in class_neighbours(ls2)[0].tolist()


def test_adjacency_loss_is_the_soft_target_cross_entropy():
    ls, _ = _space()
    nb = class_neighbours(ls)
    ctx = LossContext(torch.as_tensor(ls.lat), torch.as_tensor(ls.lon), None, 600.0, 0.3, "adjacency", neighbours=nb,
                      adjacency_eps=0.3)
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 7])
    lp = torch.log_softmax(logits, 1)
    q = torch.zeros(3, 8)
    q[0, 0], q[0, 1:7] = 0.7, 0.3 / 6
    q[1, 3] = 0.7
    q[1, [int(j) for j in nb[3] if j >= 0]] = 0.3 / int((nb[3] >= 0).sum())
    q[2, 7] = 1.0  # no neighbour classes: plain cross-entropy
    assert float(adjacency_loss(logits, y, None, None, ctx)) == pytest.approx(float(-(q * lp).sum(1).mean()), abs=1e-6)
    with pytest.raises(ValueError, match="needs the classes' neighbours"):
        LossContext(torch.zeros(1), torch.zeros(1), None, 600.0, 0.3, "adjacency")


def test_the_trainer_builds_the_neighbours_for_the_adjacency_loss(tmp_path):
    from geolocate.config import Config
    from geolocate.models import CellHead
    from geolocate.training import Split, Trainer

    ls, _ = _space()
    cfg = Config()
    cfg.train.loss, cfg.train.epochs, cfg.train.min_epochs, cfg.train.lr = "adjacency", 10, 10, 0.05
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 8, (240,), generator=g)
    x = torch.nn.functional.one_hot(y, 8).float() * 3 + torch.randn(240, 8, generator=g)
    lat = torch.as_tensor(ls.lat)[y]
    split = Split(labels=y, lat=lat, lon=torch.as_tensor(ls.lon)[y], feats=x)
    trainer = Trainer(cfg, ls, np.bincount(y.numpy(), minlength=8), tmp_path)
    assert trainer.ctx.neighbours.shape[0] == 8
    state = trainer.fit_head(CellHead(8, ls, 0.0), split, split)
    assert state["stopper"]["best_row"]["val_top1"] > 0.9
