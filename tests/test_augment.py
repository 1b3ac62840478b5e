"""cxrdist.augment: contracts, exact identity when disabled, geometry against torchvision, determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from cxrdist.augment import (
    AugmentParams,
    _affine_grid,
    _affine_theta,
    _warp,
    augment,
    draw_params,
    eval_transform,
    normalize_stats,
    train_transform,
)
from cxrdist.config import AugmentConfig

torch.set_num_threads(1)

OFF = AugmentConfig(rotation_degrees=0.0, hflip_prob=0.0, crop_scale=(1.0, 1.0), brightness=0.0, contrast=0.0)
FULL = AugmentConfig(
    rotation_degrees=15.0, hflip_prob=0.5, crop_scale=(0.6, 1.0), brightness=0.2, contrast=0.2
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(b: int = 8, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (b, 1, h, w), dtype=torch.uint8, generator=gen(seed))


def marker_image(h: int = 64, w: int = 64, row: int = 16, col: int = 44, size: int = 6) -> torch.Tensor:
    """uint8 (1, 1, H, W): black with one white square whose top-left corner is (row, col)."""
    img = torch.zeros((1, 1, h, w), dtype=torch.uint8)
    img[..., row : row + size, col : col + size] = 255
    return img


def centroid(img: torch.Tensor) -> torch.Tensor:
    """(row, col) intensity centroid of a (H, W) float image."""
    h, w = img.shape
    rows = torch.arange(h, dtype=torch.float64)[:, None]
    cols = torch.arange(w, dtype=torch.float64)[None, :]
    m = img.double()
    return torch.stack([(m * rows).sum() / m.sum(), (m * cols).sum() / m.sum()])


# --------------------------------------------------------------------------- contracts and normalisation


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_contract(in_chans: int, channels_last: bool) -> None:
    images = random_images(4, 24, 20)
    for out in (
        eval_transform(images, in_chans, channels_last),
        train_transform(images, FULL, gen(), in_chans, channels_last),
    ):
        assert out.dtype == torch.float32 and out.shape == (4, in_chans, 24, 20)
        if channels_last:
            assert out.is_contiguous(memory_format=torch.channels_last)
        else:
            assert out.is_contiguous()
    if channels_last and in_chans == 3:
        assert not out.is_contiguous()  # really NHWC in memory, not just a flag
    a = augment(images, FULL, gen())
    assert a.dtype == torch.float32 and a.shape == (4, 1, 24, 20)
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_normalize_stats() -> None:
    mean3, std3 = normalize_stats(3)
    assert mean3 == pytest.approx((0.485, 0.456, 0.406)) and std3 == pytest.approx((0.229, 0.224, 0.225))
    mean1, std1 = normalize_stats(1)
    assert mean1 == pytest.approx((sum(mean3) / 3,)) and std1 == pytest.approx((sum(std3) / 3,))
    with pytest.raises(ValueError, match="in_chans"):
        normalize_stats(2)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_eval_transform_values(in_chans: int) -> None:
    """Every gray level maps to (v/255 - mean[c]) / std[c] in every channel (gray replicated)."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    out = eval_transform(levels, in_chans).double()
    mean, std = normalize_stats(in_chans)
    v = torch.arange(256, dtype=torch.float64).view(16, 16) / 255
    for c in range(in_chans):
        torch.testing.assert_close(out[0, c], (v - mean[c]) / std[c], rtol=0, atol=1e-6)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        eval_transform(torch.zeros((2, 1, 8, 8)), 3)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        augment(torch.zeros((2, 3, 8, 8), dtype=torch.uint8), FULL, gen())
    with pytest.raises(ValueError, match="crop_scale"):
        augment(random_images(), dataclasses.replace(FULL, crop_scale=(0.5,)), gen())
    with pytest.raises(ValueError, match="crop_scale"):
        augment(random_images(), dataclasses.replace(FULL, crop_scale=(0.9, 0.5)), gen())


# --------------------------------------------------------------------------------------- exact identity


@pytest.mark.parametrize("cfg", [dataclasses.replace(FULL, enabled=False), OFF], ids=["disabled", "all-zero"])
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_no_augmentation_is_exactly_eval(cfg: AugmentConfig, in_chans: int, channels_last: bool) -> None:
    images = random_images(6, 30, 30)
    assert torch.equal(augment(images, cfg, gen()), images.float() / 255)
    train = train_transform(images, cfg, gen(), in_chans, channels_last)
    assert torch.equal(train, eval_transform(images, in_chans, channels_last))


@pytest.mark.parametrize("size", [(128, 128), (224, 224), (37, 53)])
def test_identity_warp_reproduces_pixels(size: tuple[int, int]) -> None:
    """The grid_sample path itself with zero rotation, no flip and a full crop returns the input."""
    h, w = size
    x = random_images(3, h, w).float() / 255
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(3, 2, 3)
    # float32 grid coordinates are off by ~1e-7 of the width: < 1e-4 px, a 40th of one gray level
    torch.testing.assert_close(_warp(x, theta), x, rtol=0, atol=1e-4)


def test_grid_matches_affine_grid() -> None:
    theta = torch.randn((5, 2, 3), generator=gen(4))
    for h, w in [(32, 32), (37, 53)]:
        ref = F.affine_grid(theta, [5, 1, h, w], align_corners=False)
        torch.testing.assert_close(_affine_grid(theta, h, w), ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- geometry


def test_hflip_moves_left_marker_to_right_edge() -> None:
    img = torch.zeros((1, 1, 32, 32), dtype=torch.uint8)
    img[..., 10:14, 0:2] = 255  # marker on the left edge
    images = img.expand(16, 1, 32, 32).contiguous()
    cfg = dataclasses.replace(OFF, hflip_prob=1.0)
    out = augment(images, cfg, gen())
    torch.testing.assert_close(out, images.float().flip(-1) / 255, rtol=0, atol=1e-5)
    assert (out[..., 10:14, 30:32] > 0.99).all() and (out[..., :, :2] < 1e-5).all()


def test_hflip_is_per_sample_with_the_configured_probability() -> None:
    img = torch.zeros((1, 1, 16, 16), dtype=torch.uint8)
    img[..., 4:8, 0:2] = 255
    images = img.expand(400, 1, 16, 16).contiguous()
    out = augment(images, dataclasses.replace(OFF, hflip_prob=0.5), gen(5))
    flipped = out[:, 0, 5, 15] > 0.99
    assert torch.equal(flipped, draw_params(400, dataclasses.replace(OFF, hflip_prob=0.5), gen(5)).flip)
    assert 150 < int(flipped.sum()) < 250
    assert torch.equal(out[~flipped][:, 0, 5, 0] > 0.99, torch.ones(int((~flipped).sum()), dtype=torch.bool))


def test_rotation_matches_torchvision_counterclockwise() -> None:
    """Each sample's drawn angle, applied by torchvision's rotate, gives the same image and marker place."""
    cfg = dataclasses.replace(OFF, rotation_degrees=90.0)
    images = marker_image().expand(12, 1, 64, 64).contiguous()
    out = augment(images, cfg, gen(7))
    angles = draw_params(12, cfg, gen(7)).angle_deg
    assert angles.min() < -30 and angles.max() > 30  # both directions exercised
    src = images[0].float() / 255
    for i, angle in enumerate(angles.tolist()):
        ref = TF.rotate(src, angle, interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-3)
        assert (centroid(out[i, 0]) - centroid(ref[0])).abs().max() < 0.05


def test_rotation_by_90_degrees_moves_marker_counterclockwise() -> None:
    """Independent of torchvision: a marker right of centre ends up above centre after +90 degrees."""
    img = marker_image(64, 64, row=29, col=50, size=6).float() / 255  # centred on row 31.5, col 52.5
    angle = torch.tensor([90.0])
    theta = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]])  # what _affine_theta must build for +90
    params = AugmentParams(angle, torch.tensor([False]), torch.ones(1), torch.zeros(1, 2), None, None)
    torch.testing.assert_close(_affine_theta(params, 64, 64), theta, rtol=0, atol=1e-6)
    r, c = centroid(_warp(img, theta)[0, 0]).tolist()
    assert abs(r - 10.5) < 0.01 and abs(c - 31.5) < 0.01  # (31.5, 52.5) -> (31.5 - 21, 31.5)


def test_rotation_fills_outside_with_black() -> None:
    images = torch.full((4, 1, 32, 32), 255, dtype=torch.uint8)
    out = augment(images, dataclasses.replace(OFF, rotation_degrees=45.0), gen(8))
    angles = draw_params(4, dataclasses.replace(OFF, rotation_degrees=45.0), gen(8)).angle_deg
    turned = angles.abs() > 10  # enough to bring a corner in from outside the image
    assert turned.sum() >= 2, angles  # the seed exercises it: the check below is not vacuous
    assert (out[turned, 0, 0, 0] == 0).all()  # corners black where the image turned
    assert (out[:, 0, 16, 16] == 1).all()  # the centre kept in every image


def test_crop_scale_and_position() -> None:
    """On linear ramps bilinear sampling is exact, so each output pixel must read the predicted place."""
    cfg = dataclasses.replace(OFF, crop_scale=(0.2, 0.6))
    n, size = 6, 32
    p = draw_params(n, cfg, gen(9))
    assert ((p.crop_side**2 >= 0.2 - 1e-6) & (p.crop_side**2 <= 0.6 + 1e-6)).all()
    assert (p.crop_center.abs() <= (1 - p.crop_side)[:, None] + 1e-6).all()  # crop inside the image
    ramp = (torch.arange(size) * 8).to(torch.uint8)  # 0..248, exact in uint8
    x_ramp = ramp.view(1, 1, 1, size).expand(n, 1, size, size).contiguous()
    y_ramp = ramp.view(1, 1, size, 1).expand(n, 1, size, size).contiguous()
    out_x, out_y = augment(x_ramp, cfg, gen(9)), augment(y_ramp, cfg, gen(9))
    i = torch.arange(size, dtype=torch.float64)
    for k in range(n):
        side, (cx, cy) = p.crop_side[k].item(), p.crop_center[k].tolist()
        # output pixel i samples input pixel coordinate ((c + side * ((2i+1)/size - 1)) + 1) * size/2 - 0.5
        want_x = ((cx + side * ((2 * i + 1) / size - 1)) + 1) * size / 2 - 0.5
        want_y = ((cy + side * ((2 * i + 1) / size - 1)) + 1) * size / 2 - 0.5
        torch.testing.assert_close(out_x[k, 0, 8].double() * 255 / 8, want_x, rtol=0, atol=1e-3)
        torch.testing.assert_close(out_y[k, 0, :, 8].double() * 255 / 8, want_y, rtol=0, atol=1e-3)


def test_brightness_and_contrast() -> None:
    images = random_images(16, 16, 16)
    x = images.float() / 255
    cfg_b = dataclasses.replace(OFF, brightness=0.5)
    b = draw_params(16, cfg_b, gen(10)).brightness.view(-1, 1, 1, 1)
    assert (b != 1).all() and b.min() >= 0.5 and b.max() <= 1.5
    torch.testing.assert_close(augment(images, cfg_b, gen(10)), (x * b).clamp(0, 1), rtol=0, atol=1e-6)
    cfg_c = dataclasses.replace(OFF, contrast=0.5)
    c = draw_params(16, cfg_c, gen(11)).contrast.view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    want = (c * x + (1 - c) * mean).clamp(0, 1)  # torchvision's adjust_contrast on a gray image
    torch.testing.assert_close(augment(images, cfg_c, gen(11)), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(want[0], TF.adjust_contrast(x[0], c[0].item()), rtol=0, atol=1e-5)


def test_brightness_then_contrast_like_torchvision() -> None:
    images = torch.randint(
        0, 161, (8, 1, 16, 16), dtype=torch.uint8, generator=gen(12)
    )  # no clipping at 1.5x
    cfg = dataclasses.replace(OFF, brightness=0.5, contrast=0.5)
    p = draw_params(8, cfg, gen(13))
    out = augment(images, cfg, gen(13))
    for i in range(8):
        x = images[i].float() / 255
        want = TF.adjust_contrast(TF.adjust_brightness(x, p.brightness[i].item()), p.contrast[i].item())
        torch.testing.assert_close(out[i], want, rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------- randomness and autocast


def test_deterministic_per_seed_and_random_per_sample() -> None:
    images = marker_image(32, 32, 4, 20, 5).expand(8, 1, 32, 32).contiguous()
    a = train_transform(images, FULL, gen(0), 3)
    assert torch.equal(a, train_transform(images, FULL, gen(0), 3))
    assert not torch.equal(a, train_transform(images, FULL, gen(1), 3))
    # identical inputs, different outputs: parameters are drawn per sample, not per batch
    assert all(not torch.equal(a[0], a[i]) for i in range(1, 8))
    p = draw_params(8, FULL, gen(0))
    for field in (p.angle_deg, p.crop_side, p.brightness, p.contrast):
        assert field.unique().numel() == 8


def test_draws_do_not_depend_on_which_augmentations_are_on() -> None:
    a = draw_params(5, FULL, gen(2))
    b = draw_params(5, dataclasses.replace(FULL, hflip_prob=0.0, brightness=0.0), gen(2))
    assert torch.equal(a.angle_deg, b.angle_deg) and torch.equal(a.crop_center, b.crop_center)


def test_autocast_bf16_keeps_float32() -> None:
    images = random_images(4, 32, 32)
    ref = train_transform(images, FULL, gen(), 3, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = train_transform(images, FULL, gen(), 3, True)
        ev = eval_transform(images, 3, True)
    assert out.dtype == torch.float32 and ev.dtype == torch.float32
    assert torch.equal(out, ref)
    assert torch.equal(ev, eval_transform(images, 3, True))


def test_generator_must_be_on_the_images_device() -> None:
    images = torch.zeros((2, 1, 8, 8), dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match=r"generator is on cpu but the images are on meta"):
        augment(images, FULL, gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_given_the_same_parameters() -> None:
    images = random_images(16, 64, 64)
    cuda_gen = torch.Generator(device="cuda").manual_seed(0)
    out = train_transform(images.cuda(), FULL, cuda_gen, 3, True)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    again = train_transform(images.cuda(), FULL, torch.Generator(device="cuda").manual_seed(0), 3, True)
    assert torch.equal(out, again)
    off = dataclasses.replace(FULL, enabled=False)
    assert torch.equal(train_transform(images.cuda(), off, cuda_gen, 3), eval_transform(images.cuda(), 3))
    p = draw_params(16, FULL, torch.Generator(device="cuda").manual_seed(1))
    theta = _affine_theta(p, 64, 64)
    x = images.float() / 255
    torch.testing.assert_close(_warp(x.cuda(), theta).cpu(), _warp(x, theta.cpu()), rtol=0, atol=1e-4)
