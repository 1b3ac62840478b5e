"""The fields every saved model's metadata carries, checked once for both of its forms: `best/meta.json`
(`cxrdist.artifacts.ModelMeta`) and an ONNX export's metadata_props (`cxrdist.onnx_model`).

Metadata is read before anything is sized from it: the image size decides how large every input is
resized, the class names how the outputs are read. A hand-edited or damaged file must therefore be refused
with one line naming the file and the field (exit 2), not resize to 10^10 pixels or print a traceback.
Whether the metadata fits the weights (as many classes as outputs, the image size the network takes) is
checked by each loader against its own weights.

Imports nothing heavier than `shard_tools.images` (no torch): the ONNX path runs without it.
"""

from __future__ import annotations

import math
from typing import Any

from shard_tools.errors import InputError
from shard_tools.images import MAX_PIXELS

MAX_IMAGE_SIZE_PX = math.isqrt(MAX_PIXELS)  # the largest side pack stores and load_gray decodes: 8192
IN_CHANS = (1, 3)  # what cxrdist trains: gray, or gray repeated to RGB


class MetadataError(InputError):
    """A model's metadata is malformed or does not fit its weights. Exit 2."""


def check_classes(value: Any, source: str) -> tuple[str, ...]:
    """Class names in label order: a non-empty list of distinct, non-empty strings."""
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise MetadataError(f"{source}: classes must be a non-empty list of class names, got {value!r:.80}")
    if len(set(value)) != len(value):
        raise MetadataError(f"{source}: classes names a class twice: {value!r:.80}")
    return tuple(value)


def check_image_size(value: Any, source: str) -> int:
    """The square input side in pixels: a whole number in 1..MAX_IMAGE_SIZE_PX (JSON text is refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IMAGE_SIZE_PX:
        raise MetadataError(
            f"{source}: image_size must be a whole number of pixels in 1..{MAX_IMAGE_SIZE_PX}, got "
            f"{value!r:.40}; the metadata is damaged: re-export the model"
        )
    return value


def check_in_chans(value: Any, source: str) -> int:
    if isinstance(value, bool) or value not in IN_CHANS:
        raise MetadataError(f"{source}: in_chans must be 1 or 3, got {value!r:.40}")
    return value


def check_temperature(value: Any, source: str) -> float | None:
    """None (no calibration), or a positive finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise MetadataError(
            f"{source}: calibration.temperature must be a positive number, got {value!r:.40}; fix it, or "
            "remove the calibration entry"
        )
    return float(value)


def check_outputs(num_outputs: int, classes: tuple[str, ...], source: str) -> None:
    """The weights' output count against the class names the metadata reads them by."""
    if num_outputs != len(classes):
        raise MetadataError(
            f"{source}: the metadata names {len(classes)} classes ({', '.join(classes)}) but the weights "
            f"have {num_outputs} outputs: the metadata does not belong to these weights"
        )
