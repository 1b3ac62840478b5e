"""Pack chest radiographs (a database folder or the download's zip) into WebDataset shards with a manifest.

    python -m shard_tools.pack SRC OUT [--size 128] [--split 0.7,0.15,0.15] [--seed 0] [--shard-size 1000]
        [--max-shard-mb 256] [--min-shards 16] [--workers N] [--classes A,B,...] [--max-skipped 0.01]
        [--duplicates group|drop] [--groups FILE.csv | --groups-from-sheets [--ungrouped error|own-group]]
        [--no-masks] [--force] [--no-progress]

The pipeline, stage by stage: `shard_tools.inputs` lists SRC and matches groups and masks to its images,
`shard_tools.decode` decodes them into a spill file on worker processes, `splits.plan_splits` assigns
splits, `shard_tools.write` copies the images into shards; this module holds the options (`PackOptions`),
runs the stages (`pack`) and is the command line.

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
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from shard_tools import __version__
from shard_tools.cli import non_negative_int, positive_int, print_problem, run_main
from shard_tools.decode import Packed, decode_to_spill
from shard_tools.errors import CxrdistError
from shard_tools.errors import PackError as PackError  # re-exported: tests and callers catch pack.PackError
from shard_tools.inputs import Inputs, check_overlap, not_shards, parse_classes, read_inputs
from shard_tools.locks import output_lock
from shard_tools.outdir import staged_out
from shard_tools.pool import process_pool
from shard_tools.schema import CLASSES, FORMAT_VERSION, MANIFEST_NAME, SPLITS, UNGROUPED_CHOICES
from shard_tools.shards import shard_counts as shard_counts  # re-exported for callers of pack's old API
from shard_tools.shards import write_shard as write_shard
from shard_tools.sources import Source, close_archives
from shard_tools.splits import plan_splits, share_table
from shard_tools.verify import summary_table
from shard_tools.write import write_splits

DEFAULT_MAX_SHARD_BYTES = 256 * 2**20

_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False)


class TooManySkipped(CxrdistError):
    """More of SRC's files could not be used than --max-skipped allows: the run failed (exit 1, as for
    every unreadable image in the README's table), naming the first few."""


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
        classes=parse_classes(classes),
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
        inputs = read_inputs(src, opts)
        check_overlap(src, out, inputs.tree.is_zip)
        if command is None:
            command = _equivalent_command(src, out, opts, explicit_classes=classes is not None, force=force)
        with staged_out(out, force=force, foreign=not_shards, owned_what="shards and their manifest") as tmp:
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
        kept, packed, failed = decode_to_spill(sources, opts.size, spill, pool, bar)
        skipped = sorted(inputs.skipped + failed, key=lambda d: d["path"])
        _check_skipped(skipped, n_files, opts.max_skipped)
        if not kept:
            raise PackError(f"no image in {inputs.tree.describe()} could be read ({len(skipped)} skipped)")
        image_size = _common_size(kept, packed, opts.size)
        labels, rels = [s.label for s in kept], [s.rel for s in kept]
        plan = plan_splits(labels, rels, [p.pixel_sha256 for p in packed], opts, inputs.groups)
        splits = write_splits(tmp, kept, packed, plan.split_of, spill, opts, pool, bar, inputs.groups)
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
    print_problem(msg, "warning", "yellow", console=_err)


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

    # Numeric options take their defaults from DEFAULTS, and say them in their help, in one place.
    def tuned(flag: str, parse: Callable[[str], Any], default: Any, what: str, shown: Any = None) -> None:
        shown = default if shown is None else shown
        ap.add_argument(flag, type=parse, default=default, help=f"{what} (default {shown})")

    tuned("--size", non_negative_int, DEFAULTS.size, "image side in pixels; 0 keeps the original")
    split_text = ",".join(f"{f:g}" for f in DEFAULTS.split)
    tuned("--split", _parse_split, DEFAULTS.split, "train,val,test fractions", split_text)
    tuned("--seed", non_negative_int, DEFAULTS.seed, "split and shard-order seed")
    tuned("--shard-size", positive_int, DEFAULTS.shard_size, "max samples per shard")
    shard_mb = DEFAULTS.max_shard_bytes / 2**20
    tuned("--max-shard-mb", _positive_mb, shard_mb, "max MiB per shard", f"{shard_mb:g}")
    tuned("--min-shards", positive_int, DEFAULTS.min_shards, "min train shards, >= ranks x workers")
    ap.add_argument(
        "--workers", type=positive_int, default=None, help="decode processes (default: all cores)"
    )
    ap.add_argument(
        "--classes",
        default=None,
        help="comma-separated class names in label order (default: the database's four)",
    )
    tuned("--max-skipped", float, DEFAULTS.max_skipped, "fail if a larger share of files is unreadable")
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
