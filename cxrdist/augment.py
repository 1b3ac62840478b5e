"""Batched augmentation and normalisation on the training device.

Data contract::

    in:   uint8 (B, 1, H, W), gray, 0..255, on any device (usually straight from the loader or the cache)
    augment:         float32 (B, 1, H, W) in [0, 1]
    eval/train_transform: float32 (B, in_chans, H, W), normalised: (x - mean[c]) / std[c]

Training draws every random parameter per sample from a `torch.Generator` that lives on the images'
device, so a run is reproducible from its seed and nothing waits on the host. Rotation, horizontal flip
and the random-resized crop are one affine map per sample, applied in a single `grid_sample` pass over
an `affine_grid`-equivalent grid (bilinear, zeros outside: black, like torchvision's `RandomRotation`);
brightness and contrast are one fused multiply-add; border erasing (`border_erase`) then overwrites the
frame of some samples. Evaluation is normalisation only.

With `AugmentConfig.enabled = false`, `train_transform` is bit-for-bit `eval_transform`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cxrdist.config import AugmentConfig
from cxrdist.lungs import FILL, edge_distance
from shard_tools.schema import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "AugmentParams",
    "augment",
    "draw_params",
    "erase_border",
    "eval_transform",
    "normalize_stats",
    "train_transform",
]


def normalize_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) applied to pixels in [0, 1] for a model with `in_chans` input channels.

    3: ImageNet's statistics, applied to the gray image replicated to RGB (as the study did).
    1: the mean of ImageNet's three means and of its three stds. timm folds a pretrained RGB stem into
    `in_chans=1` by summing the kernel over the input channels, which is exact for a gray image repeated
    three times when all three channels are normalised alike; one average mean and std is the closest
    single-channel match to the per-channel normalisation the weights were trained with.
    """
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_chans == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    raise ValueError(f"in_chans must be 1 or 3 (model.in_chans), got {in_chans}")


@functools.lru_cache(maxsize=16)
def _scale_shift(in_chans: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(1/std, -mean/std) as float32 (1, C, 1, 1) on `device`; cached so no step pays a host copy."""
    mean, std = normalize_stats(in_chans)
    scale = torch.tensor([1.0 / s for s in std], dtype=torch.float32).view(1, in_chans, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(1, in_chans, 1, 1)
    return scale.to(device), shift.to(device)


def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"expected uint8 gray images of shape (B, 1, H, W), got {images.dtype} {tuple(images.shape)}"
        )


def _to_unit(images: Tensor) -> Tensor:
    """uint8 (B, 1, H, W) -> float32 in [0, 1]. The one conversion both the train and the eval path use."""
    return images.float().div_(255)  # in place: same bits as `images.float() / 255`, one buffer less


def _normalize(x: Tensor, in_chans: int, channels_last: bool) -> Tensor:
    """float32 (B, 1, H, W) in [0, 1] -> float32 (B, in_chans, H, W), normalised.

    Broadcasting (B, 1, H, W) against (1, C, 1, 1) replicates gray to C channels in the same kernel, and
    writing into a preallocated tensor gives channels_last without a second copy.
    """
    scale, shift = _scale_shift(in_chans, x.device)
    b, _, h, w = x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((b, in_chans, h, w), dtype=torch.float32, device=x.device, memory_format=fmt)
    return torch.addcmul(shift, x, scale, out=out)


def eval_transform(images: Tensor, in_chans: int, channels_last: bool = False) -> Tensor:
    """Evaluation input: uint8 (B, 1, H, W) -> float32 (B, in_chans, H, W), normalised. Nothing else."""
    _check_images(images)
    with torch.autocast(images.device.type, enabled=False):
        return _normalize(_to_unit(images), in_chans, channels_last)


class AugmentParams(NamedTuple):
    """Per-sample random parameters, each a float32 (or bool) tensor of shape (B,) unless noted."""

    angle_deg: Tensor  # counterclockwise, uniform in [-rotation_degrees, +rotation_degrees]
    flip: Tensor  # bool: mirror left-right
    crop_side: Tensor  # crop side / image side; the crop's area fraction (uniform in crop_scale) squared
    crop_center: Tensor  # (B, 2) crop centre (x, y) in grid_sample's [-1, 1] coordinates; crop stays inside
    brightness: Tensor  # multiplicative factor, uniform in [1 - brightness, 1 + brightness]
    contrast: Tensor  # factor around the image mean, uniform in [1 - contrast, 1 + contrast]


def _check_config(cfg: AugmentConfig) -> tuple[float, float]:
    if len(cfg.crop_scale) != 2 or not 0.0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1.0:
        raise ValueError(
            f"augment.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1 (area fractions; [1, 1] = no crop),"
            f" got {list(cfg.crop_scale)}"
        )
    return cfg.crop_scale[0], cfg.crop_scale[1]


def draw_params(batch_size: int, cfg: AugmentConfig, generator: torch.Generator) -> AugmentParams:
    """Draw one set of parameters per sample, on `generator`'s device.

    Always one (B, 7) uniform draw, whatever is enabled, so the random stream (and with it every other
    parameter) does not shift when one augmentation is switched on or off.
    """
    lo, hi = _check_config(cfg)
    u = torch.rand((batch_size, 7), generator=generator, device=generator.device)
    angle = (2 * u[:, 0] - 1) * cfg.rotation_degrees
    flip = u[:, 1] < cfg.hflip_prob
    # Square crops (in units of the image side): a radiograph's anatomy should not be stretched.
    side = torch.sqrt(lo + (hi - lo) * u[:, 2])
    center = (2 * u[:, 3:5] - 1) * (1 - side)[:, None]
    brightness = 1 + (2 * u[:, 5] - 1) * cfg.brightness
    contrast = 1 + (2 * u[:, 6] - 1) * cfg.contrast
    return AugmentParams(angle, flip, side, center, brightness, contrast)


def _affine_theta(p: AugmentParams, height: int, width: int) -> Tensor:
    """float32 (B, 2, 3): output grid coordinates -> input coordinates, as `F.affine_grid` wants.

    The output is Rotate(Flip(Crop(image))), so sampling maps an output point q to
    crop_center + side * Flip(Rotate^-1(q)). The rotation is done in pixel units (the H/W factors), so
    non-square images rotate without shearing.
    """
    rad = torch.deg2rad(p.angle_deg)
    cos, sin = torch.cos(rad), torch.sin(rad)
    fx = torch.where(p.flip, -p.crop_side, p.crop_side)  # flip mirrors the x row of the matrix
    row_x = torch.stack([fx * cos, -fx * sin * (height / width), p.crop_center[:, 0]], dim=1)
    row_y = torch.stack([p.crop_side * sin * (width / height), p.crop_side * cos, p.crop_center[:, 1]], dim=1)
    return torch.stack([row_x, row_y], dim=1)


@functools.lru_cache(maxsize=16)
def _pixel_centres(size: int, device: torch.device) -> Tensor:
    """float32 (size,): pixel centres in [-1, 1], as `affine_grid` places them with align_corners=False."""
    return ((torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1).to(device)


def _affine_grid(theta: Tensor, height: int, width: int) -> Tensor:
    """Same values as `F.affine_grid(theta, (B, C, H, W), align_corners=False)`, as a (B, H, W, 2) view.

    Two broadcast multiply-adds instead of `affine_grid`'s batched matmul: exact float32 even where TF32
    matmuls are enabled (train.py enables them on CUDA; they would move sampling points by ~0.03 px), and
    on CPU about 4x faster than `F.affine_grid`.
    """
    t = theta[:, :, :, None, None]  # (B, 2, 3, 1, 1)
    xs = _pixel_centres(width, theta.device).view(1, 1, 1, width)
    ys = _pixel_centres(height, theta.device).view(1, 1, height, 1)
    row = torch.addcmul(t[:, :, 2], t[:, :, 0], xs)  # (B, 2, 1, W)
    return torch.addcmul(row, t[:, :, 1], ys).permute(0, 2, 3, 1)  # (B, 2, H, W) -> (B, H, W, 2)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    """float32 (B, C, H, W) sampled through per-sample affine maps `theta` (B, 2, 3); zeros outside."""
    grid = _affine_grid(theta, x.shape[2], x.shape[3])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def erase_border(x: Tensor, cfg: AugmentConfig, generator: torch.Generator) -> Tensor:
    """Border erasing: float32 (B, 1, H, W) in [0, 1] -> the same, some samples' frames overwritten.

    Per sample, with probability `cfg.border_erase`, every pixel within a width drawn uniformly in
    `cfg.border_erase_width` (a fraction of the side) of any edge becomes flat gray (`FILL`, which
    normalises to ~0: no signal) or, with `border_erase_fill = "noise"`, uniform noise. The draws come
    after `draw_params`' and only when border erasing is on, so every other parameter is unchanged by it.
    """
    b, _, h, w = x.shape
    u = torch.rand((b, 2), generator=generator, device=generator.device)
    lo, hi = cfg.border_erase_width
    width = (lo + (hi - lo) * u[:, 1]).view(b, 1, 1, 1)
    frame = (edge_distance(h, w, x.device) <= width) & (u[:, 0] < cfg.border_erase).view(b, 1, 1, 1)
    if cfg.border_erase_fill == "noise":
        fill = torch.rand(x.shape, generator=generator, device=generator.device)
    else:
        fill = torch.full_like(x, FILL / 255)
    return torch.where(frame, fill, x)


def augment(images: Tensor, cfg: AugmentConfig, generator: torch.Generator) -> Tensor:
    """Random training augmentation: uint8 (B, 1, H, W) -> float32 (B, 1, H, W) in [0, 1].

    Per sample: rotation, horizontal flip and crop in one `grid_sample` pass, then brightness and
    contrast (torchvision's definitions, contrast around the sample's mean), then one clamp to [0, 1]
    (torchvision clamps after each; the difference only touches pixels pushed past white and back), then
    border erasing (`erase_border`) when `cfg.border_erase` > 0.
    `generator` must be on `images.device`. With `cfg.enabled` false this is exactly `images.float() / 255`.
    Runs in float32 even inside a bf16/fp16 autocast region.
    """
    _check_images(images)
    if not cfg.enabled:
        return _to_unit(images)
    if generator.device.type != images.device.type:
        raise ValueError(
            f"the augmentation generator is on {generator.device} but the images are on {images.device};"
            f" create it with torch.Generator(device=images.device)"
        )
    geometric = cfg.rotation_degrees > 0 or cfg.hflip_prob > 0 or tuple(cfg.crop_scale) != (1.0, 1.0)
    photometric = cfg.brightness > 0 or cfg.contrast > 0
    erasing = cfg.border_erase > 0
    with torch.autocast(images.device.type, enabled=False):
        p = draw_params(images.shape[0], cfg, generator)
        x = _to_unit(images)
        if not (geometric or photometric or erasing):
            return x
        if geometric:
            x = _warp(x, _affine_theta(p, x.shape[2], x.shape[3]))
        if photometric:
            # brightness b then contrast c around the (brightened) mean m: c*b*x + (1-c)*b*m
            b, c = p.brightness.view(-1, 1, 1, 1), p.contrast.view(-1, 1, 1, 1)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = torch.addcmul((1 - c) * b * mean, x, c * b)
        x = x.clamp_(0.0, 1.0)  # bilinear weights can overshoot 1 by an ulp; jitter by more
        return erase_border(x, cfg, generator) if erasing else x


def train_transform(
    images: Tensor,
    cfg: AugmentConfig,
    generator: torch.Generator,
    in_chans: int,
    channels_last: bool = False,
) -> Tensor:
    """Training input: uint8 (B, 1, H, W) -> float32 (B, in_chans, H, W), augmented then normalised.

    Same output contract as `eval_transform`, and bit-identical to it when `cfg.enabled` is false.
    """
    x = augment(images, cfg, generator)
    with torch.autocast(images.device.type, enabled=False):
        return _normalize(x, in_chans, channels_last)
