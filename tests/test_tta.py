"""Test-time augmentation: only the transforms each domain is invariant to, fused like the views of a sample."""
import numpy as np
import pytest
from PIL import Image

from geolocate.tta import domain_of, tta_transforms


def _gradient(w=96, h=64) -> Image.Image:
    """Red grows to the east, green to the south: any flip, rotation or transpose changes a sign below."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 60)], -1).astype(np.uint8))


@pytest.mark.parametrize("domain", ["aerial", "street"])
def test_tta_views_keep_north_up_and_never_mirror(domain):
    im = _gradient()
    views = [np.asarray(t(im), np.float64) for t in tta_transforms(domain)]
    assert len(views) == (6 if domain == "aerial" else 4)
    for v in views:
        assert v.shape == (64, 96, 3)
        assert (np.diff(v[:, :, 0].mean(0)) >= -1).all() and v[:, -1, 0].mean() > v[:, 0, 0].mean() + 100  # east stays east
        assert v[-1, :, 1].mean() > v[0, :, 1].mean() + 100  # south stays south
    assert np.array_equal(views[0], np.asarray(im, np.float64))  # the image itself is always one of the views
    if domain == "aerial":  # aerial views are pure crops: no rotation, so every row stays constant in green
        assert all(np.ptp(v[:, :, 1], axis=1).max() <= 2 for v in views)


def test_domain_of_training_sources():
    assert domain_of(["earth"]) == "aerial" and domain_of(["folder", "mapillary"]) == "street" and domain_of([]) == "street"
    with pytest.raises(ValueError, match="unknown TTA domain"):
        tta_transforms("underwater")


def test_predict_with_tta_is_the_mean_of_its_views(trained):
    from geolocate.serving import Geolocator
    from geolocate.tta import tta_transforms

    _, run_dir, model_path = trained
    geo = Geolocator.from_pretrained(model_path, engine="torch")
    path = sorted((run_dir.parents[1] / "data" / "raw" / "earth").rglob("*.jpg"))[0]
    plain = geo.predict([path], top_k=3)[0]
    views = np.stack([geo.preprocess.load(path, transform=t)[0] for t in tta_transforms("aerial")])
    out = geo.engine.run(views)
    # the views' mean, then the model's decode-time reranking (if it ships any) on their mean features
    expect = geo._rerank(out["probabilities"].astype(np.float64).mean(0)[None], out["features"].mean(0)[None])[0]
    geo.tta = True
    p = geo.predict([path], top_k=3)[0]
    assert p.error is None and p.true_lat == plain.true_lat
    assert [c.cell for c in p.top] == [geo.classes[i]["cell"] for i in np.argsort(-expect)[:3]]
    assert p.top[0].probability == pytest.approx(expect.max(), abs=1e-6)
