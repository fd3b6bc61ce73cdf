"""Temperature scaling on validation: fitted on hand-made overconfident logits, kept in the head (a temperature buffer)."""
import numpy as np
import pytest
import torch

from geolocate.evaluation.calibration import ece, fit_temperature, nll, softmax
from geolocate.models import CellHead


def _overconfident(n=4000, c=10, scale=3.0, seed=0):
    """Logits whose calibrated version is z (labels drawn from softmax(z)), shown ``scale`` times too sharp."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 1.5
    p = softmax(z)
    y = np.array([rng.choice(c, p=row) for row in p])
    return z * scale, y


def test_fit_recovers_the_temperature_and_lowers_ece():
    logits, y = _overconfident(scale=3.0)
    t = fit_temperature(logits, y)
    assert 2.6 < t < 3.4
    assert nll(logits, y, t) < nll(logits, y, 1.0)
    before, after = ece(softmax(logits), y), ece(softmax(logits, t), y)
    assert after < 0.5 * before and after < 0.03


def test_ece_of_a_perfectly_calibrated_predictor_is_small_and_of_a_liar_large():
    probs = np.tile([0.7, 0.3], (1000, 1))
    y = np.r_[np.zeros(700, int), np.ones(300, int)]
    assert ece(probs, y) < 1e-9
    assert abs(ece(np.tile([0.99, 0.01], (1000, 1)), y) - 0.29) < 1e-9


@pytest.mark.parametrize("name", ["linear", "hierarchical", "offset", "gps"])
def test_the_head_temperature_divides_the_log_probabilities_and_keeps_the_ranking(name):
    from geolocate.labels import LabelSpace
    from geolocate.models import create_head

    labels = LabelSpace.from_anchors([10, 12, -30, 50, 51], [20, 22, 140, 5, 6], resolution=2).with_levels([0])
    head = create_head(name, 8, labels, dropout=0.0).eval()
    x = torch.randn(16, 8)
    with torch.no_grad():
        out = head(x)
        before = head.decode(out).log_probs
        head.set_temperature(2.5)
        after = head.decode(out).log_probs
    assert torch.allclose(after, torch.log_softmax(before / 2.5, 1), atol=1e-6)
    assert torch.equal(after.argmax(1), before.argmax(1))
