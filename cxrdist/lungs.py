"""Where the lungs are, and hiding parts of a radiograph: the geometry the shortcut audit and the lung-focus
preprocessing share.

Data contract::

    masks:  bool (H, W) or (B, 1, H, W), True = lung field, on any device
    images: uint8 (B, 1, H, W), gray 0..255, as the loaders deliver them (before normalisation)
    out:    uint8 (B, 1, H, W), the hidden pixels set to `FILL`

`FILL` is the pixel value that normalisation maps to (about) zero: the mean gray of the ImageNet statistics
every model here is normalised with. A hidden region then carries no signal of its own into the first
layer, rather than the darkness of black (which a radiograph's frame and air already have).

The template (`template_mask`) stands in where a sample has no lung mask of its own: two upright ellipses,
in fractions of the image, placed where the lung fields of a frontal (PA/AP) chest radiograph lie when the
chest is centred and fills most of the film, as in the COVID-19 Radiography Database:

    left field   centre (0.31, 0.47), half-width 0.16, half-height 0.30   (x across, y down, 0..1)
    right field  centre (0.69, 0.47), half-width 0.16, half-height 0.30

It covers about 30% of the image. It is a rough stand-in, not a segmentation: it misses the costophrenic
angles of a tall chest and includes some mediastinum of a narrow one, so results computed with it say so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shard_tools.schema import IMAGENET_MEAN

__all__ = ["BORDER_FRACTION", "FILL", "TEMPLATE_FIELDS", "border_mask", "hide", "template_mask"]

FILL = round(255 * sum(IMAGENET_MEAN) / 3)  # 114: normalises to ~0 for 1- and 3-channel models
TEMPLATE_FIELDS = ((0.31, 0.47, 0.16, 0.30), (0.69, 0.47, 0.16, 0.30))  # (cx, cy, rx, ry), image fractions
BORDER_FRACTION = 0.12  # "only the border visible": this share of the side on each edge


def _centres(size: int, device: torch.device | str) -> Tensor:
    """Pixel centres in image fractions, float32 (size,)."""
    return (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size


def template_mask(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """The two-ellipse lung template: bool (height, width), True inside either field."""
    y = _centres(height, device)[:, None]
    x = _centres(width, device)[None, :]
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    for cx, cy, rx, ry in TEMPLATE_FIELDS:
        mask |= ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    return mask


def border_mask(
    height: int, width: int, fraction: float = BORDER_FRACTION, device: torch.device | str = "cpu"
) -> Tensor:
    """bool (height, width): True within `fraction` of the side of any edge (the image's frame)."""
    if not 0.0 < fraction < 0.5:
        raise ValueError(f"border fraction must be in (0, 0.5), got {fraction}")
    y = _centres(height, device)[:, None]
    x = _centres(width, device)[None, :]
    inner = (x > fraction) & (x < 1 - fraction) & (y > fraction) & (y < 1 - fraction)
    return ~inner


def hide(images: Tensor, hidden: Tensor, fill: int = FILL) -> Tensor:
    """`images` with every pixel where `hidden` is True set to `fill`; a new tensor, same dtype.

    `hidden` is bool (H, W) (the same region for every image) or (B, 1, H, W) (one per image), on the
    images' device. One `where` on the device: no host round trip, nothing on disk.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"expected uint8 gray images of shape (B, 1, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if hidden.dtype != torch.bool or hidden.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"mask must be bool with the images' height and width {tuple(images.shape[-2:])}, "
            f"got {hidden.dtype} {tuple(hidden.shape)}"
        )
    return torch.where(hidden, torch.full_like(images, fill), images)
