"""Which split (train, val, test) each image goes to: stratified per class, groups kept whole.

Items are the images pack writes, in a deterministic order (sorted by label, then path). Split indices:
0 = train, 1 = val, 2 = test. Two rules, both deterministic from the seed:

- `assign_splits` (the default): per class, shuffle and fill train, val, test up to `split_sizes`; a set
  of identical images goes where its first-drawn member goes.
- `assign_group_splits` (``pack --groups``): every group (a patient, a study, a hospital, joined with any
  identical images) lands whole in one split. Groups are placed largest first (ties in seeded random
  order), each into the split where it most reduces the squared gap between per-class shares and their
  targets; a split whose fraction is 0 gets nothing. With many small groups the shares come out within
  about a group's size of the targets; a few large groups can move them further, and `share_table` shows
  by how much.

`plan_splits` applies them to pack's samples: it finds the sets of identical images, drops all but one of
each with ``--duplicates drop``, and returns each sample's split with what the manifest records about
duplicates and groups.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from shard_tools.groups import GroupTable, join_groups
from shard_tools.schema import SPLITS

if TYPE_CHECKING:
    from shard_tools.pack import PackOptions


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


def assign_group_splits(
    labels: Sequence[int], groups: Sequence[int], n_classes: int, fractions: Sequence[float], seed: int
) -> list[int]:
    """Split index (0 train, 1 val, 2 test) for each item, every group whole in one split.

    `labels[i]` is item i's label id (< `n_classes`), `groups[i]` its group id (any int; items with equal
    ids form a group). Targets per class are `split_sizes`. Groups go largest first; equal sizes in an
    order drawn from `seed`. Each goes to the split (with a fraction > 0) that minimises
    ``sum over classes c, splits s of ((placed[s][c] - target[s][c]) / n_c) ** 2``, i.e. the split whose
    deficit in the group's own classes is largest; exact ties go to the earlier split.
    """
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    totals = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes) if len(labels) else None
    totals = np.zeros(n_classes, np.int64) if totals is None else totals
    target = np.array([split_sizes(int(n), fractions) for n in totals], dtype=np.float64).T  # (3, K)
    weight = 1.0 / np.maximum(totals, 1).astype(np.float64) ** 2  # (K,): per-class shares, not counts
    placed = np.zeros((3, n_classes), dtype=np.float64)
    open_splits = [s for s in range(3) if fractions[s] > 0]

    ids = sorted(members)  # group ids in a fixed order, then a seeded order among equal sizes
    order = np.random.default_rng([seed, 0x67726F7570]).permutation(len(ids))
    ids = [ids[j] for j in order]
    ids.sort(key=lambda g: -len(members[g]))  # stable: the seeded order stays among equal sizes

    split = [-1] * len(labels)
    for g in ids:
        counts = np.bincount([labels[i] for i in members[g]], minlength=n_classes).astype(np.float64)
        # Change in the cost if the group joins split s: sum_c w_c (2 v_c (placed - target) + v_c^2).
        delta = [float(np.sum(weight * counts * (2 * (placed[s] - target[s]) + counts))) for s in open_splits]
        s = open_splits[int(np.argmin(delta))]
        placed[s] += counts
        for i in members[g]:
            split[i] = s
    return split


def share_rows(manifest: Mapping[str, Any]) -> list[tuple[str, int, list[float]]]:
    """Per class: its image count and the share of them in train, val and test (fractions; 0.0 for a
    class without images), from a manifest's `class_counts`."""
    rows = []
    for c in manifest["classes"]:
        counts = [manifest["splits"][s]["class_counts"].get(c, 0) for s in SPLITS]
        n = sum(counts)
        rows.append((c, n, [k / n if n else 0.0 for k in counts]))
    return rows


def share_table(manifest: Mapping[str, Any]) -> Table:
    """Per class and split, the share of the class's images reached, and its gap in percentage points
    from the requested fraction (in the column header); the largest gap in the caption. What
    ``pack --groups`` prints after packing."""
    fractions = [float(manifest["split_fractions"][s]) for s in SPLITS]
    table = Table(
        title="class shares per split: reached (points from the requested share)", title_justify="left"
    )
    table.add_column("class")
    table.add_column("images", justify="right")
    for split, f in zip(SPLITS, fractions):
        table.add_column(f"{split} {100 * f:.1f}%", justify="right")
    worst = (0.0, "", "")
    for c, n, shares in share_rows(manifest):
        cells = []
        for split, want, got in zip(SPLITS, fractions, shares):
            gap = 100 * (got - want)
            cells.append(f"{100 * got:.1f}% ({gap:+.1f})" if n else "-")
            if n and abs(gap) > abs(worst[0]):
                worst = (gap, c, split)
        table.add_row(escape(c), str(n), *cells)
    table.caption = (
        f"largest gap: {worst[0]:+.1f} points ({escape(worst[1])}, {worst[2]})"
        if worst[1]
        else "every share on target"
    )
    table.caption_justify = "left"
    return table


@dataclass
class SplitPlan:
    """Where each written sample goes, and what the manifest records about duplicates and groups."""

    split_of: dict[int, int]  # item -> split index; dropped duplicates have none
    duplicates: list[dict[str, Any]]  # the manifest's `duplicates`
    group_names: list[list[str]] | None = None  # --groups: the CSV's group names in each split
    groups_summary: dict[str, Any] | None = None  # --groups: the manifest's top-level `groups`


def plan_splits(
    labels: Sequence[int],
    rels: Sequence[str],
    pixel_sha256: Sequence[str],
    opts: PackOptions,
    table: GroupTable | None,
) -> SplitPlan:
    """Split each of pack's samples (item i: its label id, its path relative to the root and its pixels'
    sha256): stratified per class, identical images together, and with groups every group (joined with
    its duplicates) whole inside one split. `opts`: pack's options (`classes`, `split`, `seed`,
    `duplicates`, `ungrouped`); `table`: the groups, if any."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(pixel_sha256):
        by_hash[h].append(i)
    dup_sets = [g for g in by_hash.values() if len(g) > 1]
    dropped = {i for g in dup_sets for i in g[1:]} if opts.duplicates == "drop" else set()
    live = [i for i in range(len(labels)) if i not in dropped]
    plan = SplitPlan({}, [])
    if table is None:
        split = assign_splits(
            [labels[i] for i in live],
            [by_hash[pixel_sha256[i]][0] for i in live],
            opts.classes,
            opts.split,
            opts.seed,
        )
        plan.split_of = dict(zip(live, split))
    else:
        # Dropped duplicates still join groups: their pixels live on in the copy that is kept.
        names = [table.groups.get(rel) for rel in rels]
        component = join_groups(names, dup_sets)
        split = assign_group_splits(
            [labels[i] for i in live],
            [component[i] for i in live],
            len(opts.classes),
            opts.split,
            opts.seed,
        )
        plan.split_of = dict(zip(live, split))
        split_of_component = {component[i]: s for i, s in plan.split_of.items()}
        in_split: list[set[str]] = [set(), set(), set()]
        names_of: dict[int, set[str]] = defaultdict(set)
        for i, name in enumerate(names):
            if name is not None:
                in_split[split_of_component[component[i]]].add(name)
                names_of[component[i]].add(name)
        plan.group_names = [sorted(s) for s in in_split]
        plan.groups_summary = {
            # Sheets: the folder (or zip folder) holding them, as `tree.describe` gives it, absolute.
            "file": table.file if table.sheets else str(Path(table.file).resolve()),
            "sha256": table.sha256,
            "ungrouped": opts.ungrouped or "error",
            "own_groups": sum(name is None for name in names),
            "joined_by_duplicates": sorted(sorted(n) for n in names_of.values() if len(n) > 1),
        }
        if table.sheets:
            plan.groups_summary["sheets"] = list(table.sheets)
    for g in dup_sets:
        record = {
            "pixel_sha256": pixel_sha256[g[0]],
            "paths": sorted(rels[i] for i in g),
            "split": SPLITS[plan.split_of[g[0]]],
        }
        if opts.duplicates == "drop":
            record["dropped"] = sorted(rels[i] for i in g[1:])
        plan.duplicates.append(record)
    plan.duplicates.sort(key=lambda r: r["paths"][0])
    return plan
