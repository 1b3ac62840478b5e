"""Pack's decode stage: every input image (and its lung mask) to a PNG in a spill file, in worker processes.

`decode_to_spill` runs `decode_image` on the pool for every `Source`, in order, and appends each result's
PNGs to one spill file; `Packed` says where they are, so memory stays flat on the full database while the
split is not yet known (`shard_tools.write` later copies them into shards). Each image goes through
`images.decode_gray` and `images.resize_gray` and is stored as a lossless PNG; its mask is resized with
NEAREST to the stored size and binarised at 128 (the rules are in `shard_tools.pack`'s docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import Progress

from shard_tools import images
from shard_tools.errors import PackError
from shard_tools.pool import WorkerPool, ordered_map
from shard_tools.sources import Source, read_image_bytes

# A lung mask's aspect ratio may differ from its image's by this share (rounding of a resized copy).
MASK_ASPECT_TOLERANCE = 0.02


@dataclass(frozen=True)
class Packed:
    """One decoded image, its PNG stored in the spill file at [offset, offset + length)."""

    offset: int
    length: int
    pixel_sha256: str
    orig_size: tuple[int, int]  # (width, height) of the source image
    shape: tuple[int, int]  # (height, width) as stored
    mask_length: int = 0  # its lung mask's PNG follows the image's in the spill file; 0: no mask


@dataclass(frozen=True)
class Decoded:
    """A decode worker's answer for one image: its PNGs, or why it cannot be used.

    `skip` set: the image (or its lung mask) cannot be read; it is skipped and counted (`--max-skipped`).
    `bad_mask` set: its mask is another image's (another aspect ratio); the run stops (`PackError`).
    Neither: `png` is the stored image, `mask_png` its mask's PNG (b"" when it has none)."""

    png: bytes = b""
    pixel_sha256: str = ""
    orig_size: tuple[int, int] = (0, 0)  # (width, height) of the source image
    shape: tuple[int, int] = (0, 0)  # (height, width) as stored
    mask_png: bytes = b""
    skip: str = ""  # why the image is skipped
    bad_mask: str = ""  # why the run stops


def decode_image(job: tuple[str, str, str, int, str, str]) -> Decoded:
    """Worker: decode one image (and its lung mask) into PNGs; see `Decoded` for the outcomes.

    `job` is (archive, name, rel, size, mask_name, mask_rel): a zip member is read by name from the archive
    (opened once per worker), a file by its path; mask_name "" means no mask (mask_png is then b"")."""
    archive, name, rel, size, mask_name, mask_rel = job
    try:
        gray = images.decode_gray(read_image_bytes(archive, name) if archive else name, name=rel)
    except OSError as e:  # a zip member that cannot be read
        return Decoded(skip=str(e))
    except images.ImageError as e:
        return Decoded(skip=e.reason)
    orig_size = (int(gray.shape[1]), int(gray.shape[0]))
    gray = images.resize_gray(gray, size)
    mask_png = b""
    if mask_name:
        try:
            mask = images.decode_gray(
                read_image_bytes(archive, mask_name) if archive else mask_name, name=mask_rel
            )
        except OSError as e:
            return Decoded(skip=f"its lung mask {mask_rel}: {e}")
        except images.ImageError as e:
            return Decoded(skip=f"its lung mask {mask_rel}: {e.reason}")
        (mh, mw), (h, w) = mask.shape, gray.shape
        if abs((mw / mh) / (orig_size[0] / orig_size[1]) - 1) > MASK_ASPECT_TOLERANCE:
            return Decoded(
                bad_mask=f"lung mask {mask_rel} is {mw}x{mh}, but its image {rel} is "
                f"{orig_size[0]}x{orig_size[1]}: another shape, so not this image's mask; replace it, or "
                "pass --no-masks"
            )
        # NEAREST keeps the mask's edges where they are (no grey rim to threshold); binarised at 128.
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
        mask_png = images.encode_png(np.where(mask >= 128, 255, 0).astype(np.uint8))
    shape = (int(gray.shape[0]), int(gray.shape[1]))
    return Decoded(images.encode_png(gray), images.pixel_sha256(gray), orig_size, shape, mask_png)


def decode_to_spill(
    sources: list[Source], size: int, spill: Path, pool: WorkerPool | None, bar: Progress
) -> tuple[list[Source], list[Packed], list[dict[str, str]]]:
    """Decode every source, appending its PNG to `spill`; return the decoded sources, where their PNGs
    are, and the failures as skipped records."""
    jobs = [(s.archive, s.name, s.rel, size, s.mask_name, s.mask_rel) for s in sources]
    kept: list[Source] = []
    packed: list[Packed] = []
    failed: list[dict[str, str]] = []
    task = bar.add_task("decode", total=len(jobs))
    with open(spill, "wb") as f:
        for s, d in zip(sources, ordered_map(pool, decode_image, jobs)):
            bar.advance(task)
            if d.bad_mask:
                raise PackError(d.bad_mask)
            if d.skip:
                failed.append({"path": s.rel, "reason": d.skip})
                continue
            packed.append(Packed(f.tell(), len(d.png), d.pixel_sha256, d.orig_size, d.shape, len(d.mask_png)))
            f.write(d.png + d.mask_png)
            kept.append(s)
    return kept, packed, failed
