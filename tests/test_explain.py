"""Grad-CAM on both model families, and the outside-the-lung-box share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrdist.config import ModelConfig
from cxrdist.explain import LUNG_BOX, grad_cam, outside_share, overlay
from cxrdist.models import create_model


@pytest.mark.parametrize(("name", "size"), [("seed_cnn", 128), ("resnet18", 64)])
def test_grad_cam_maps_have_input_size_and_differ_per_image(name, size):
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=name, in_chans=3), num_classes=4).eval()
    x = torch.randn(3, 3, size, size)
    x[1, :, : size // 2] += 2.0  # a different image, so its map must differ
    cams, probs = grad_cam(model, x)
    assert cams.shape == (3, size, size) and probs.shape == (3, 4)
    assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0 + 1e-6
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
    for cam in cams:  # each map is normalised to peak 1, or all zero (nothing supports the class)
        assert float(cam.max()) in (0.0, pytest.approx(1.0))
    if name == "seed_cnn":
        assert not torch.allclose(cams[0], cams[1])
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind


def test_outside_share_counts_mass_outside_the_box():
    cam = np.zeros((100, 100), np.float32)
    assert outside_share(cam) == 0.0  # an empty map says nothing
    cam[50, 50] = 1.0
    assert outside_share(cam) == 0.0
    cam[0, 0] = 1.0  # a corner: outside the central box
    assert outside_share(cam) == pytest.approx(0.5)
    x0 = round(LUNG_BOX[0] * 100)
    cam[:] = 0
    cam[50, x0 - 1] = cam[50, x0] = 1.0  # just outside and just inside the left edge
    assert outside_share(cam) == pytest.approx(0.5)


def test_overlay_is_rgb_and_shows_the_heat():
    gray = np.full((64, 64), 100, np.uint8)
    cold = np.asarray(overlay(gray, np.zeros((64, 64), np.float32)))
    hot = np.asarray(overlay(gray, np.ones((64, 64), np.float32)))
    assert cold.shape == hot.shape == (64, 64, 3)
    assert (cold[32, 32] == 100).all()  # no heat: the radiograph unchanged
    assert not (hot[32, 32] == 100).all()
