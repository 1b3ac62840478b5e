"""Pack a folder of chest radiographs into WebDataset shards with a manifest.

    python -m shard_tools.pack SRC OUT [--size 128] [--split 0.7,0.15,0.15] [--seed 0] [--shard-size 1000]
        [--max-shard-mb 256] [--min-shards 16] [--workers N] [--classes A,B,...] [--max-skipped 0.01]
        [--duplicates group|drop] [--force] [--no-progress]

Input: SRC holds one folder per class, in either of the database's layouts, `SRC/<Class>/*.png` or
`SRC/<Class>/images/*.png` (`masks/` is ignored). Class folders match the class names case-insensitively,
with space and underscore equal (`Viral Pneumonia`, `viral_pneumonia`). Files: .png, .jpg, .jpeg.

Labels: by default the database's classes in alphabetical order, as in `schema.CLASSES`:
0 = COVID, 1 = Lung_Opacity, 2 = Normal, 3 = Viral Pneumonia. `--classes` gives other names and order
(`--classes Normal,COVID`: 0 = Normal, 1 = COVID); the database's names keep their canonical spelling.

Output: `OUT/{train,val,test}-NNNNNN.tar` and `OUT/manifest.json`, as specified in `shard_tools.schema`.
Each image goes through `images.load_gray` (8-bit gray, LANCZOS resize to size x size) and is stored as a
lossless PNG. The same input and options give byte-identical shards, whatever OUT and `--workers` are.

Splits are stratified per class (`split_sizes`), and images with identical pixels stay in one split, so a
duplicate never leaks from train into val or test (`--duplicates drop` keeps only one of each group).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
from shard_tools.images import IMAGE_SUFFIXES
from shard_tools.schema import (
    CLASSES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    normalize_class_name,
    sample_key,
    shard_name,
    slug,
)
from shard_tools.verify import summary_table

DEFAULT_MAX_SHARD_BYTES = 256 * 2**20
_TAR_BLOCK = tarfile.BLOCKSIZE  # 512
_TAR_RECORD = tarfile.RECORDSIZE  # a tar file is padded to a multiple of this

_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False)


class PackError(ValueError):
    """The input or the options cannot give a valid dataset; the message says what to change."""


@dataclass(frozen=True)
class Source:
    """One input image: `rel` is relative to SRC (POSIX), `key` its unique sample key."""

    path: Path
    rel: str
    class_name: str
    label: int
    key: str


@dataclass(frozen=True)
class Packed:
    """One decoded image, its PNG stored in the spill file at [offset, offset + length)."""

    offset: int
    length: int
    pixel_sha256: str
    orig_size: tuple[int, int]  # (width, height) of the source image
    shape: tuple[int, int]  # (height, width) as stored


# ----------------------------------------------------------------------------------------------- splits


def split_sizes(n: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> tuple[int, int, int]:
    """Per-class (train, val, test) sizes for `n` images: boundaries rounded up, in order.

    train = ceil(f_train * n), train + val = ceil((f_train + f_val) * n), test = the rest. On the full
    database this is within one image of the study's table for every class and split; no rounding rule
    reproduces that table exactly (Normal rounds 0.15 x 10192 = 1528.8 up, Lung_Opacity 0.15 x 6012 = 901.8
    down). Products are rounded to 9 decimals first, so 0.7 x 20 gives 14, not ceil(14.000000000000002).
    """
    f_train, f_val, _ = fractions
    train = min(n, math.ceil(round(f_train * n, 9)))
    train_val = min(n, max(train, math.ceil(round((f_train + f_val) * n, 9))))
    return train, train_val - train, n - train_val


def _class_rng(seed: int, class_name: str) -> np.random.Generator:
    # One stream per class, so adding images to one class leaves the others' splits unchanged.
    return np.random.default_rng([seed, zlib.crc32(class_name.encode("utf-8"))])


def assign_splits(
    labels: Sequence[int],
    groups: Sequence[int],
    class_names: Sequence[str],
    fractions: Sequence[float],
    seed: int,
) -> list[int]:
    """Split index (0 train, 1 val, 2 test) for each item; items of a group share one split.

    Items must be in a deterministic order (pack sorts by label, then path); `groups[i]` is the group id of
    item i (identical pixels share one). Per class, items are shuffled and fill train, then val, then test
    up to `split_sizes`; a duplicate group goes where its first-drawn member goes, so its other members may
    push that split over its size by a few images (and the last split under).
    """
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    split = [-1] * len(labels)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(labels):
        by_class[c].append(i)
    for c, name in enumerate(class_names):
        items = by_class.get(c, [])
        target = split_sizes(len(items), fractions)
        filled = [0, 0, 0]
        for i in items:  # already placed with a duplicate in an earlier class
            if split[i] >= 0:
                filled[split[i]] += 1
        for j in _class_rng(seed, name).permutation(len(items)):
            i = items[j]
            if split[i] >= 0:
                continue
            free = [target[s] - filled[s] for s in range(3)]
            s = next((s for s in range(3) if free[s] > 0), int(np.argmax(free)))
            for m in members[groups[i]]:
                split[m] = s
                if labels[m] == c:
                    filled[s] += 1
    return split


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


def find_class_dirs(src: Path, class_names: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
    """Map each class to its folder in SRC, and list the folders that match no class."""
    if not src.exists():
        raise PackError(f"SRC {src} does not exist")
    if not src.is_dir():
        raise PackError(f"SRC {src} is not a folder; give the folder that holds one folder per class")
    wanted = {normalize_class_name(c): c for c in class_names}
    found: dict[str, Path] = {}
    unknown: list[str] = []
    for d in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        c = wanted.get(normalize_class_name(d.name))
        if c is None:
            unknown.append(d.name)
        elif c in found:
            raise PackError(f"both {found[c].name!r} and {d.name!r} in {src} match class {c!r}; keep one")
        else:
            found[c] = d
    if not found:
        raise PackError(
            f"no class folders in {src}: expected subfolders named like {list(class_names)} "
            f"(case, space and underscore ignored), found {unknown or 'none'}"
        )
    return found, unknown


def _image_dir(class_dir: Path) -> Path:
    # Newer database layout: <Class>/images/ beside <Class>/masks/; older: images directly in <Class>/.
    images_dir = class_dir / "images"
    return images_dir if images_dir.is_dir() else class_dir


def list_sources(
    src: Path, class_dirs: dict[str, Path], class_names: Sequence[str]
) -> tuple[list[Source], list[dict[str, str]]]:
    """All candidate images, sorted by (label, path), with unique keys; and the non-image files skipped."""
    found: list[tuple[str, int, Path, str]] = []  # class, label, path, path relative to the image folder
    skipped: list[dict[str, str]] = []
    for label, c in enumerate(class_names):
        if c not in class_dirs:
            continue
        image_dir = _image_dir(class_dirs[c])
        for p in sorted(image_dir.iterdir()):
            if p.name.startswith(".") or p.is_dir():
                continue  # hidden files (.DS_Store) and sub-folders (masks/) are not images of this class
            if p.suffix.lower() in IMAGE_SUFFIXES:
                found.append((c, label, p, p.relative_to(image_dir).as_posix()))
            else:
                skipped.append(
                    {
                        "path": p.relative_to(src).as_posix(),
                        "reason": f"not a {'/'.join(IMAGE_SUFFIXES)} file",
                    }
                )
    keys = assign_keys([(c, rel) for c, _, _, rel in found])
    sources = [
        Source(path=p, rel=p.relative_to(src).as_posix(), class_name=c, label=label, key=k)
        for (c, label, p, _), k in zip(found, keys)
    ]
    return sources, skipped


def assign_keys(items: Sequence[tuple[str, str]]) -> list[str]:
    """Unique keys for (class name, path relative to the class's image folder), aligned with `items`.

    A key is `schema.sample_key`; names that collide (`a.png` and `a.jpg`, or `A b.png` and `a_b.png`) get
    their extension appended, then a counter, in sorted path order, so keys are stable across runs.
    """
    base = [sample_key(c, rel) for c, rel in items]
    counts = Counter(base)
    taken = {b for b, n in counts.items() if n == 1}
    keys = list(base)
    for i in sorted((i for i, b in enumerate(base) if counts[b] > 1), key=lambda i: (base[i], items[i][1])):
        ext = slug(Path(items[i][1]).suffix.lstrip("."))
        key, n = f"{base[i]}-{ext}" if ext else base[i], 1
        while key in taken:
            n += 1
            key = f"{base[i]}-{ext}-{n}" if ext else f"{base[i]}-{n}"
        taken.add(key)
        keys[i] = key
    return keys


# ----------------------------------------------------------------------------------------------- decode


def _decode(job: tuple[str, str, int]) -> tuple[str, Any]:
    """Worker: ("ok", (png, pixel_sha256, orig_size, shape)) or ("skip", reason)."""
    path, rel, size = job
    try:
        gray = images.decode_gray(path, name=rel)
    except images.ImageError as e:
        return "skip", e.reason
    orig_size = (int(gray.shape[1]), int(gray.shape[0]))
    gray = images.resize_gray(gray, size)
    return "ok", (images.encode_png(gray), images.pixel_sha256(gray), orig_size, gray.shape)


def _ignore_sigint() -> None:
    # Ctrl-C goes to the whole process group; only the parent should handle it (and stop the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[mp.pool.Pool | None]:
    """A process pool for `workers` > 1 (None: run in this process). Forked where possible: workers
    start in milliseconds and need only numpy and PIL, never torch."""
    if workers <= 1:
        yield None
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_ignore_sigint) as pool:
        yield pool


def _ordered_map(pool: mp.pool.Pool | None, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[Any]:
    """`fn` over `jobs`, results in job order, in `pool` if there is one."""
    if pool is None:
        return map(fn, jobs)
    # Chunks amortise the pipe's overhead; dozens of them keep the workers evenly busy to the end.
    return pool.imap(fn, jobs, chunksize=max(1, min(32, len(jobs) // 64)))


# ------------------------------------------------------------------------------------------------ write


def _padded(n: int) -> int:
    return -(-n // _TAR_BLOCK) * _TAR_BLOCK


def _sample_record(src: Source, packed: Packed) -> tuple[bytes, bytes]:
    """The sample's `.cls` and `.json` members (see `shard_tools.schema`)."""
    record = {
        "class": src.class_name,
        "orig_size": list(packed.orig_size),
        "path": src.rel,
        "pixel_sha256": packed.pixel_sha256,
    }
    meta = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return str(src.label).encode("ascii"), meta


def _sample_tar_bytes(cls: bytes, meta: bytes, png_length: int) -> int:
    """Bytes the sample takes in a tar: a header block per member plus its data padded to blocks."""
    return 3 * _TAR_BLOCK + _padded(len(cls)) + _padded(len(meta)) + _padded(png_length)


def _tar_bytes(sample_bytes: Sequence[int]) -> int:
    # Two zero blocks end the archive; tarfile then pads the file to a whole record.
    return -(-(sum(sample_bytes) + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def shard_counts(
    sample_bytes: Sequence[int], shard_size: int, max_shard_bytes: int, min_shards: int
) -> list[int]:
    """Samples per shard for one split (in order): as few shards as `shard_size`, the byte cap and
    `min_shards` allow, never more shards than samples, sizes differing by at most one sample."""
    n = len(sample_bytes)
    if n == 0:
        return []
    k = max(math.ceil(n / shard_size), math.ceil(_tar_bytes(sample_bytes) / max_shard_bytes), min_shards)
    k = min(k, n)
    while True:
        counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
        starts = np.cumsum([0, *counts])
        if k == n or all(
            _tar_bytes(sample_bytes[a:b]) <= max_shard_bytes for a, b in itertools.pairwise(starts)
        ):
            return counts
        k += 1


def _write_shard_job(job: tuple[str, str, list[tuple[str, bytes, bytes, int, int]]]) -> tuple[int, str]:
    """Worker: write one shard from (key, cls, json, PNG offset, PNG length) records and the spill file."""
    path, spill_path, samples = job
    members = []
    with open(spill_path, "rb") as spill:
        for key, cls, meta, offset, length in samples:
            spill.seek(offset)
            png = spill.read(length)
            members += [(f"{key}.cls", cls), (f"{key}.json", meta), (f"{key}.png", png)]
    return write_shard(Path(path), members)


def write_shard(path: Path, members: Sequence[tuple[str, bytes]]) -> tuple[int, str]:
    """Write a tar of (name, data) members in the given order, with no timestamps or owners (so the
    bytes depend on the content only); return its size and sha256."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return path.stat().st_size, h.hexdigest()


# ------------------------------------------------------------------------------------------------- pack


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

    def check(self) -> None:
        """Raise `PackError` naming the option and the allowed values."""
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


def pack(
    src: Path | str,
    out: Path | str,
    *,
    size: int = 128,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    shard_size: int = 1000,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    min_shards: int = 16,
    workers: int | None = None,
    classes: Sequence[str] | None = None,
    max_skipped: float = 0.01,
    duplicates: str = "group",
    force: bool = False,
    progress: bool = True,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Pack the radiographs under SRC into shards and `manifest.json` in OUT; return the manifest.

    Args:
        size: stored side length in pixels; 0 keeps the original size (all images must share one).
        split: (train, val, test) fractions, per class (`split_sizes`).
        seed: decides the split and the order of samples in shards.
        shard_size, max_shard_bytes: at most this many samples and bytes per shard.
        min_shards: train gets at least this many shards (ranks x loader workers read disjoint shards).
        workers: decoding processes (default: all cores); does not change the output.
        classes: class names in label order (default `schema.CLASSES`).
        max_skipped: fail when a larger share of the files cannot be used.
        duplicates: "group" keeps identical images in one split; "drop" keeps one of each group.
        force: replace a non-empty OUT.
        progress: show progress bars.
        command: recorded in the manifest; by default the equivalent `python -m shard_tools.pack` line.

    Raises `PackError` for bad input or options. Nothing is left at OUT on any failure: the output is
    built in a temporary folder beside OUT and renamed at the end.
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
    )
    opts.check()
    if workers is not None and workers < 1:
        raise PackError(f"--workers must be >= 1, got {workers}")
    class_dirs, unknown = find_class_dirs(src, opts.classes)
    if out.resolve().is_relative_to(src.resolve()) or src.resolve().is_relative_to(out.resolve()):
        # Either SRC would see OUT as a class folder next time, or --force would delete SRC.
        raise PackError(f"OUT {out} and SRC {src} overlap; write the shards somewhere else")
    if command is None:
        command = _equivalent_command(src, out, opts, explicit_classes=classes is not None, force=force)
    tmp = _prepare_out(out, force)
    try:
        manifest = _pack_into(tmp, src, class_dirs, unknown, opts, workers, progress)
        manifest["command"] = list(command)
        text = json.dumps(manifest, sort_keys=True, indent=2) + "\n"
        (tmp / MANIFEST_NAME).write_text(text, encoding="utf-8")
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _pack_into(
    tmp: Path,
    src: Path,
    class_dirs: dict[str, Path],
    unknown: list[str],
    opts: PackOptions,
    workers: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Decode, split and write the shards into `tmp`; return the manifest (all but `command`)."""
    for name in unknown:
        _warn(f"folder {name!r} in {src} matches no class {list(opts.classes)}; ignored")
    for c in opts.classes:
        if c not in class_dirs:
            _warn(f"no folder for class {c!r} in {src}; it will have 0 images")
    sources, skipped = list_sources(src, class_dirs, opts.classes)
    n_files = len(sources) + len(skipped)
    per_class = Counter(s.class_name for s in sources)
    for c, d in class_dirs.items():
        if per_class[c] == 0:
            _warn(f"class {c!r} (folder {d.relative_to(src)}) has no .png/.jpg/.jpeg images; it will have 0")
    if not sources:
        raise PackError(f"no images in {src}: its class folders hold no .png, .jpg or .jpeg files")

    # Decoded PNGs wait in a spill file until the split is known, so memory stays flat on the full
    # database. One pool serves both phases; its workers open the spill file by name.
    spill = tmp / ".spill"
    workers = min(workers or os.cpu_count() or 1, len(sources))
    with _pool(workers) as pool, _progress(progress) as bar:
        kept, packed, failed = _decode_to_spill(sources, opts.size, spill, pool, bar)
        skipped = sorted(skipped + failed, key=lambda d: d["path"])
        _check_skipped(skipped, n_files, opts.max_skipped)
        if not kept:
            raise PackError(f"no image in {src} could be read ({len(skipped)} skipped)")
        image_size = _common_size(kept, packed, opts.size)
        split_of, dup_records = _plan_splits(kept, packed, opts)
        splits = _write_splits(tmp, kept, packed, split_of, spill, opts, pool, bar)
    spill.unlink()
    _report_duplicates(dup_records, opts.duplicates)
    return {
        "format_version": FORMAT_VERSION,
        "classes": list(opts.classes),
        "image_size": image_size,
        "seed": opts.seed,
        "split_fractions": dict(zip(SPLITS, opts.split)),
        "source": str(src.resolve()),
        "tool_version": __version__,
        "splits": splits,
        "skipped": skipped,
        "duplicates": dup_records,
    }


def _decode_to_spill(
    sources: list[Source], size: int, spill: Path, pool: mp.pool.Pool | None, bar: Progress
) -> tuple[list[Source], list[Packed], list[dict[str, str]]]:
    """Decode every source, appending its PNG to `spill`; return the decoded sources, where their PNGs
    are, and the failures as skipped records."""
    jobs = [(str(s.path), s.rel, size) for s in sources]
    kept: list[Source] = []
    packed: list[Packed] = []
    failed: list[dict[str, str]] = []
    task = bar.add_task("decode", total=len(jobs))
    with open(spill, "wb") as f:
        for s, (status, result) in zip(sources, _ordered_map(pool, _decode, jobs)):
            bar.advance(task)
            if status == "skip":
                failed.append({"path": s.rel, "reason": result})
                continue
            png, sha, orig_size, shape = result
            packed.append(Packed(f.tell(), len(png), sha, orig_size, tuple(shape)))
            f.write(png)
            kept.append(s)
    return kept, packed, failed


def _plan_splits(
    kept: list[Source], packed: list[Packed], opts: PackOptions
) -> tuple[dict[int, int], list[dict[str, Any]]]:
    """Split index for each sample written (dropped duplicates have none), and the duplicate records."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(packed):
        by_hash[p.pixel_sha256].append(i)
    groups = [g for g in by_hash.values() if len(g) > 1]
    dropped = {i for g in groups for i in g[1:]} if opts.duplicates == "drop" else set()
    live = [i for i in range(len(kept)) if i not in dropped]
    split = assign_splits(
        [kept[i].label for i in live],
        [by_hash[packed[i].pixel_sha256][0] for i in live],
        opts.classes,
        opts.split,
        opts.seed,
    )
    split_of = dict(zip(live, split))
    records = []
    for g in groups:
        record = {
            "pixel_sha256": packed[g[0]].pixel_sha256,
            "paths": sorted(kept[i].rel for i in g),
            "split": SPLITS[split_of[g[0]]],
        }
        if opts.duplicates == "drop":
            record["dropped"] = sorted(kept[i].rel for i in g[1:])
        records.append(record)
    records.sort(key=lambda r: r["paths"][0])
    return split_of, records


def _write_splits(
    tmp: Path,
    kept: list[Source],
    packed: list[Packed],
    split_of: dict[int, int],
    spill: Path,
    opts: PackOptions,
    pool: mp.pool.Pool | None,
    bar: Progress,
) -> dict[str, Any]:
    """Write every split's shards into `tmp`; return the manifest's `splits`."""
    jobs, entries = [], []
    splits: dict[str, Any] = {}
    for si, split_name in enumerate(SPLITS):
        idx = sorted((i for i, s in split_of.items() if s == si), key=lambda i: kept[i].key)
        # Shuffled across classes so every shard mixes them; a fixed stream per split.
        idx = [idx[j] for j in np.random.default_rng([opts.seed, si, 7]).permutation(len(idx))]
        records = [
            (kept[i].key, *_sample_record(kept[i], packed[i]), packed[i].offset, packed[i].length)
            for i in idx
        ]
        sizes = [_sample_tar_bytes(cls, meta, length) for _, cls, meta, _, length in records]
        _check_sample_sizes(idx, sizes, kept, opts.max_shard_bytes)
        min_shards = opts.min_shards if split_name == "train" else 1
        counts = shard_counts(sizes, opts.shard_size, opts.max_shard_bytes, min_shards)
        if not idx and opts.split[si] > 0:
            _warn(f"{split_name} is empty: too few images per class for a {opts.split[si]:g} share")
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
    for (shards, name, n), (nbytes, sha) in zip(entries, _ordered_map(pool, _write_shard_job, jobs)):
        shards.append({"file": name, "count": n, "bytes": nbytes, "sha256": sha})
        bar.advance(task, n)
    return splits


def _prepare_out(out: Path, force: bool) -> Path:
    """Refuse a non-empty OUT without `force`; return a fresh temporary folder beside OUT."""
    if out.exists() or out.is_symlink():
        if not out.is_dir() and not force:
            raise PackError(f"OUT {out} exists and is not a folder; pass --force to replace it")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise PackError(f"OUT {out} is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside OUT, so the final rename stays on one filesystem and is atomic; hidden, so a crash leaves
    # nothing that looks like OUT.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would make OUT private once renamed
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to OUT, replacing what was there."""
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / "out")
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


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
    shown = "\n".join(f"  {d['path']}: {d['reason']}" for d in skipped[:10])
    more = f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    if share > max_skipped:
        raise PackError(
            f"{len(skipped)} of {n_candidates} files ({share:.1%}) could not be used, more than "
            f"--max-skipped {max_skipped:.1%}:\n{shown}{more}\nFix or remove them, or raise --max-skipped."
        )
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
        if _tar_bytes([n]) > max_shard_bytes:
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m shard_tools.pack",
        description="Pack chest radiograph folders into WebDataset shards (see shard_tools/schema.py).",
    )
    ap.add_argument("src", type=Path, help="database folder: SRC/<Class>/*.png or SRC/<Class>/images/*.png")
    ap.add_argument("out", type=Path, help="output folder for the shards and manifest.json")
    ap.add_argument(
        "--size", type=int, default=128, help="image side in pixels (default 128; 0 keeps the original)"
    )
    ap.add_argument(
        "--split", type=_parse_split, default=(0.7, 0.15, 0.15), help="train,val,test (default 0.7,0.15,0.15)"
    )
    ap.add_argument("--seed", type=int, default=0, help="split and shard-order seed (default 0)")
    ap.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (default 1000)")
    ap.add_argument(
        "--max-shard-mb",
        type=float,
        default=DEFAULT_MAX_SHARD_BYTES / 2**20,
        help="max MiB per shard (default 256)",
    )
    ap.add_argument(
        "--min-shards", type=int, default=16, help="min train shards, >= ranks x workers (default 16)"
    )
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    ap.add_argument(
        "--classes",
        default=None,
        help="comma-separated class names in label order (default: the database's four)",
    )
    ap.add_argument(
        "--max-skipped",
        type=float,
        default=0.01,
        help="fail if a larger share of files is unreadable (default 0.01)",
    )
    ap.add_argument(
        "--duplicates",
        choices=("group", "drop"),
        default="group",
        help="identical images: keep each group in one split (default) or keep one",
    )
    ap.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
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
            force=args.force,
            progress=not args.no_progress,
            command=["python", "-m", "shard_tools.pack", *argv],
        )
    except PackError as e:
        _err.print(f"[bold red]error:[/bold red] {escape(str(e))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        _err.print("[red]interrupted[/red]: nothing was written to OUT")
        return 130
    _out.print(summary_table(manifest, f"{args.out}  ({manifest['image_size']} px)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
