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

Lung-focus preprocessing (`focus`, `data.lung_focus` in a recipe) is a mitigation against shortcuts in the
frame (burned-in text, markers, collimation, the paediatric source's framing): "mask" sets everything
outside the template to `FILL`; "crop" keeps the template's bounding box plus `FOCUS_MARGIN` and resizes
it back to the image size. It uses the template, never a sample's own mask, on purpose: a model must get
the same preprocessing when it predicts, and a new radiograph comes with no mask. The template can be
applied identically by training, evaluation, predict, explain and the ONNX graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from shard_tools.schema import IMAGENET_MEAN

__all__ = [
    "BORDER_FRACTION",
    "FILL",
    "FOCUS_MARGIN",
    "FOCUS_MODES",
    "TEMPLATE_FIELDS",
    "border_mask",
    "edge_distance",
    "focus",
    "focus_box",
    "focus_values",
    "hide",
    "template_mask",
]

FILL = round(255 * sum(IMAGENET_MEAN) / 3)  # 114: normalises to ~0 for 1- and 3-channel models
TEMPLATE_FIELDS = ((0.31, 0.47, 0.16, 0.30), (0.69, 0.47, 0.16, 0.30))  # (cx, cy, rx, ry), image fractions
BORDER_FRACTION = 0.12  # "only the border visible": this share of the side on each edge
FOCUS_MODES = ("off", "mask", "crop")  # data.lung_focus; meta.json's preprocess.lung_focus
FOCUS_MARGIN = 0.04  # "crop": kept around the template's bounding box, in image fractions, each side


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


def edge_distance(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """float32 (height, width): each pixel centre's distance to the nearest edge, in image fractions.

    Pixels with `edge_distance <= f` are the frame of width f (as `border_mask`): augmentation's border
    erasing compares it with a width drawn per sample.
    """
    y = _centres(height, device)[:, None]
    x = _centres(width, device)[None, :]
    return torch.minimum(torch.minimum(x, 1 - x), torch.minimum(y, 1 - y))


def focus_box(height: int, width: int) -> tuple[int, int, int, int]:
    """The "crop" region in pixels, (top, bottom, left, right) as slice bounds: the template's bounding box
    widened by `FOCUS_MARGIN` on each side, outward to whole pixels, clipped to the image.

    For the template above that is y 0.13..0.81 and x 0.11..0.89 of the image (88 rows x 100 columns of
    128 x 128), so the crop, resized back to a square, is stretched about 1.14x vertically: identically at
    training and prediction time, which is what matters for the model.
    """
    top = min(cy - ry for _, cy, _, ry in TEMPLATE_FIELDS) - FOCUS_MARGIN
    bottom = max(cy + ry for _, cy, _, ry in TEMPLATE_FIELDS) + FOCUS_MARGIN
    left = min(cx - rx for cx, _, rx, _ in TEMPLATE_FIELDS) - FOCUS_MARGIN
    right = max(cx + rx for cx, _, rx, _ in TEMPLATE_FIELDS) + FOCUS_MARGIN
    # round() first: 0.13 * 100 is 13.000000000000002 in floats and must not become 14 pixels
    return (
        max(0, math.floor(round(top * height, 6))),
        min(height, math.ceil(round(bottom * height, 6))),
        max(0, math.floor(round(left * width, 6))),
        min(width, math.ceil(round(right * width, 6))),
    )


def focus_values(x: Tensor, mode: str) -> Tensor:
    """`focus` on float pixels holding 0..255 (B, 1, H, W): the same values, as float32.

    The one implementation: `focus` wraps it for uint8 batches, and the ONNX graph (whose input may be
    float32) calls it directly, so the exported model preprocesses exactly as PyTorch does.
    """
    if mode not in FOCUS_MODES:
        raise ValueError(f"lung_focus must be one of {', '.join(FOCUS_MODES)}, got {mode!r}")
    if mode == "off":
        return x
    h, w = x.shape[-2:]
    if mode == "mask":
        inside = template_mask(h, w, x.device)
        return torch.where(inside, x, torch.full_like(x, FILL))
    top, bottom, left, right = focus_box(h, w)
    crop = x[:, :, top:bottom, left:right]
    # Upsampling only (the box is smaller than the image), so no antialiasing is needed; rounding keeps
    # the result a valid 8-bit image, as a radiograph resized by pack would be.
    resized = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255)


def focus(images: Tensor, mode: str) -> Tensor:
    """Lung-focus preprocessing: uint8 (B, 1, H, W) -> uint8 (B, 1, H, W), on the images' device.

    "off": the images themselves; "mask": every pixel outside the lung template set to `FILL`;
    "crop": the template's bounding box plus `FOCUS_MARGIN` (`focus_box`), resized back to (H, W) with
    bilinear interpolation. Deterministic: applied before augmentation in training, and the same way by
    evaluation, predict, explain and the ONNX export (recorded in best/meta.json as preprocess.lung_focus).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"expected uint8 gray images of shape (B, 1, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if mode == "off":
        return images
    with torch.autocast(images.device.type, enabled=False):
        return focus_values(images.float(), mode).to(torch.uint8)
