"""Check a packed dataset against its manifest.

    python -m shard_tools.verify OUT [--workers N]

Recomputes each shard's size and sha256, reads every sample, decodes every image and checks it against
the manifest: members `<key>.cls/.json/.png` all present, label id in range and matching the JSON's class,
a `<key>.mask.png` lung mask exactly when the manifest says `"masks": true` (8-bit gray PNG of the image's
size, only 0 and 255),
image 8-bit gray of `image_size` pixels whose pixels hash to the JSON's `pixel_sha256`, keys unique, counts
per shard, split and class as listed. A missing shard, an unlisted file in OUT, a truncated tar and a wrong
hash are all problems. Prints a summary table and exits 0, or lists every problem and exits 1. OUT that
is not a folder, or a manifest that is missing, unreadable or breaks `schema.validate_manifest`, is bad
input: one line and exit 2 (`verify` raises `InputError` / `ManifestError`).

`check_checksums` (size and sha256 only) is what training runs with `data.verify_checksums = true`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shard_tools.cli import positive_int, print_problem, run_main
from shard_tools.errors import InputError
from shard_tools.images import pixel_sha256
from shard_tools.pool import ordered_map, process_pool
from shard_tools.schema import (
    MANIFEST_NAME,
    MASK_EXT,
    SAMPLE_EXTS,
    SPLITS,
    ManifestError,
    has_masks,
    parse_manifest,
)

_MEMBER = re.compile(r"^([^./]+)\.([^/]+)$")  # <key>.<ext>, key without dots (WebDataset's rule)


def read_manifest(out: Path | str) -> dict[str, Any]:
    """Load and validate `OUT/manifest.json` (`schema.validate_manifest`). Raises `ManifestError`.

    The bytes go through `schema.parse_manifest`, as `cxrdist.data.read_manifest`'s do, so both readers
    accept and reject the same files.
    """
    path = Path(out) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(
            f"{path} does not exist: is {out} a folder written by shard_tools.pack?"
        ) from None
    except OSError as e:
        raise ManifestError(f"{path} cannot be read: {e.strerror or e}") from None
    return parse_manifest(raw, str(path))


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_shard_file(path: Path, entry: Mapping[str, Any]) -> list[str]:
    """Problems with one shard file against its manifest entry (`file`, `bytes`, `sha256`); [] if none."""
    if not path.is_file():
        return [f"{entry['file']}: missing (listed in the manifest)"]
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(
            f"{entry['file']}: {size} bytes, manifest says {entry['bytes']} (truncated or replaced?)"
        )
    sha = sha256_file(path)
    if sha != entry["sha256"]:
        problems.append(
            f"{entry['file']}: sha256 {sha[:12]}..., manifest says {entry['sha256'][:12]}... (corrupt)"
        )
    return problems


def check_checksums(out: Path | str, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Size and sha256 of every shard in OUT against the manifest (read from OUT if not given)."""
    out = Path(out)
    manifest = read_manifest(out) if manifest is None else manifest
    problems = []
    for split in SPLITS:
        for entry in manifest["splits"][split]["shards"]:
            problems += check_shard_file(out / entry["file"], entry)
    return problems


@dataclass
class ShardReport:
    """What reading one shard found: its samples' keys and label ids, and any problems."""

    file: str
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _check_sample(
    name: str, key: str, members: dict[str, bytes], classes: Sequence[str], size: int, masks: bool = False
) -> tuple[int | None, list[str]]:
    """Check one sample's members; return its label id (None if unreadable) and its problems. `masks`:
    the manifest says every sample has a lung mask."""
    where = f"{name}: sample {key}"
    if set(members) - {MASK_EXT} != set(SAMPLE_EXTS):
        expected = [*SAMPLE_EXTS, MASK_EXT] if masks else list(SAMPLE_EXTS)
        return None, [f"{where}: members {sorted(members)}, expected {expected}"]
    problems = _check_mask(where, members.get(MASK_EXT), masks, size)
    try:
        label = int(members["cls"].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None, [f"{where}: .cls is {members['cls'][:20]!r}, not a label id"]
    if not 0 <= label < len(classes):
        return None, [f"{where}: label id {label} outside 0..{len(classes) - 1}"]
    try:
        meta = json.loads(members["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        meta = {}
        problems.append(f"{where}: .json unreadable: {e}")
    if meta and meta.get("class") != classes[label]:
        problems.append(
            f"{where}: label id {label} is {classes[label]!r}, but .json says {meta.get('class')!r}"
        )
    try:
        with Image.open(io.BytesIO(members["png"])) as im:
            im.load()
            if im.format != "PNG" or im.mode != "L":
                problems.append(f"{where}: image is {im.format} {im.mode}, expected 8-bit gray PNG (L)")
            if im.size != (size, size):
                problems.append(f"{where}: image is {im.size[0]}x{im.size[1]}, manifest image_size is {size}")
            pixels = np.asarray(im)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        return label, [*problems, f"{where}: image does not decode: {e}"]
    if meta and meta.get("pixel_sha256") != pixel_sha256(pixels):
        problems.append(f"{where}: pixels do not match the .json's pixel_sha256")
    return label, problems


def _check_mask(where: str, data: bytes | None, masks: bool, size: int) -> list[str]:
    """Problems with a sample's lung mask (`schema.MASK_EXT`), present exactly when `masks`."""
    if data is None:
        return [f"{where}: no lung mask (.{MASK_EXT}), but the manifest says masks: true"] if masks else []
    if not masks:
        return [f"{where}: has a lung mask (.{MASK_EXT}), but the manifest does not say masks: true"]
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format != "PNG" or im.mode != "L":
                return [f"{where}: lung mask is {im.format} {im.mode}, expected 8-bit gray PNG (L)"]
            if im.size != (size, size):
                return [f"{where}: lung mask is {im.size[0]}x{im.size[1]}, the image is {size}x{size}"]
            values = np.unique(np.asarray(im))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        return [f"{where}: lung mask does not decode: {e}"]
    if not set(values.tolist()) <= {0, 255}:
        return [f"{where}: lung mask has values other than 0 and 255 ({values[:5].tolist()}...)"]
    return []


def read_shard(path: Path, classes: Sequence[str], image_size: int, masks: bool = False) -> ShardReport:
    """Read and check every sample of one shard (see the module docstring)."""
    report = ShardReport(path.name)
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                match = _MEMBER.match(m.name)
                if not m.isfile() or not match:
                    report.problems.append(f"{path.name}: unexpected member {m.name!r}")
                    continue
                key, ext = match.groups()
                data = tar.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError(f"{m.name} has {len(data)} of {m.size} bytes")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        report.problems.append(f"{path.name}: truncated or corrupt tar: {e}")
    for key, members in samples:
        label, problems = _check_sample(path.name, key, members, classes, image_size, masks)
        report.problems += problems
        report.keys.append(key)
        if label is not None:
            report.labels.append(label)
    return report


def _verify_job(
    job: tuple[str, Mapping[str, Any], Sequence[str], int, bool],
) -> tuple[list[str], ShardReport | None]:
    path, entry, classes, image_size, masks = job
    path = Path(path)
    problems = check_shard_file(path, entry)
    if not path.is_file():
        return problems, None
    return problems, read_shard(path, classes, image_size, masks)


def verify(out: Path | str, *, workers: int | None = None) -> list[str]:
    """Every problem found in the shards of OUT (see the module docstring); an empty list means the
    dataset is sound. Raises `InputError` when OUT is not a folder and `ManifestError` when its manifest
    cannot be read or breaks the format: then there is nothing to check the shards against."""
    out = Path(out)
    if not out.is_dir():
        raise InputError(f"{out} is not a folder; give the folder holding manifest.json and the shards")
    manifest = read_manifest(out)
    classes, image_size = manifest["classes"], manifest["image_size"]
    jobs, split_of = [], []
    for split in SPLITS:
        for entry in manifest["splits"][split]["shards"]:
            jobs.append((str(out / entry["file"]), entry, classes, image_size, has_masks(manifest)))
            split_of.append(split)
    problems = _check_listing(out, manifest)

    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))
    with process_pool(workers) as pool:
        results = list(ordered_map(pool, _verify_job, jobs, chunksize=1))

    seen: dict[str, str] = {}
    split_counts: dict[str, Counter[int]] = {s: Counter() for s in SPLITS}
    for (_path, entry, *_), split, (file_problems, report) in zip(jobs, split_of, results):
        problems += file_problems
        if report is None:
            continue
        problems += report.problems
        if len(report.keys) != entry["count"]:
            problems.append(f"{entry['file']}: {len(report.keys)} samples, manifest says {entry['count']}")
        for key in report.keys:
            if key in seen:
                problems.append(f"{entry['file']}: key {key} also in {seen[key]}")
            seen.setdefault(key, entry["file"])
        split_counts[split].update(report.labels)
    for split in SPLITS:
        problems += _check_split_counts(split, manifest, split_counts[split])
    return problems


def _check_listing(out: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Files in OUT that the manifest does not list (a stale or stray shard would be read by globs)."""
    listed = {MANIFEST_NAME} | {e["file"] for s in SPLITS for e in manifest["splits"][s]["shards"]}
    return [
        f"{p.name}: in OUT but not listed in the manifest"
        for p in sorted(out.iterdir())
        if p.name not in listed
    ]


def _check_split_counts(split: str, manifest: Mapping[str, Any], labels: Counter[int]) -> list[str]:
    entry, classes = manifest["splits"][split], manifest["classes"]
    problems = []
    listed = sum(s["count"] for s in entry["shards"])
    if listed != entry["count"]:
        problems.append(f"{split}: shards list {listed} samples, split count says {entry['count']}")
    if sum(entry["class_counts"].values()) != entry["count"]:
        problems.append(
            f"{split}: class_counts sum to {sum(entry['class_counts'].values())}, count is {entry['count']}"
        )
    for label, c in enumerate(classes):
        want, got = entry["class_counts"].get(c, 0), labels.get(label, 0)
        if want != got:
            problems.append(f"{split}: {got} samples of {c!r} in the shards, manifest says {want}")
    return problems


def summary_table(manifest: Mapping[str, Any], title: str) -> Table:
    table = Table(title=escape(title), title_justify="left")  # paths and class names are not markup
    table.add_column("split")
    for c in manifest["classes"]:
        table.add_column(escape(c), justify="right")
    table.add_column("total", justify="right")
    table.add_column("shards", justify="right")
    table.add_column("MB", justify="right")
    for split in SPLITS:
        s = manifest["splits"][split]
        nbytes = sum(sh["bytes"] for sh in s["shards"])
        counts = [str(s["class_counts"].get(c, 0)) for c in manifest["classes"]]
        table.add_row(split, *counts, str(s["count"]), str(len(s["shards"])), _mb(nbytes))
    return table


def _mb(nbytes: int) -> str:
    """MiB with one decimal, for any whole number of bytes (a float would overflow past 1e308)."""
    tenths = (nbytes * 10 + 2**19) >> 20
    return f"{tenths // 10}.{tenths % 10}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shard_tools.verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder holding manifest.json and the shards")
    ap.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores)")
    args = ap.parse_args(argv)
    console, err = Console(highlight=False), Console(stderr=True, highlight=False)
    problems = verify(args.out, workers=args.workers)
    if problems:
        for p in problems:
            print_problem(p, "problem", console=err)
        err.print(f"[bold red]{escape(str(args.out))}: {len(problems)} problem(s)[/bold red]")
        return 1
    manifest = read_manifest(args.out)
    console.print(
        summary_table(
            manifest,
            f"{args.out}: OK ({manifest['image_size']} px, every image "
            + ("and lung mask decoded)" if has_masks(manifest) else "decoded)"),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
