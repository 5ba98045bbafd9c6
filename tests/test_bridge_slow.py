"""Long encrypted-inference checks (``pytest -m slow``): ResNet-18 at 224x224, full-width VGG-11 and AlexNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import bridge

from .bridge_models import realistic, resnet18

pytestmark = pytest.mark.slow
REL_TOL = 1e-2  # of the largest logit (docs/inference.md)


def _check(model, shape, batch=1):
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(5))
    result = bridge.infer_local(model, x)
    with torch.no_grad():
        ref = model(x).double().numpy()
    assert np.abs(result.logits - ref).max() <= REL_TOL * np.abs(ref).max()
    assert (result.logits.argmax(1) == ref.argmax(1)).all()
    return result


def test_resnet18_224_matches_plaintext_within_the_targets_budget():
    result = _check(resnet18(num_classes=2), (3, 224, 224))
    assert result.stats["rounds"] <= 100
    assert result.stats["bytes"] <= 1e9  # busiest party, dealer included: exact, load-independent


@pytest.mark.parametrize("name, size", [("alexnet", 64), ("vgg11", 32)])
def test_full_width_vgg11_and_alexnet(name, size):
    torch.manual_seed(0)
    _check(realistic(torchvision.models.get_model(name, weights=None, num_classes=10)), (3, size, size))
