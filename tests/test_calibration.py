"""Temperature scaling on validation: fitted on hand-made overconfident logits, kept in the head (a temperature buffer)."""
import numpy as np
import pytest
import torch

from geolocate.evaluation.calibration import ece, ece_floor, fit_temperature, nll, softmax, top1_nll
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


def test_the_top1_objective_calibrates_the_reported_confidence_where_the_likelihood_does_not():
    """Soft-target training spreads the true cell's mass over its neighbours: the likelihood of the true cell
    then asks for a different temperature than the top-1 confidence does. Hand-made: the top-1 cell is right
    exactly as often as its confidence says (calibrated at T = 1), but when it is wrong the truth is the least
    likely cell (a very low likelihood)."""
    rng = np.random.default_rng(0)
    n, c = 4000, 20
    z = rng.normal(size=(n, c))
    z[:, 0] += rng.uniform(0.5, 4.0, n)          # a spread of confidences
    conf = softmax(z).max(1)
    right = rng.random(n) < conf                   # calibrated top-1 at T = 1 ...
    y = np.where(right, z.argmax(1), np.argmin(z, 1))  # ... but a wrong answer's truth is the least likely cell
    t_nll, t_top = fit_temperature(z, y), fit_temperature(z, y, objective="top1")
    assert 0.85 < t_top < 1.15                    # recovers T = 1 for the confidence
    assert t_nll > 1.5                             # the likelihood flattens everything to reach the far truths
    assert top1_nll(z, y, t_top) <= top1_nll(z, y, t_nll) and nll(z, y, t_nll) <= nll(z, y, t_top)
    assert ece(softmax(z, t_top), y) < 0.03 < ece(softmax(z, t_nll), y)
    assert (softmax(z, t_top).argmax(1) == z.argmax(1)).all()  # the ranking never changes
    with pytest.raises(ValueError, match="nll, top1"):
        fit_temperature(z, y, objective="ece")


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


def test_the_ece_floor_is_what_a_calibrated_model_shows_and_shrinks_with_more_images():
    rng = np.random.default_rng(3)
    small, big = (np.stack([c := rng.uniform(0.2, 0.9, n), 1 - c], 1) for n in (200, 5000))
    f_small, f_big = ece_floor(small), ece_floor(big)
    assert 0.03 < f_small < 0.09 and f_big < 0.02 and f_big < f_small / 3
    # a calibrated model's measured ECE falls around its floor
    y = (rng.random(len(big)) >= big[:, 0]).astype(int)  # class 0 right with its confidence
    assert abs(ece(big, y) - f_big) < 0.01
