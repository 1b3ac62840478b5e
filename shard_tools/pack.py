"""Pack chest radiographs (a database folder or the download's zip) into WebDataset shards with a manifest.

    python -m shard_tools.pack SRC OUT [--size 128] [--split 0.7,0.15,0.15] [--seed 0] [--shard-size 1000]
        [--max-shard-mb 256] [--min-shards 16] [--workers N] [--classes A,B,...] [--max-skipped 0.01]
        [--duplicates group|drop] [--groups FILE.csv | --groups-from-sheets [--ungrouped error|own-group]]
        [--no-masks] [--force] [--no-progress]

Input (`shard_tools.sources`): SRC is a folder holding one folder per class, in either of the database's
layouts, `SRC/<Class>/*.png` or `SRC/<Class>/images/*.png` (lung masks in `<Class>/masks/`); or the zip Kaggle
serves (`covid19-radiography-database.zip`), read in place, with the class folders at its top level or
one folder down (`COVID-19_Radiography_Dataset/`). Class folders match the class names case-insensitively,
with space and underscore equal (`Viral Pneumonia`, `viral_pneumonia`). Files: `images.IMAGE_SUFFIXES`.

Lung masks: when the class folders hold `masks/` beside `images/` (the database ships one 256 x 256 mask per
image, same file name), each sample gets `<key>.mask.png`: the mask resized with NEAREST to the stored image
size and binarised at 128, and the manifest says `"masks": true`; `--no-masks` leaves them out. Masks are
stored only when every image has one (a model or an audit cannot use masks that only part of a split
has): when some images lack one, none is stored and a warning says how many lack one and names a few. A
mask whose stem names no image of its class (its image is missing) is refused, naming it (exit 2), as is
a mask whose aspect ratio differs from its image's by more than 2%: either is another image's mask, not a
resized copy. A mask that cannot be decoded skips its image, counted and listed like an unreadable image
(`--max-skipped`).
Each sample's recorded `path` is relative to the folder that holds the class folders, so a zip and the
folder extracted from it give byte-identical shards.

Labels: by default the database's classes in alphabetical order, as in `schema.CLASSES`:
0 = COVID, 1 = Lung_Opacity, 2 = Normal, 3 = Viral Pneumonia. `--classes` gives other names and order
(`--classes Normal,COVID`: 0 = Normal, 1 = COVID); the database's names keep their canonical spelling.

Output: `OUT/{train,val,test}-NNNNNN.tar` and `OUT/manifest.json`, as specified in `shard_tools.schema`.
Each image goes through `images.load_gray` (8-bit gray, LANCZOS resize to size x size) and is stored as a
lossless PNG. The same input and options give byte-identical shards, whatever OUT and `--workers` are.
OUT is built in a hidden folder beside it and swapped in at the end; `--force` replaces only an empty
folder or a folder of shards (`shard_tools.outdir`). Exit codes: 0 done, 1 the run failed (a full disk,
more unreadable files than `--max-skipped`, a worker process killed), 2 bad input or options, 130 Ctrl-C,
143 SIGTERM; nothing half-written is left in any case. Files that are not regular files (a FIFO, a device)
or larger than 256 MiB are skipped unread, like unreadable images (`files.read_input_file`).

Splits (`shard_tools.splits`) are stratified per class, and images with identical pixels stay in one
split, so a duplicate never leaks from train into val or test (`--duplicates drop` keeps only one of each
set). `--groups FILE.csv` (`shard_tools.groups`) keeps each patient, study or hospital whole inside one
split, and prints how far the class shares moved from the requested fractions. `--groups-from-sheets` takes
the groups from the database's own `<Class>.metadata.xlsx` beside the class folders (in the zip too): each
source URL is a group, so a source never spans two splits. A flag rather than `--groups FILE.xlsx`: the
database ships one sheet per class, inside the zip, so SRC already says where they are, and nothing needs
extracting or listing. Each sample's `.json` then records its `group` (and, from sheets, its `source`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from shard_tools import __version__, images
from shard_tools.cli import non_negative_int, positive_int, run_main
from shard_tools.errors import CxrdistError, InputError
from shard_tools.groups import (
    SHEET_SUFFIX,
    GroupTable,
    missing_error,
    missing_images,
    read_groups,
    read_sheets,
    unmatched_warning,
)
from shard_tools.images import IMAGE_SUFFIXES
from shard_tools.locks import output_lock
from shard_tools.outdir import staged_out
from shard_tools.pool import WorkerPool, ordered_map, process_pool
from shard_tools.schema import (
    CLASSES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MASK_EXT,
    SHARD_FILE,
    SPLITS,
    UNGROUPED_CHOICES,
    normalize_class_name,
    shard_name,
)
from shard_tools.shards import sample_tar_bytes, shard_counts, tar_bytes, write_shard
from shard_tools.sources import (
    Source,
    Tree,
    close_archives,
    find_class_dirs,
    find_masks,
    find_sheets,
    list_sources,
    open_tree,
    read_file,
    read_image_bytes,
)
from shard_tools.splits import plan_splits, share_table
from shard_tools.verify import summary_table

DEFAULT_MAX_SHARD_BYTES = 256 * 2**20
# A lung mask's aspect ratio may differ from its image's by this share (rounding of a resized copy).
MASK_ASPECT_TOLERANCE = 0.02

_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False)


class PackError(InputError):
    """The input or the options cannot give a valid dataset; the message says what to change (exit 2)."""


class TooManySkipped(CxrdistError):
    """More of SRC's files could not be used than --max-skipped allows: the run failed (exit 1, as for
    every unreadable image in the README's table), naming the first few."""


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
class Inputs:
    """What pack found in SRC before decoding anything."""

    tree: Tree
    sources: list[Source]  # sorted by (label, path), unique keys
    skipped: list[dict[str, str]]  # non-image files in the class folders
    groups: GroupTable | None  # --groups, matched to `sources`
    masks: bool = False  # every source has a lung mask (`Source.mask_rel`), and they are to be stored


@dataclass(frozen=True)
class PackOptions:
    """Everything that decides the output's bytes, besides SRC (see `pack` for each field)."""

    size: int = 128
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    shard_size: int = 1000
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    min_shards: int = 16
    classes: tuple[str, ...] = CLASSES
    max_skipped: float = 0.01
    duplicates: str = "group"
    groups: Path | None = None
    ungrouped: str | None = None
    masks: bool = True  # store the input's lung masks, when it has them
    groups_from_sheets: bool = False  # groups: the source URLs of SRC's <Class>.metadata.xlsx

    def check(self) -> None:
        """Raise `PackError` naming the option and the allowed values."""
        if self.seed < 0:
            raise PackError(f"--seed must be a whole number >= 0, got {self.seed}")
        if not 0 <= self.size <= 8192:
            raise PackError(f"--size must be 0 (keep the original size) or 1..8192 pixels, got {self.size}")
        if len(self.split) != 3 or any(not math.isfinite(f) or f < 0 for f in self.split):
            raise PackError(
                f"--split needs three non-negative fractions train,val,test, got {list(self.split)}"
            )
        if abs(sum(self.split) - 1.0) > 1e-6 or self.split[0] <= 0:
            raise PackError(f"--split fractions must sum to 1 with train > 0, got {list(self.split)}")
        if self.shard_size < 1:
            raise PackError(f"--shard-size must be >= 1 sample, got {self.shard_size}")
        if self.max_shard_bytes < 2**16:
            raise PackError(f"the shard byte cap must be at least 64 KiB, got {self.max_shard_bytes} bytes")
        if self.min_shards < 1:
            raise PackError(f"--min-shards must be >= 1, got {self.min_shards}")
        if not 0.0 <= self.max_skipped <= 1.0:
            raise PackError(f"--max-skipped is a fraction in [0, 1], got {self.max_skipped}")
        if self.duplicates not in ("group", "drop"):
            raise PackError(f"--duplicates must be 'group' or 'drop', got {self.duplicates!r}")
        if self.groups is not None and self.groups_from_sheets:
            raise PackError("give --groups FILE.csv or --groups-from-sheets, not both")
        if self.ungrouped is not None and self.groups is None and not self.groups_from_sheets:
            raise PackError("--ungrouped only applies with --groups FILE.csv or --groups-from-sheets")
        if self.ungrouped is not None and self.ungrouped not in UNGROUPED_CHOICES:
            raise PackError(
                f"--ungrouped must be one of {', '.join(UNGROUPED_CHOICES)}, got {self.ungrouped!r}"
            )


# Every default of pack, written once: `pack`'s keywords and the command line's defaults read it.
DEFAULTS = PackOptions()


# ------------------------------------------------------------------------------------------------ input


def _parse_classes(classes: Sequence[str] | None) -> tuple[str, ...]:
    if classes is None:
        return CLASSES
    canonical = {normalize_class_name(c): c for c in CLASSES}
    # The database's own classes keep their canonical spelling (`covid` -> `COVID`), so downstream
    # code that names them finds them.
    names = tuple(canonical.get(normalize_class_name(c), c.strip()) for c in classes if c.strip())
    if not names:
        raise PackError("--classes is empty; give class names separated by commas, e.g. COVID,Normal")
    norm = [normalize_class_name(c) for c in names]
    dup = [c for c, n in Counter(norm).items() if n > 1]
    if dup:
        raise PackError(f"--classes names a class twice (case, space and underscore are ignored): {dup}")
    return names


def _read_inputs(src: Path, opts: PackOptions) -> Inputs:
    """List SRC's images and match the --groups CSV to them; warn about what will be missing."""
    tree = open_tree(src, opts.classes)
    where = tree.describe()
    if tree.ignored:
        shown = ", ".join(repr(n) for n in tree.ignored[:5])
        _warn(f"ignored {len(tree.ignored)} member(s) of {src} with unsafe names (absolute or '..'): {shown}")
    class_dirs, unknown = find_class_dirs(tree, opts.classes)
    for name in unknown:
        _warn(f"folder {name!r} in {where} matches no class {list(opts.classes)}; ignored")
    for c in opts.classes:
        if c not in class_dirs:
            _warn(f"no folder for class {c!r} in {where}; it will have 0 images")
    if len(class_dirs) < len(opts.classes):
        found = ",".join(shlex.quote(c) for c in opts.classes if c in class_dirs)
        _warn(
            "a model trained on these shards still has an output for every class; to pack only the "
            f"classes found, pass --classes {found}"
        )
    sources, skipped = list_sources(tree, class_dirs, opts.classes)
    skipped += _unlisted_images(tree)
    per_class = Counter(s.class_name for s in sources)
    for c, d in class_dirs.items():
        if per_class[c] == 0:
            _warn(f"class {c!r} (folder {d}) has no {'/'.join(IMAGE_SUFFIXES)} images; it will have 0")
    if not sources:
        raise PackError(f"no images in {where}: its class folders hold no {'/'.join(IMAGE_SUFFIXES)} files")
    table = None
    if opts.groups is not None or opts.groups_from_sheets:
        rels = [s.rel for s in sources]
        if opts.groups is not None:
            table = read_groups(opts.groups, rels)
        else:
            table = _read_sheets(tree, sources, opts.classes)
        if table.unmatched_rows:
            _warn(unmatched_warning(table))
        missing = missing_images(table, rels)
        if missing and (opts.ungrouped or "error") == "error":
            raise missing_error(table, missing, len(rels))
    masks = False
    if opts.masks:
        sources, masks = _attach_masks(tree, class_dirs, sources)
    return Inputs(tree, sources, skipped, table, masks)


def _read_sheets(tree: Tree, sources: list[Source], classes: Sequence[str]) -> GroupTable:
    """--groups-from-sheets: the groups (source URLs) from each class's metadata sheet in SRC."""
    rels_by_class: dict[str, list[str]] = defaultdict(list)
    for s in sources:
        rels_by_class[s.class_name].append(s.rel)
    found = find_sheets(tree, classes, SHEET_SUFFIX)
    lacking = [c for c in classes if rels_by_class.get(c) and c not in found]
    if lacking:
        raise PackError(
            f"--groups-from-sheets: no metadata sheet for class {lacking[0]!r} in {tree.describe()} "
            f"(expected {lacking[0] + SHEET_SUFFIX!r} beside the class folders, as the database ships them)"
        )
    sheets = [(tree.describe(rel), c, read_file(tree, rel)) for c, rel in found.items()]
    return read_sheets(sheets, rels_by_class, tree.describe())


def _attach_masks(tree: Tree, class_dirs: dict[str, str], sources: list[Source]) -> tuple[list[Source], bool]:
    """`sources` with their lung masks, and whether to store masks: all images have one. Warns when only
    some have one; raises `PackError` for a mask without its image (see the module docstring)."""
    with_masks, orphans = find_masks(tree, class_dirs, sources)
    lacking = [s.rel for s in with_masks if not s.mask_rel]
    if orphans:
        shown = ", ".join(orphans[:5]) + (f", ... ({len(orphans) - 5} more)" if len(orphans) > 5 else "")
        raise PackError(
            f"{len(orphans)} lung mask(s) in {tree.describe()} have no image of the same name: {shown}; "
            "remove them, restore their images, or pass --no-masks"
        )
    if len(lacking) == len(sources):
        return sources, False
    if lacking:
        shown = ", ".join(lacking[:5]) + (f", ... ({len(lacking) - 5} more)" if len(lacking) > 5 else "")
        _warn(
            f"lung masks not stored: {len(lacking)} of {len(sources)} images in {tree.describe()} have no "
            f"mask in their class's masks/ folder ({shown}), and masks are stored only when every image "
            "has one; add the missing masks, or pass --no-masks to leave masks out without this warning"
        )
        return sources, False
    return with_masks, True


def _unlisted_images(tree: Tree) -> list[dict[str, str]]:
    """Warn about the members a damaged zip's central directory omits; its images, as skipped records."""
    if not tree.unlisted:
        return []
    more = f" (and {len(tree.unlisted) - 5} more)" if len(tree.unlisted) > 5 else ""
    _warn(
        f"{tree.src} stores {len(tree.unlisted)} member(s) that its central directory does not list (a "
        f"damaged zip: download it again); they cannot be read: {', '.join(tree.unlisted[:5])}{more}"
    )
    reason = "not listed in the zip's central directory (a damaged zip)"
    return [
        {"path": name.removeprefix(tree.root), "reason": reason}
        for name in tree.unlisted
        if name.lower().endswith(IMAGE_SUFFIXES)
    ]


def _check_overlap(src: Path, out: Path, src_is_zip: bool) -> None:
    src_abs, out_abs = src.resolve(), out.resolve()
    if src_abs.is_relative_to(out_abs):
        # --force would delete SRC (a zip or folder inside OUT) along with OUT.
        raise PackError(f"SRC {src} is inside OUT {out}; write the shards somewhere else")
    if not src_is_zip and out_abs.is_relative_to(src_abs):
        # The next pack of SRC would see OUT as a class folder (or an unknown folder).
        raise PackError(f"OUT {out} is inside SRC {src}; write the shards somewhere else")


def _not_shards(out: Path) -> list[str]:
    """What in an existing OUT pack did not write: anything but a cxrdist manifest and shard files."""
    manifest = out / MANIFEST_NAME
    if not _is_shard_manifest(manifest):
        if manifest.exists():
            return [f"{manifest} (not a shard manifest)"]
        # Name what the user would miss first: files that are not even named like shards.
        entries = sorted(out.iterdir(), key=lambda p: (bool(SHARD_FILE.match(p.name)), p.name))
        return [f"{entries[0]} (no {MANIFEST_NAME} beside it)"] + [str(p) for p in entries[1:]]
    return [
        str(p) + ("/" if p.is_dir() else "")
        for p in sorted(out.iterdir())
        if p.name != MANIFEST_NAME and not (SHARD_FILE.match(p.name) and (p.is_symlink() or p.is_file()))
    ]


def _is_shard_manifest(path: Path) -> bool:
    """A JSON object with a whole-number `format_version` and `splits`: what pack writes, of any version."""
    try:
        if not path.is_file() or path.stat().st_size > 256 * 2**20:
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get("format_version"), int) and "splits" in data


# ----------------------------------------------------------------------------------------------- decode


def _decode(job: tuple[str, str, str, int, str, str]) -> tuple[str, Any]:
    """Worker: ("ok", (png, pixel_sha256, orig_size, shape, mask_png)) or ("skip", reason) or
    ("bad mask", message).

    `job` is (archive, name, rel, size, mask_name, mask_rel): a zip member is read by name from the archive
    (opened once per worker), a file by its path; mask_name "" means no mask (mask_png is then b"")."""
    archive, name, rel, size, mask_name, mask_rel = job
    try:
        gray = images.decode_gray(read_image_bytes(archive, name) if archive else name, name=rel)
    except OSError as e:  # a zip member that cannot be read
        return "skip", str(e)
    except images.ImageError as e:
        return "skip", e.reason
    orig_size = (int(gray.shape[1]), int(gray.shape[0]))
    gray = images.resize_gray(gray, size)
    mask_png = b""
    if mask_name:
        try:
            mask = images.decode_gray(
                read_image_bytes(archive, mask_name) if archive else mask_name, name=mask_rel
            )
        except OSError as e:
            return "skip", f"its lung mask {mask_rel}: {e}"
        except images.ImageError as e:
            return "skip", f"its lung mask {mask_rel}: {e.reason}"
        (mh, mw), (h, w) = mask.shape, gray.shape
        if abs((mw / mh) / (orig_size[0] / orig_size[1]) - 1) > MASK_ASPECT_TOLERANCE:
            return "bad mask", (
                f"lung mask {mask_rel} is {mw}x{mh}, but its image {rel} is {orig_size[0]}x{orig_size[1]}: "
                "another shape, so not this image's mask; replace it, or pass --no-masks"
            )
        # NEAREST keeps the mask's edges where they are (no grey rim to threshold); binarised at 128.
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
        mask_png = images.encode_png(np.where(mask >= 128, 255, 0).astype(np.uint8))
    return "ok", (images.encode_png(gray), images.pixel_sha256(gray), orig_size, gray.shape, mask_png)


# ------------------------------------------------------------------------------------------------ write


def _sample_record(src: Source, packed: Packed, table: GroupTable | None = None) -> tuple[bytes, bytes]:
    """The sample's `.cls` and `.json` members (see `shard_tools.schema`); `table`: the groups, if any."""
    record = {
        "class": src.class_name,
        "orig_size": list(packed.orig_size),
        "path": src.rel,
        "pixel_sha256": packed.pixel_sha256,
    }
    group = None if table is None else table.groups.get(src.rel)
    if group is not None:  # an image the groups do not name (--ungrouped own-group) records none
        record["group"] = group
        if table.sheets:
            record["source"] = group  # a sheet's group is the source URL
    meta = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return str(src.label).encode("ascii"), meta


def _write_shard_job(job: tuple[str, str, list[tuple[str, bytes, bytes, int, int, int]]]) -> tuple[int, str]:
    """Worker: write one shard from (key, cls, json, PNG offset, PNG length, mask PNG length) records and
    the spill file (the mask's PNG, if any, right after the image's)."""
    path, spill_path, samples = job
    members = []
    with open(spill_path, "rb") as spill:
        for key, cls, meta, offset, length, mask_length in samples:
            spill.seek(offset)
            png = spill.read(length)
            mask = [(f"{key}.{MASK_EXT}", spill.read(mask_length))] if mask_length else []
            members += [(f"{key}.cls", cls), (f"{key}.json", meta), *mask, (f"{key}.png", png)]
    return write_shard(Path(path), members)


# ------------------------------------------------------------------------------------------------- pack


def pack(
    src: Path | str,
    out: Path | str,
    *,
    size: int = DEFAULTS.size,
    split: Sequence[float] = DEFAULTS.split,
    seed: int = DEFAULTS.seed,
    shard_size: int = DEFAULTS.shard_size,
    max_shard_bytes: int = DEFAULTS.max_shard_bytes,
    min_shards: int = DEFAULTS.min_shards,
    workers: int | None = None,
    classes: Sequence[str] | None = None,
    max_skipped: float = DEFAULTS.max_skipped,
    duplicates: str = DEFAULTS.duplicates,
    groups: Path | str | None = None,
    ungrouped: str | None = None,
    groups_from_sheets: bool = DEFAULTS.groups_from_sheets,
    masks: bool = DEFAULTS.masks,
    force: bool = False,
    progress: bool = True,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Pack the radiographs in SRC (a folder or a zip) into shards and `manifest.json` in OUT; return the
    manifest.

    Args:
        size: stored side length in pixels; 0 keeps the original size (all images must share one).
        split: (train, val, test) fractions, per class (`splits.split_sizes`).
        seed: decides the split and the order of samples in shards.
        shard_size, max_shard_bytes: at most this many samples and bytes per shard.
        min_shards: train gets at least this many shards (ranks x loader workers read disjoint shards).
        workers: decoding processes (default: all cores); does not change the output.
        classes: class names in label order (default `schema.CLASSES`).
        max_skipped: fail when a larger share of the files cannot be used.
        duplicates: "group" keeps identical images in one split; "drop" keeps one of each set.
        groups: a CSV of `file,group` rows; every group stays whole inside one split (`shard_tools.groups`).
        ungrouped: with `groups`, what an image the CSV does not name is: "error" (the default) or
            "own-group" (a group of its own); the same for `groups_from_sheets`.
        groups_from_sheets: every source URL of SRC's metadata sheets is a group (`groups.read_sheets`).
        masks: store each image's lung mask when SRC has them (`<Class>/masks/`; see the module docstring).
        force: replace a non-empty OUT, if it holds only shards and their manifest.
        progress: show progress bars.
        command: recorded in the manifest; by default the equivalent `python -m shard_tools.pack` line.

    Raises `PackError` (an `InputError`) for bad input or options, `outdir.WriteError` when writing fails
    (disk full). Nothing half-written is left on any failure, Ctrl-C or SIGTERM: the output is built in a
    staging folder beside OUT (removed on failure) and swapped in at the end.
    """
    src, out = Path(src), Path(out)
    opts = PackOptions(
        size=size,
        split=tuple(float(f) for f in split),
        seed=seed,
        shard_size=shard_size,
        max_shard_bytes=max_shard_bytes,
        min_shards=min_shards,
        classes=_parse_classes(classes),
        max_skipped=max_skipped,
        duplicates=duplicates,
        groups=None if groups is None else Path(groups),
        ungrouped=ungrouped,
        masks=masks,
        groups_from_sheets=groups_from_sheets,
    )
    opts.check()
    if workers is not None and workers < 1:
        raise PackError(f"--workers must be >= 1, got {workers}")
    try:
        inputs = _read_inputs(src, opts)
        _check_overlap(src, out, inputs.tree.is_zip)
        if command is None:
            command = _equivalent_command(src, out, opts, explicit_classes=classes is not None, force=force)
        with staged_out(out, force=force, foreign=_not_shards, owned_what="shards and their manifest") as tmp:
            manifest = _pack_into(tmp, inputs, opts, workers, progress)
            manifest["command"] = list(command)
            text = json.dumps(manifest, sort_keys=True, indent=2) + "\n"
            (tmp / MANIFEST_NAME).write_text(text, encoding="utf-8")
    finally:
        close_archives()
    return manifest


def _pack_into(
    tmp: Path, inputs: Inputs, opts: PackOptions, workers: int | None, progress: bool
) -> dict[str, Any]:
    """Decode, split and write the shards into `tmp`; return the manifest (all but `command`)."""
    sources = inputs.sources
    n_files = len(sources) + len(inputs.skipped)
    # Decoded PNGs wait in a spill file until the split is known, so memory stays flat on the full
    # database. One pool serves both phases; its workers open the spill file by name.
    spill = tmp / ".spill"
    workers = min(workers or os.cpu_count() or 1, len(sources))
    with process_pool(workers) as pool, _progress(progress) as bar:
        kept, packed, failed = _decode_to_spill(sources, opts.size, spill, pool, bar)
        skipped = sorted(inputs.skipped + failed, key=lambda d: d["path"])
        _check_skipped(skipped, n_files, opts.max_skipped)
        if not kept:
            raise PackError(f"no image in {inputs.tree.describe()} could be read ({len(skipped)} skipped)")
        image_size = _common_size(kept, packed, opts.size)
        labels, rels = [s.label for s in kept], [s.rel for s in kept]
        plan = plan_splits(labels, rels, [p.pixel_sha256 for p in packed], opts, inputs.groups)
        splits = _write_splits(tmp, kept, packed, plan.split_of, spill, opts, pool, bar, inputs.groups)
    spill.unlink()
    _report_duplicates(plan.duplicates, opts.duplicates)
    manifest = {
        "format_version": FORMAT_VERSION,
        "classes": list(opts.classes),
        "image_size": image_size,
        "seed": opts.seed,
        "split_fractions": dict(zip(SPLITS, opts.split)),
        "source": str(inputs.tree.src.resolve()),
        "tool_version": __version__,
        "splits": splits,
        "skipped": skipped,
        "duplicates": plan.duplicates,
        "masks": inputs.masks,
    }
    if inputs.tree.is_zip:
        manifest["source_root"] = inputs.tree.root  # the member folder holding the class folders
    if inputs.groups is not None:
        manifest["groups"] = plan.groups_summary
        for si, split_name in enumerate(SPLITS):
            splits[split_name]["groups"] = plan.group_names[si]
    return manifest


def _decode_to_spill(
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
        for s, (status, result) in zip(sources, ordered_map(pool, _decode, jobs)):
            bar.advance(task)
            if status == "bad mask":
                raise PackError(result)
            if status == "skip":
                failed.append({"path": s.rel, "reason": result})
                continue
            png, sha, orig_size, shape, mask_png = result
            packed.append(Packed(f.tell(), len(png), sha, orig_size, tuple(shape), len(mask_png)))
            f.write(png + mask_png)
            kept.append(s)
    return kept, packed, failed


def _write_splits(
    tmp: Path,
    kept: list[Source],
    packed: list[Packed],
    split_of: dict[int, int],
    spill: Path,
    opts: PackOptions,
    pool: WorkerPool | None,
    bar: Progress,
    table: GroupTable | None = None,
) -> dict[str, Any]:
    """Write every split's shards into `tmp`; return the manifest's `splits`. `table`: the groups, recorded
    in each sample's `.json`."""
    jobs, entries = [], []
    splits: dict[str, Any] = {}
    for si, split_name in enumerate(SPLITS):
        idx = sorted((i for i, s in split_of.items() if s == si), key=lambda i: kept[i].key)
        # Shuffled across classes so every shard mixes them; a fixed stream per split.
        idx = [idx[j] for j in np.random.default_rng([opts.seed, si, 7]).permutation(len(idx))]
        records = [
            (
                kept[i].key,
                *_sample_record(kept[i], packed[i], table),
                packed[i].offset,
                packed[i].length,
                packed[i].mask_length,
            )
            for i in idx
        ]
        sizes = [sample_tar_bytes(cls, meta, n, n_mask) for _, cls, meta, _, n, n_mask in records]
        _check_sample_sizes(idx, sizes, kept, opts.max_shard_bytes)
        min_shards = opts.min_shards if split_name == "train" else 1
        counts = shard_counts(sizes, opts.shard_size, opts.max_shard_bytes, min_shards)
        if not idx and opts.split[si] > 0:
            _warn(f"{split_name} is empty: too few images per class for a {opts.split[si]:g} share")
        elif not idx and split_name != "train":
            _warn(
                f"{split_name} is empty (--split gives it 0): training needs val images to choose the best "
                "epoch and test images to report on, and refuses these shards"
            )
        elif idx and len(counts) < min_shards:
            _warn(
                f"{split_name} has only {len(idx)} images, so {len(counts)} shards, fewer than "
                f"--min-shards {min_shards}: fewer ranks x loader workers can read it in parallel"
            )
        class_counts = Counter(kept[i].class_name for i in idx)
        splits[split_name] = {
            "count": len(idx),
            "class_counts": {c: class_counts.get(c, 0) for c in opts.classes},
            "shards": [],
        }
        start = 0
        for k, n in enumerate(counts):
            name = shard_name(split_name, k)
            jobs.append((str(tmp / name), str(spill), records[start : start + n]))
            entries.append((splits[split_name]["shards"], name, n))
            start += n
    task = bar.add_task("write", total=len(split_of))
    for (shards, name, n), (nbytes, sha) in zip(entries, ordered_map(pool, _write_shard_job, jobs)):
        shards.append({"file": name, "count": n, "bytes": nbytes, "sha256": sha})
        bar.advance(task, n)
    return splits


def _equivalent_command(
    src: Path, out: Path, opts: PackOptions, *, explicit_classes: bool, force: bool
) -> list[str]:
    """The `python -m shard_tools.pack` line that reproduces this call (recorded in the manifest)."""
    cmd = ["python", "-m", "shard_tools.pack", str(src), str(out), "--size", str(opts.size)]
    cmd += ["--split", ",".join(map(str, opts.split)), "--seed", str(opts.seed)]
    cmd += ["--shard-size", str(opts.shard_size), "--max-shard-mb", f"{opts.max_shard_bytes / 2**20:g}"]
    cmd += ["--min-shards", str(opts.min_shards), "--max-skipped", str(opts.max_skipped)]
    cmd += ["--duplicates", opts.duplicates]
    if explicit_classes:
        cmd += ["--classes", ",".join(opts.classes)]
    if opts.groups is not None:
        cmd += ["--groups", str(opts.groups), "--ungrouped", opts.ungrouped or "error"]
    if opts.groups_from_sheets:
        cmd += ["--groups-from-sheets", "--ungrouped", opts.ungrouped or "error"]
    if not opts.masks:
        cmd += ["--no-masks"]
    return cmd + (["--force"] if force else [])


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<7}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_err,
        disable=not enabled,
    )


def _warn(msg: str) -> None:
    _err.print(f"[yellow]warning:[/yellow] {escape(msg)}", soft_wrap=True)


def _check_skipped(skipped: list[dict[str, str]], n_candidates: int, max_skipped: float) -> None:
    if not skipped:
        return
    share = len(skipped) / n_candidates
    if share > max_skipped:
        # One line: the first three with their reasons, the names of the next seven, then a count.
        shown = "; ".join(f"{d['path']}: {' '.join(d['reason'].split())}" for d in skipped[:3])
        if len(skipped) > 3:
            shown += "; also " + ", ".join(d["path"] for d in skipped[3:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        raise TooManySkipped(
            f"{len(skipped)} of {n_candidates} files ({share:.1%}) could not be used, more than "
            f"--max-skipped {max_skipped:.1%}: {shown}{more}. Fix or remove them, or raise --max-skipped"
        )
    shown = "\n".join(f"  {d['path']}: {d['reason']}" for d in skipped[:10])
    more = f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    _warn(f"skipped {len(skipped)} of {n_candidates} files (listed in the manifest):\n{shown}{more}")


def _common_size(kept: list[Source], packed: list[Packed], size: int) -> int:
    """The stored side length; with --size 0 every image must already share one square size."""
    if size:
        return size
    shapes: dict[tuple[int, int], str] = {}
    for s, p in zip(kept, packed):
        shapes.setdefault(p.shape, s.rel)
    if len(shapes) > 1 or next(iter(shapes))[0] != next(iter(shapes))[1]:
        seen = ", ".join(f"{rel} is {w}x{h}" for (h, w), rel in list(shapes.items())[:3])
        raise PackError(
            f"--size 0 keeps original sizes, which must be one square size, but {seen}; pass --size"
        )
    return next(iter(shapes))[0]


def _check_sample_sizes(idx: list[int], sizes: list[int], kept: list[Source], max_shard_bytes: int) -> None:
    for i, n in zip(idx, sizes):
        if tar_bytes([n]) > max_shard_bytes:
            raise PackError(
                f"{kept[i].rel} alone takes {n} bytes in a shard, more than the cap of {max_shard_bytes}; "
                "raise --max-shard-mb or lower --size"
            )


def _report_duplicates(records: list[dict[str, Any]], mode: str) -> None:
    if not records:
        return
    n_images = sum(len(r["paths"]) for r in records)
    what = "all but one of each dropped" if mode == "drop" else "each group kept in one split"
    lines = [f"  [{r['split']}] " + ", ".join(r["paths"]) for r in records[:10]]
    if len(records) > 10:
        lines.append(f"  ... and {len(records) - 10} more groups (all in the manifest)")
    _warn(f"{len(records)} group(s) of identical images ({n_images} images); {what}:\n" + "\n".join(lines))
    conflicts = [r for r in records if len({p.split("/", 1)[0] for p in r["paths"]}) > 1]
    if conflicts:
        _warn(
            f"{len(conflicts)} duplicate groups span more than one class folder (conflicting labels), e.g. "
            + ", ".join(conflicts[0]["paths"])
        )


# -------------------------------------------------------------------------------------------------- CLI


def _parse_split(text: str) -> tuple[float, float, float]:
    """`0.7,0.15,0.15`, `70,15,15` or `70/15/15` (percentages when they sum to 100)."""
    parts = [p for p in text.replace("/", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.7,0.15,0.15, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers train,val,test, got {text!r}")
    if abs(sum(values) - 100) < 1e-6:
        values = [v / 100 for v in values]
    return values[0], values[1], values[2]


def _positive_mb(text: str) -> float:
    """argparse type: a finite number of MiB > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MiB, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m shard_tools.pack",
        description="Pack chest radiograph folders, or the database's zip, into WebDataset shards "
        "(see shard_tools/schema.py).",
    )
    ap.add_argument(
        "src",
        type=Path,
        help="database folder (SRC/<Class>/*.png or SRC/<Class>/images/*.png) or the download's .zip",
    )
    ap.add_argument("out", type=Path, help="output folder for the shards and manifest.json")
    ap.add_argument(
        "--size",
        type=non_negative_int,
        default=DEFAULTS.size,
        help=f"image side in pixels (default {DEFAULTS.size}; 0 keeps the original)",
    )
    ap.add_argument(
        "--split",
        type=_parse_split,
        default=DEFAULTS.split,
        help=f"train,val,test (default {','.join(f'{f:g}' for f in DEFAULTS.split)})",
    )
    ap.add_argument(
        "--seed",
        type=non_negative_int,
        default=DEFAULTS.seed,
        help=f"split and shard-order seed (default {DEFAULTS.seed})",
    )
    ap.add_argument(
        "--shard-size",
        type=positive_int,
        default=DEFAULTS.shard_size,
        help=f"max samples per shard (default {DEFAULTS.shard_size})",
    )
    ap.add_argument(
        "--max-shard-mb",
        type=_positive_mb,
        default=DEFAULTS.max_shard_bytes / 2**20,
        help=f"max MiB per shard (default {DEFAULTS.max_shard_bytes / 2**20:g})",
    )
    ap.add_argument(
        "--min-shards",
        type=positive_int,
        default=DEFAULTS.min_shards,
        help=f"min train shards, >= ranks x workers (default {DEFAULTS.min_shards})",
    )
    ap.add_argument(
        "--workers", type=positive_int, default=None, help="decode processes (default: all cores)"
    )
    ap.add_argument(
        "--classes",
        default=None,
        help="comma-separated class names in label order (default: the database's four)",
    )
    ap.add_argument(
        "--max-skipped",
        type=float,
        default=DEFAULTS.max_skipped,
        help=f"fail if a larger share of files is unreadable (default {DEFAULTS.max_skipped})",
    )
    ap.add_argument(
        "--duplicates",
        choices=("group", "drop"),
        default=DEFAULTS.duplicates,
        help=f"identical images: keep each set in one split, or keep one (default {DEFAULTS.duplicates})",
    )
    ap.add_argument(
        "--groups",
        type=Path,
        default=None,
        metavar="FILE.csv",
        help="CSV with columns file,group (patient, study, hospital): each group stays in one split",
    )
    ap.add_argument(
        "--groups-from-sheets",
        action="store_true",
        help="each source URL in SRC's <Class>.metadata.xlsx is a group (the database's sheets)",
    )
    ap.add_argument(
        "--ungrouped",
        choices=UNGROUPED_CHOICES,
        default=None,
        help="images the groups CSV (or sheets) do not name: an error (default) or each its own group",
    )
    ap.add_argument(
        "--no-masks",
        action="store_true",
        help="leave out the lung masks in <Class>/masks/ (stored beside each image by default)",
    )
    ap.add_argument(
        "--force", action="store_true", help="replace OUT if it is a folder of shards (nothing else)"
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    with output_lock(args.out, f"OUT {args.out}"):  # one pack per OUT; beside it, as OUT is swapped whole
        return pack_main(args, argv)


def pack_main(args: argparse.Namespace, argv: list[str]) -> int:
    manifest = pack(
        args.src,
        args.out,
        size=args.size,
        split=args.split,
        seed=args.seed,
        shard_size=args.shard_size,
        max_shard_bytes=int(args.max_shard_mb * 2**20),
        min_shards=args.min_shards,
        workers=args.workers,
        classes=args.classes.split(",") if args.classes is not None else None,
        max_skipped=args.max_skipped,
        duplicates=args.duplicates,
        groups=args.groups,
        ungrouped=args.ungrouped,
        groups_from_sheets=args.groups_from_sheets,
        masks=not args.no_masks,
        force=args.force,
        progress=not args.no_progress,
        command=["python", "-m", "shard_tools.pack", *argv],
    )
    _out.print(summary_table(manifest, f"{args.out}  ({manifest['image_size']} px)"))
    if "groups" in manifest:
        _out.print(share_table(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
