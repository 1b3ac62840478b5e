"""The shard format: the contract between `shard_tools.pack` and everything that reads shards.

Output of `python -m shard_tools.pack SRC OUT`::

    OUT/manifest.json
    OUT/train-000000.tar ... OUT/val-000000.tar ... OUT/test-000000.tar ...

Each tar member group is one sample, named by WebDataset's convention ``<key>.<ext>``:

- ``<key>.png``  the image: 8-bit grayscale ("L") PNG, ``image_size x image_size`` pixels, lossless.
- ``<key>.cls``  the label id as ASCII decimal text, an index into ``manifest["classes"]``.
- ``<key>.json`` provenance: ``{"path": str (relative to SRC), "class": str, "orig_size": [w, h],
  "pixel_sha256": str (sha256 of the decoded, resized uint8 pixels, row-major)}``, plus ``"group": str``
  when pack grouped the split (``--groups`` CSV or metadata sheets) and ``"source": str`` (the source URL
  a metadata sheet names for the image) when sheets were given.
- ``<key>.mask.png`` (optional, `MASK_EXT`) the lung mask: 8-bit gray PNG, the same size as ``<key>.png``,
  255 = lung field, 0 = not lung (the source mask resized with NEAREST and binarised at 128). Present for
  every sample when the manifest's ``masks`` is true, for none when it is false or absent.

Readers take the members they use and ignore the others, so a sample may gain members without breaking
an older reader.

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
    masks: bool                     every sample has a ``.mask.png`` (true) or none does (false); absent
                                    in shards packed before masks existed: read as false (`has_masks`)

``file`` is relative to the manifest's own location, so a copy of OUT served over HTTP or put in a
bucket is still valid: readers resolve shard URLs against the URL the manifest was read from. It is a plain
name of the packer's own pattern, ``{split}-NNNNNN.tar`` (`SHARD_FILE`): never a path, so a manifest can
neither point a reader outside the shard folder nor smuggle shell syntax into a ``pipe:`` command.

Optional, written by ``pack --groups FILE.csv`` or ``--groups-from-sheets`` only (leakage-safe splits,
`shard_tools.groups`)::

    groups: {file: str (the CSV, absolute; from sheets: the folder, or zip:folder/, holding them),
             sheets: [str, ...] (from sheets only: each sheet read; a group is then a source URL),
             sha256: str (of the CSV's bytes; of the sheets' sha256 digests, in order),
             ungrouped: "error" | "own-group",
             own_groups: int (images the CSV did not name, each a group of its own),
             joined_by_duplicates: [[name, ...], ...] (CSV groups joined because they share an image)}
    splits.<split>.groups: [name, ...]   the CSV's group names whose images are in that split, sorted

Every image of a group is in the split that lists the group, so no name appears in two splits. When the
top-level ``groups`` is present every split lists its ``groups``; when it is absent none does.

`validate_manifest` is the one check of this contract; every reader (`shard_tools.verify`,
`cxrdist.data`, training, evaluation) calls it, so all of them accept and reject the same manifests.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from shard_tools.errors import InputError

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


# What `pack --groups` does with an image its CSV does not name (manifest `groups.ungrouped`).
UNGROUPED_CHOICES = ("error", "own-group")

# A shard's `file` in the manifest: the split's name, a dash, six digits, ".tar". Nothing else.
SHARD_FILE = re.compile(r"^(train|val|test)-[0-9]{6}\.tar$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(InputError):
    """A manifest is missing, unreadable or breaks the format; the message names the file and the entry."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """The manifest in `raw` (the file's bytes: UTF-8, -16 or -32, a byte-order mark allowed), parsed and
    validated (`validate_manifest`). Raises `ManifestError` naming `where`."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        # ValueError: JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits;
        # RecursionError: arrays nested thousands deep.
        raise ManifestError(f"{where}: not a JSON manifest: {str(e)[:200]}") from None
    return validate_manifest(data, where)


def validate_manifest(data: Any, where: str) -> dict[str, Any]:
    """Check a parsed manifest against the format above; return it. Raises `ManifestError` naming `where`
    (the manifest's location) and the offending entry.

    Checked: format_version; classes (non-empty, unique, non-empty names); image_size; all three splits
    and no other, each with count, class_counts (known classes, summing to count) and shards, each shard
    with a `file` matching `SHARD_FILE` for its own split (unique), count, bytes and a sha256, the shard
    counts summing to the split's count; `masks`, if present, a boolean; the optional `groups` fields, if
    present. Fields no reader relies
    on (source, command, ...) are not checked.
    """

    def bad(entry: str, problem: str) -> ManifestError:
        return ManifestError(
            f"{where}: {entry} {problem}. Re-create the shards with `python -m shard_tools.pack`."
        )

    if not isinstance(data, dict):
        raise ManifestError(
            f"{where}: not a shard manifest (expected a JSON object, got {type(data).__name__})"
        )
    version = data.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise bad("format_version", f"is {version!r}; this version reads {FORMAT_VERSION}")
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise bad("classes", f"must be a non-empty list of class names, got {classes!r:.80}")
    if len(set(classes)) != len(classes):
        raise bad("classes", f"names a class twice: {classes!r:.80}")
    size = data.get("image_size")
    if not _is_int(size) or size <= 0:
        raise bad("image_size", f"must be a positive whole number of pixels, got {size!r:.40}")
    splits = data.get("splits")
    if not isinstance(splits, dict):
        raise bad("splits", f"must map {', '.join(SPLITS)} to their shards, got {type(splits).__name__}")
    unknown = sorted(set(splits) - set(SPLITS), key=str)
    if unknown:
        raise bad("splits", f"has unknown split(s) {unknown!r:.80}; the splits are {', '.join(SPLITS)}")
    seen_files: set[str] = set()
    for split in SPLITS:
        entry = splits.get(split)
        if not isinstance(entry, dict):
            raise bad(f"splits.{split}", "is missing or not an object with count, class_counts and shards")
        count = entry.get("count")
        if not _is_int(count) or count < 0:
            raise bad(f"splits.{split}.count", f"must be a whole number >= 0, got {count!r:.40}")
        class_counts = entry.get("class_counts")
        if not isinstance(class_counts, dict):
            raise bad(f"splits.{split}.class_counts", "must map class names to image counts")
        for name, n in class_counts.items():
            if name not in classes:
                raise bad(f"splits.{split}.class_counts", f"names {name!r:.60}, which is not in classes")
            if not _is_int(n) or n < 0:
                raise bad(
                    f"splits.{split}.class_counts.{name}", f"must be a whole number >= 0, got {n!r:.40}"
                )
        if sum(class_counts.values()) != count:
            raise bad(
                f"splits.{split}.class_counts", f"sum to {sum(class_counts.values())}, count is {count}"
            )
        shards = entry.get("shards")
        if not isinstance(shards, list):
            raise bad(f"splits.{split}.shards", "must be a list of shard entries")
        total = 0
        for i, shard in enumerate(shards):
            at = f"splits.{split}.shards[{i}]"
            if not isinstance(shard, dict):
                raise bad(at, "must be an object with file, count, bytes and sha256")
            file = shard.get("file")
            if not (isinstance(file, str) and SHARD_FILE.fullmatch(file) and file.startswith(f"{split}-")):
                raise bad(
                    f"{at}.file",
                    f"is {file!r:.80}, not a shard name of the form {split}-NNNNNN.tar (a plain name in the "
                    "manifest's own folder)",
                )
            if file in seen_files:
                raise bad(f"{at}.file", f"{file!r} is listed twice")
            seen_files.add(file)
            n = shard.get("count")
            if not _is_int(n) or n < 0:
                raise bad(f"{at}.count", f"must be a whole number >= 0, got {n!r:.40}")
            nbytes = shard.get("bytes")
            if not _is_int(nbytes) or nbytes < 0:
                raise bad(f"{at}.bytes", f"must be a whole number >= 0, got {nbytes!r:.40}")
            sha = shard.get("sha256")
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                raise bad(f"{at}.sha256", f"must be 64 lower-case hex digits, got {sha!r:.80}")
            total += n
        if total != count:
            raise bad(f"splits.{split}", f"lists shards holding {total} samples, but its count is {count}")
    if "masks" in data and not isinstance(data["masks"], bool):
        raise bad("masks", f"must be true or false, got {data['masks']!r:.40}")
    _validate_groups(data, splits, bad)
    return data


def _validate_groups(
    data: dict[str, Any], splits: dict[str, Any], bad: Callable[[str, str], ManifestError]
) -> None:
    """The optional `groups` fields (see the module docstring): well-formed, and no group in two splits."""
    summary = data.get("groups")
    if summary is None:
        for split in SPLITS:
            if "groups" in splits[split]:
                raise bad(f"splits.{split}.groups", "is present but the manifest has no top-level groups")
        return
    if not isinstance(summary, dict):
        raise bad("groups", f"must be an object describing the groups file, got {type(summary).__name__}")
    if not isinstance(summary.get("file"), str):
        raise bad("groups.file", f"must be the groups file's path, got {summary.get('file')!r:.80}")
    sha = summary.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise bad("groups.sha256", f"must be 64 lower-case hex digits, got {sha!r:.80}")
    if summary.get("ungrouped") not in UNGROUPED_CHOICES:
        raise bad(
            "groups.ungrouped", f"must be one of {UNGROUPED_CHOICES}, got {summary.get('ungrouped')!r:.40}"
        )
    own = summary.get("own_groups")
    if not _is_int(own) or own < 0:
        raise bad("groups.own_groups", f"must be a whole number >= 0, got {own!r:.40}")
    joined = summary.get("joined_by_duplicates")
    if not isinstance(joined, list) or not all(
        isinstance(j, list) and all(isinstance(n, str) for n in j) for j in joined
    ):
        raise bad(
            "groups.joined_by_duplicates", f"must be a list of lists of group names, got {joined!r:.80}"
        )
    split_of: dict[str, str] = {}
    for split in SPLITS:
        names = splits[split].get("groups")
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise bad(f"splits.{split}.groups", f"must be a list of group names, got {names!r:.80}")
        for name in names:
            if name in split_of:
                where = "twice" if split_of[name] == split else f"in {split_of[name]} and in {split}"
                raise bad(f"splits.{split}.groups", f"lists group {name!r:.60} {where}")
            split_of[name] = split


# The members of one sample, in the order pack writes them.
SAMPLE_EXTS = ("cls", "json", "png")
IMAGE_EXT, LABEL_EXT, META_EXT = "png", "cls", "json"
# The optional lung mask, `<key>.mask.png`: written between .json and .png (sorted order).
MASK_EXT = "mask.png"


def has_masks(manifest: dict[str, Any]) -> bool:
    """Whether every sample of the dataset holds a `MASK_EXT` member (an old manifest without the key:
    False)."""
    return manifest.get("masks") is True


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
