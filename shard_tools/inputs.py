"""Pack's input stage: what SRC holds and how it maps to samples, before anything is decoded.

`read_inputs` lists SRC's images (`shard_tools.sources`: a folder or the download's zip), matches the
`--groups` CSV or `--groups-from-sheets` (`shard_tools.groups`) and the lung masks to them, and warns about
what will be missing (a class without a folder, images without a group or a mask, a damaged zip's unlisted
members). `check_overlap` and `not_shards` check SRC and OUT against each other and what is already in OUT.
Bad input raises `PackError` (exit 2); the rules are in `shard_tools.pack`'s docstring.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shard_tools.cli import print_problem
from shard_tools.errors import PackError
from shard_tools.files import read_input_file
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
from shard_tools.schema import CLASSES, MANIFEST_NAME, SHARD_FILE, normalize_class_name
from shard_tools.sources import (
    Source,
    Tree,
    find_class_dirs,
    find_masks,
    find_sheets,
    list_sources,
    open_tree,
    read_file,
)

if TYPE_CHECKING:
    from shard_tools.pack import PackOptions


@dataclass(frozen=True)
class Inputs:
    """What pack found in SRC before decoding anything."""

    tree: Tree
    sources: list[Source]  # sorted by (label, path), unique keys
    skipped: list[dict[str, str]]  # non-image files in the class folders
    groups: GroupTable | None  # --groups, matched to `sources`
    masks: bool = False  # every source has a lung mask (`Source.mask_rel`), and they are to be stored


def parse_classes(classes: Sequence[str] | None) -> tuple[str, ...]:
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


def read_inputs(src: Path, opts: PackOptions) -> Inputs:
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
    some have one; raises `PackError` for a mask without its image (see `shard_tools.pack`'s docstring)."""
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


def check_overlap(src: Path, out: Path, src_is_zip: bool) -> None:
    src_abs, out_abs = src.resolve(), out.resolve()
    if src_abs.is_relative_to(out_abs):
        # --force would delete SRC (a zip or folder inside OUT) along with OUT.
        raise PackError(f"SRC {src} is inside OUT {out}; write the shards somewhere else")
    if not src_is_zip and out_abs.is_relative_to(src_abs):
        # The next pack of SRC would see OUT as a class folder (or an unknown folder).
        raise PackError(f"OUT {out} is inside SRC {src}; write the shards somewhere else")


def not_shards(out: Path) -> list[str]:
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
        data = json.loads(read_input_file(path))  # a regular file within the input limit, else OSError
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get("format_version"), int) and "splits" in data


def _warn(msg: str) -> None:
    print_problem(msg, "warning", "yellow")
