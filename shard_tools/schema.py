"""The shard format: the contract between `shard_tools.pack` and everything that reads shards.

Output of `python -m shard_tools.pack SRC OUT`::

    OUT/manifest.json
    OUT/train-000000.tar ... OUT/val-000000.tar ... OUT/test-000000.tar ...

Each tar member group is one sample, named by WebDataset's convention ``<key>.<ext>``:

- ``<key>.png``  the image: 8-bit grayscale ("L") PNG, ``image_size x image_size`` pixels, lossless.
- ``<key>.cls``  the label id as ASCII decimal text, an index into ``manifest["classes"]``.
- ``<key>.json`` provenance: ``{"path": str (relative to SRC), "class": str, "orig_size": [w, h],
  "pixel_sha256": str (sha256 of the decoded, resized uint8 pixels, row-major)}``.

Keys are unique within a dataset, stable across runs, derived from class and file name, and contain no
dot (WebDataset splits a member name at its first dot): see `sample_key`.

``manifest.json`` (format_version 1) holds::

    format_version: 1
    classes: [name, ...]            label order: classes[i] has label id i
    image_size: int                 pixels, square; every image in every shard has this size
    seed: int                       the split seed
    split_fractions: {train, val, test}
    source: str                     SRC as given, made absolute
    tool_version: str               shard_tools.__version__
    command: [str, ...]             argv of the pack run
    splits: {train|val|test: {count, class_counts: {name: n}, shards: [{file, count, bytes, sha256}]}}
    skipped: [{path, reason}]
    duplicates: [{pixel_sha256, paths: [...], split}]

``file`` is relative to the manifest's own location, so a copy of OUT served over HTTP or put in a
bucket is still valid: readers resolve shard URLs against the URL the manifest was read from.
"""

from __future__ import annotations

import hashlib
import re

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")

# Canonical label ids: the database's folder names in alphabetical order.
#   0 = COVID, 1 = Lung_Opacity, 2 = Normal, 3 = Viral Pneumonia
CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")

# ImageNet statistics, applied to the gray image replicated to RGB (as the study did).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def normalize_class_name(name: str) -> str:
    """Folder-name matching key: case-insensitive, space and underscore equal (`Viral Pneumonia`)."""
    return re.sub(r"[\s_]+", "_", name.strip()).lower()


def slug(text: str) -> str:
    """Lower-case ASCII with `[A-Za-z0-9_-]` only, so a key never contains a dot or a slash."""
    return _UNSAFE.sub("_", text).strip("_").lower()


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# The members of one sample, in the order pack writes them.
SAMPLE_EXTS = ("cls", "json", "png")


def sample_key(class_name: str, rel_path: str) -> str:
    """`<class slug>__<slug of rel_path without its extension>`, e.g. `covid__covid-1`.

    `rel_path` is relative to the folder holding the class's images (`<Class>/` or `<Class>/images/`), so
    both database layouts give the same keys. A key longer than 80 characters is cut to 69 plus a hash, so
    tar member names fit a plain USTAR header. `pack` makes colliding keys unique (`pack.assign_keys`).
    """
    last = rel_path.rsplit("/", 1)[-1]
    stem = rel_path[: len(rel_path) - len(last)] + last.rsplit(".", 1)[0] if "." in last else rel_path
    digest = hashlib.sha1(f"{class_name}/{rel_path}".encode()).hexdigest()
    # A name with no ASCII letter or digit at all gets a stable hash instead.
    key = f"{slug(class_name) or 'class'}__{slug(stem) or 'h' + digest[:12]}"
    return key if len(key) <= 80 else f"{key[:69]}-{digest[:10]}"
