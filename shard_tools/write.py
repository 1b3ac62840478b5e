"""Pack's write stage: the decoded images, split and shuffled, copied from the spill file into shards.

`write_splits` orders each split's samples (sorted by key, then shuffled by a fixed per-split stream so
every shard mixes the classes), sizes its shards (`shards.shard_counts`), writes them on the worker pool
(`_write_shard_job`, one shard each) and returns the manifest's `splits`. `sample_record` is a sample's
`.cls` and `.json` members, as `shard_tools.schema` specifies them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.progress import Progress

from shard_tools.cli import print_problem
from shard_tools.decode import Packed
from shard_tools.errors import PackError
from shard_tools.groups import GroupTable
from shard_tools.pool import WorkerPool, ordered_map
from shard_tools.schema import MASK_EXT, SPLITS, shard_name
from shard_tools.shards import sample_tar_bytes, shard_counts, tar_bytes, write_shard
from shard_tools.sources import Source

if TYPE_CHECKING:
    from shard_tools.pack import PackOptions


def sample_record(src: Source, packed: Packed, table: GroupTable | None = None) -> tuple[bytes, bytes]:
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


def write_splits(
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
                *sample_record(kept[i], packed[i], table),
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
            _warn(bar, f"{split_name} is empty: too few images per class for a {opts.split[si]:g} share")
        elif not idx and split_name != "train":
            _warn(
                bar,
                f"{split_name} is empty (--split gives it 0): training needs val images to choose the best "
                "epoch and test images to report on, and refuses these shards",
            )
        elif idx and len(counts) < min_shards:
            _warn(
                bar,
                f"{split_name} has only {len(idx)} images, so {len(counts)} shards, fewer than "
                f"--min-shards {min_shards}: fewer ranks x loader workers can read it in parallel",
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


def _check_sample_sizes(idx: list[int], sizes: list[int], kept: list[Source], max_shard_bytes: int) -> None:
    for i, n in zip(idx, sizes):
        if tar_bytes([n]) > max_shard_bytes:
            raise PackError(
                f"{kept[i].rel} alone takes {n} bytes in a shard, more than the cap of {max_shard_bytes}; "
                "raise --max-shard-mb or lower --size"
            )


def _warn(bar: Progress, msg: str) -> None:
    # On the progress bars' console, so a warning prints above the live bars instead of through them.
    print_problem(msg, "warning", "yellow", console=bar.console)
