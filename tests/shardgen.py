"""Tiny spec-conformant shard sets for tests, written directly with webdataset's TarWriter.

`shard_tools.pack` makes shards from image folders; tests need shapes pack would never make on purpose
(3 shards of 3, 17 and 5 samples, a split of two shards, a corrupt PNG), so they write them here. The
output follows `shard_tools.schema`: ``<key>.png`` 8-bit gray, ``<key>.cls`` ASCII label id,
``<key>.json`` provenance, and a format-version-1 ``manifest.json`` listing every shard.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from shard_tools.schema import CLASSES, FORMAT_VERSION, MANIFEST_NAME, shard_name


@dataclass(frozen=True)
class Sample:
    pixels: np.ndarray  # uint8 (H, W)
    label: int
    split: str
    shard: str  # file name
    mask: np.ndarray | None = None  # bool (H, W) lung field, when written with masks=True


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_shards(
    out: Path,
    shard_sizes: dict[str, list[int]],
    *,
    image_size: int = 8,
    classes: tuple[str, ...] = CLASSES,
    seed: int = 0,
    bad_keys: frozenset[str] = frozenset(),
    masks: bool = False,
    provenance_extra: Callable[[str, int], dict] | None = None,
) -> dict[str, Sample]:
    """Write ``{split}-NNNNNN.tar`` with the given per-shard sample counts, and the manifest.

    Labels cycle through the classes; pixels are noise around a class-dependent gray level, so that a
    "model" looking at the mean gray level is right most of the time. Keys in `bad_keys` get a PNG
    member that is not a PNG. With `masks`, every sample gets a ``<key>.mask.png`` lung mask (a random
    rectangle per sample, unlike any template) and the manifest says ``"masks": true``. Returns every
    sample by key. `provenance_extra(key, label)` adds fields to a sample's ``.json`` (pack's ``group`` and
    ``source``).
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples: dict[str, Sample] = {}
    splits = {}
    # Every manifest lists all three splits (`schema.validate_manifest`); the ones not asked for are empty.
    shard_sizes = {split: shard_sizes.get(split, []) for split in ("train", "val", "test")}
    for split, sizes in shard_sizes.items():
        shards = []
        class_counts = dict.fromkeys(classes, 0)
        n = 0
        for index, size in enumerate(sizes):
            name = shard_name(split, index)
            with wds.TarWriter(str(out / name)) as sink:
                for _ in range(size):
                    label = n % len(classes)
                    key = f"{split}_{index:02d}_{n:05d}"
                    level = 40 + 50 * label
                    pixels = np.clip(rng.normal(level, 30, (image_size, image_size)), 0, 255).astype(np.uint8)
                    provenance = {
                        "path": f"{classes[label]}/{key}.png",
                        "class": classes[label],
                        "orig_size": [image_size, image_size],
                        "pixel_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
                    }
                    if provenance_extra is not None:
                        provenance.update(provenance_extra(key, label))
                    png = b"this is not a png" if key in bad_keys else _png(pixels)
                    sample = {
                        "__key__": key,
                        "png": png,
                        "cls": str(label).encode("ascii"),
                        "json": json.dumps(provenance).encode(),
                    }
                    mask = None
                    if masks:
                        top, left = rng.integers(0, image_size // 2, 2)
                        bottom, right = rng.integers(image_size // 2 + 1, image_size + 1, 2)
                        mask = np.zeros((image_size, image_size), dtype=bool)
                        mask[top:bottom, left:right] = True
                        sample["mask.png"] = _png(np.where(mask, 255, 0).astype(np.uint8))
                    sink.write(sample)
                    samples[key] = Sample(pixels, label, split, name, mask)
                    class_counts[classes[label]] += 1
                    n += 1
            data = (out / name).read_bytes()
            shards.append(
                {"file": name, "count": size, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
        splits[split] = {"count": n, "class_counts": class_counts, "shards": shards}
    manifest = {
        "format_version": FORMAT_VERSION,
        "classes": list(classes),
        "image_size": image_size,
        "seed": seed,
        "split_fractions": {"train": 0.7, "val": 0.15, "test": 0.15},
        "source": str(out),
        "tool_version": "tests.shardgen",
        "command": ["tests/shardgen.py"],
        "splits": splits,
        "skipped": [],
        "duplicates": [],
    }
    if masks:
        manifest["masks"] = True
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return samples
