"""Groups for leakage-safe splits (``pack --groups FILE.csv``): which images must share a split.

A group is a patient, a study or a source hospital: images of one group in both train and test would let
a model score by recognising the patient (or the hospital's markers) instead of the disease.

The CSV has a header row naming at least the columns ``file`` and ``group`` (other columns are ignored;
UTF-8, an Excel byte-order mark is fine)::

    file,group
    COVID-1.png,patient-0007
    Normal/images/Normal-12.png,patient-0007

- ``file`` is an image's file name, or its path relative to the folder that holds the class folders
  (for a zip SRC, the folder inside the zip that holds them). Backslashes count as slashes. A bare name
  that matches images in two class folders is ambiguous: an error naming both (give the path instead).
- ``group`` is any non-empty text; ids are compared as strings (``007`` and ``7`` are two groups).
- A file listed twice must name the same group both times.
- A row naming no image in SRC is a warning (the CSV may cover more of the database than SRC holds),
  listing a few and how many.
- An image the CSV does not name is an error listing a few and how many, unless ``--ungrouped
  own-group``: then each such image is a group of its own.

Identical images (same pixels, found while packing) join one group with everything grouped with them
(`join_groups`, a union-find), so a duplicate can never carry a patient across splits.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shard_tools.errors import InputError

_SHOWN = 5  # examples listed in an error or warning


@dataclass(frozen=True)
class GroupTable:
    """A parsed groups CSV: `groups[rel]` for every image it names, plus what was left over."""

    file: str  # the CSV as given
    sha256: str  # of its bytes, recorded in the manifest
    groups: dict[str, str]  # image rel path -> group id
    unmatched_rows: list[str]  # `file` values naming no image in SRC (a warning)


def read_groups(
    path: Path | str, rels: Sequence[str], *, column: str = "group", option: str = "--groups"
) -> GroupTable:
    """Read a `file,<column>` CSV and match its rows to the images `rels` (POSIX paths relative to the
    root, which start with the class folder). Raises `InputError` (naming `option`) for a missing or
    malformed file, a conflicting or ambiguous row. Images the CSV does not name are simply absent from
    `groups` (see `missing_images`). The same table serves `pack --groups` (column "group") and
    `cxrdist.evaluate --subgroups` (column "subgroup")."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except OSError as e:
        raise InputError(f"{option} {path} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{option} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise InputError(f"{option} {path} is not a readable CSV file: {e}") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "file" not in header or column not in header:
        raise InputError(
            f"{option} {path}: the first row must name the columns 'file' and '{column}' "
            f"(e.g. file,{column}), got {rows[0] if rows else 'an empty file'}"
        )
    col_file, col_group = header.index("file"), header.index(column)

    known = set(rels)
    by_name: dict[str, list[str]] = defaultdict(list)
    for rel in rels:
        by_name[rel.rsplit("/", 1)[-1]].append(rel)

    groups: dict[str, str] = {}
    line_of: dict[str, int] = {}
    unmatched: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines
        if len(row) <= max(col_file, col_group):
            raise InputError(f"{option} {path}, line {line}: expected a file and a {column}, got {row!r:.80}")
        file = row[col_file].strip().replace("\\", "/").removeprefix("./")
        group = row[col_group].strip()
        if not file or not group:
            raise InputError(f"{option} {path}, line {line}: empty file or {column} in {row!r:.80}")
        if "/" in file:
            rel = file if file in known else None
        else:
            matches = by_name.get(file, [])
            if len(matches) > 1:
                raise InputError(
                    f"{option} {path}, line {line}: {file!r} is ambiguous, it names "
                    f"{' and '.join(matches[:2])}; give its path relative to SRC instead"
                )
            rel = matches[0] if matches else None
        if rel is None:
            unmatched.append(file)
            continue
        if rel in groups and groups[rel] != group:
            raise InputError(
                f"{option} {path}: {rel} is in {column} {groups[rel]!r} (line {line_of[rel]}) and in "
                f"{column} {group!r} (line {line}); an image belongs to one {column}"
            )
        groups[rel], line_of[rel] = group, line
    return GroupTable(str(path), hashlib.sha256(raw).hexdigest(), groups, unmatched)


def missing_images(table: GroupTable, rels: Sequence[str]) -> list[str]:
    """The images (rel paths, in the given order) that the CSV does not name."""
    return [rel for rel in rels if rel not in table.groups]


def missing_error(table: GroupTable, missing: Sequence[str], total: int) -> InputError:
    shown = ", ".join(missing[:_SHOWN]) + (
        f", ... ({len(missing) - _SHOWN} more)" if len(missing) > _SHOWN else ""
    )
    return InputError(
        f"--groups {table.file} names no group for {len(missing)} of {total} images: {shown}. Add them to "
        "the CSV, or pass --ungrouped own-group to make each of them a group of its own"
    )


def unmatched_warning(table: GroupTable) -> str:
    rows = table.unmatched_rows
    shown = ", ".join(rows[:_SHOWN]) + (f", ... ({len(rows) - _SHOWN} more)" if len(rows) > _SHOWN else "")
    return f"--groups {table.file}: {len(rows)} row(s) name no image in SRC and are ignored: {shown}"


def join_groups(names: Sequence[str | None], same_pixels: Sequence[Sequence[int]]) -> list[int]:
    """Group id per item: items sharing a group name, or linked through identical pixels, share an id.

    `names[i]` is item i's group from the CSV (None: a group of its own); `same_pixels` lists sets of
    items with identical pixels. Ids are the smallest item index of each group, so they do not depend on
    the names' spelling. A union-find with path halving.
    """
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name is not None:
            union(first.setdefault(name, i), i)
    for items in same_pixels:
        for i in items[1:]:
            union(items[0], i)
    return [find(i) for i in range(len(names))]
