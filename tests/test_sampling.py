"""Hard-negative mining: the confused pairs are drawn more often, and training with it still learns."""
import numpy as np
import torch

from geolocate.training.sampling import epoch_order, hard_negative_weights


def test_confused_pairs_are_drawn_more_often():
    # 4 classes x 50 images; the head mixes up classes 0 and 1 (10 each way), classes 2 and 3 are always right
    labels = np.repeat(np.arange(4), 50)
    pred = labels.copy()
    pred[:10], pred[50:60] = 1, 0
    w = hard_negative_weights(pred, labels, 4, strength=4.0)
    assert abs(w.mean() - 1) < 1e-12 and w[labels == 0].min() > w[labels == 2].max()
    draws = labels[epoch_order(len(labels), torch.Generator().manual_seed(0), w).numpy()]
    share = np.bincount(draws, minlength=4) / len(draws)
    assert share[0] + share[1] > 0.6 > 0.5  # 0.5 without mining
    assert share[2] < 0.2 and share[3] < 0.2
    # no confusion, or strength 0: uniform weights, and a plain permutation when no weights are given
    assert np.allclose(hard_negative_weights(labels, labels, 4, 4.0), 1) and np.allclose(hard_negative_weights(pred, labels, 4, 0.0), 1)
    assert sorted(epoch_order(10, torch.Generator().manual_seed(0)).tolist()) == list(range(10))


def test_training_with_hard_negatives_runs_and_learns(tmp_path):
    from geolocate.config import Config
    from geolocate.labels import LabelSpace
    from geolocate.models import CellHead
    from geolocate.training import Split, Trainer

    cfg = Config()
    cfg.train.epochs, cfg.train.min_epochs, cfg.train.hard_negatives, cfg.train.loss, cfg.train.lr = 20, 20, 2.0, "ce", 0.03
    labels = LabelSpace.from_anchors([0, 10, 20, 30], [0, 10, 20, 30])
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    x = torch.nn.functional.one_hot(y, 4).float() * 4 + torch.randn(400, 4, generator=g)
    lat = torch.as_tensor(labels.lat)[y]
    split = Split(labels=y, lat=lat, lon=lat.clone(), feats=x)
    head = CellHead(4, labels, 0.0)
    state = Trainer(cfg, labels, np.bincount(y.numpy(), minlength=4), tmp_path).fit_head(head, split, split)
    assert state["stopper"]["best_row"]["val_top1"] > 0.9
