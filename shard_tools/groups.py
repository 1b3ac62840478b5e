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

``pack --groups-from-sheets`` takes the groups from the database's own metadata sheets instead
(`read_sheets`): ``<Class>.metadata.xlsx`` beside the class folders (in the zip too), one row per image
with its file name and the URL of the source it came from. Each source URL is a group, so every image of
a source lands in one split and a test split can hold sources never seen in training. The first worksheet
is read; its header is the first of its first ten rows that names both columns (a title row may sit above
it). Header spelling is free as to case, spaces, underscores, hyphens and dots: the file column is the
first of ``FILE NAME`` / ``file`` / ``image`` / ``name``, the source the first of ``URL`` / ``source`` /
``link``. A row's file name matches an image of the sheet's class by name or by stem, case ignored (the
database lists ``NORMAL-1`` for ``Normal/images/Normal-1.png``).
The rules follow the CSV's: a row naming no image is a warning (the sheets may cover more of the database
than SRC holds), an image with no row or an empty URL is ungrouped (``--ungrouped``), an image with two
URLs is an error. A sheet none of whose rows names an image of its class is an error (the wrong sheet, or
the wrong column), as is a class with images but no sheet, and a sheet that is not a readable workbook or
has no file or URL column: one line naming the sheet and the column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
import warnings
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shard_tools.errors import InputError
from shard_tools.files import read_input_file

_SHOWN = 5  # examples listed in an error or warning


@dataclass(frozen=True)
class GroupTable:
    """A parsed groups CSV: `groups[rel]` for every image it names, plus what was left over."""

    file: str  # the CSV as given
    sha256: str  # of its bytes, recorded in the manifest
    groups: dict[str, str]  # image rel path -> group id
    unmatched_rows: list[str]  # `file` values naming no image in SRC (a warning)
    option: str = "--groups"  # the option it came from, named in messages
    sheets: tuple[str, ...] = ()  # --groups-from-sheets: the sheets read (then a group is a source URL)


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
        raw = read_input_file(path)  # a regular file of at most 256 MiB: a FIFO or /dev/zero is refused
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
    where = "the sheets, each with its URL" if table.sheets else "the CSV"
    return InputError(
        f"{table.option} {table.file} names no group for {len(missing)} of {total} images: {shown}. Add them "
        f"to {where}, or pass --ungrouped own-group to make each of them a group of its own"
    )


def unmatched_warning(table: GroupTable) -> str:
    rows = table.unmatched_rows
    shown = ", ".join(rows[:_SHOWN]) + (f", ... ({len(rows) - _SHOWN} more)" if len(rows) > _SHOWN else "")
    return f"{table.option} {table.file}: {len(rows)} row(s) name no image in SRC and are ignored: {shown}"


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


# ------------------------------------------------------------------------------------- metadata sheets

SHEET_SUFFIX = ".metadata.xlsx"  # `<Class>.metadata.xlsx`, as the database names them
_SHEETS = "--groups-from-sheets"
# Accepted headers after `_header_key`, in order of preference.
_FILE_HEADERS = ("filename", "file", "imagename", "image", "name")
_URL_HEADERS = ("url", "sourceurl", "source", "link")
_HEADER_ROWS = 10  # the header is looked for in this many first rows


def _header_key(cell: Any) -> str:
    """`FILE NAME`, `File_Name`, `file-name` -> `filename`."""
    return "".join(ch for ch in str(cell or "").lower() if ch not in " _-.\t")


def _is_header(row: Sequence[Any]) -> bool:
    keys = {_header_key(c) for c in row}
    return bool(keys & set(_FILE_HEADERS)) and bool(keys & set(_URL_HEADERS))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a name typed as a number: 12, not 12.0
    return str(value).strip()


def _sheet_rows(label: str, data: bytes) -> tuple[str, list[tuple[Any, ...]]]:
    """(worksheet title, its rows of cell values) of the workbook's first worksheet. `InputError` naming
    the sheet when it is not a readable .xlsx workbook."""
    import openpyxl
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # openpyxl warns about styles and extensions it does not read
            book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
            try:
                if not book.worksheets:
                    raise InputError(f"{_SHEETS}: {label} holds no worksheet")
                sheet = book.worksheets[0]
                return sheet.title, [tuple(row) for row in sheet.iter_rows(values_only=True)]
            finally:
                book.close()
    except (
        InvalidFileException,
        zipfile.BadZipFile,
        zlib.error,
        KeyError,
        ValueError,
        TypeError,
        EOFError,
    ) as e:
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise InputError(f"{_SHEETS}: {label} is not a readable .xlsx workbook ({reason})") from None


def _column(label: str, title: str, header: list[str], row: int, accepted: Sequence[str], what: str) -> int:
    keys = [_header_key(h) for h in header]
    for name in accepted:
        if name in keys:
            return keys.index(name)
    raise InputError(
        f"{_SHEETS}: {label} (worksheet {title!r}) has no {what} column: its header row {row} holds "
        f"{[h for h in header if h]!r:.160}; expected a column named like {accepted[0]!r} ("
        f"{', '.join(repr(a) for a in accepted[1:])} also do; case, spaces and underscores are ignored)"
    )


def read_sheets(
    sheets: Sequence[tuple[str, str, bytes]], rels_by_class: Mapping[str, Sequence[str]], where: str
) -> GroupTable:
    """Groups from metadata sheets: each image's group is the source URL its class's sheet names for it.

    `sheets` are (label for messages, class name, the .xlsx bytes); `rels_by_class` the images of each
    class (rel paths); `where` the folder (or zip folder) holding the sheets, recorded as the table's
    `file`. Raises `InputError` naming the sheet (and the column or rows) as the module docstring says.
    """
    digest = hashlib.sha256()
    groups: dict[str, str] = {}
    origin: dict[str, str] = {}  # rel -> "sheet, row n", for conflicts
    unmatched: list[str] = []
    for label, class_name, data in sheets:
        digest.update(hashlib.sha256(data).digest())
        title, rows = _sheet_rows(label, data)
        filled = [i for i, r in enumerate(rows[:_HEADER_ROWS]) if any(_cell(c) for c in r)]
        if not filled:
            raise InputError(f"{_SHEETS}: {label} (worksheet {title!r}) is empty")
        # The header is the first row naming both columns (a title row may sit above it), else the first
        # non-empty row, whose missing column the error then names.
        first = next((i for i in filled if _is_header(rows[i])), filled[0])
        header = [_cell(c) for c in rows[first]]
        col_file = _column(label, title, header, first + 1, _FILE_HEADERS, "file-name")
        col_url = _column(label, title, header, first + 1, _URL_HEADERS, "source URL")
        by_name: dict[str, list[str]] = defaultdict(list)
        for rel in rels_by_class.get(class_name, ()):
            name = rel.rsplit("/", 1)[-1].lower()
            by_name[name].append(rel)
            by_name[posixpath.splitext(name)[0]].append(rel)
        n_rows, n_matched, first_file = 0, 0, ""
        for number, row in enumerate(rows[first + 1 :], start=first + 2):
            cells = [_cell(c) for c in row]
            file = cells[col_file].replace("\\", "/").rsplit("/", 1)[-1] if col_file < len(cells) else ""
            if not file:
                continue  # blank and footer rows
            n_rows += 1
            first_file = first_file or file
            url = cells[col_url] if col_url < len(cells) else ""
            matches = sorted(set(by_name.get(file.lower(), [])))
            if len(matches) > 1:
                raise InputError(
                    f"{_SHEETS}: {label}, row {number}: {file!r} is ambiguous, it names "
                    f"{' and '.join(matches[:2])}; keep one of them"
                )
            if not matches:
                unmatched.append(f"{label.rsplit('/', 1)[-1]}:{file}")
                continue
            n_matched += 1
            rel = matches[0]
            if not url:
                continue  # no source: ungrouped, as an image the sheet does not list
            if rel in groups and groups[rel] != url:
                raise InputError(
                    f"{_SHEETS}: {rel} has source {groups[rel]!r} ({origin[rel]}) and {url!r} ({label}, row "
                    f"{number}); an image comes from one source"
                )
            groups[rel], origin[rel] = url, f"{label}, row {number}"
        if n_rows and not n_matched and rels_by_class.get(class_name):
            raise InputError(
                f"{_SHEETS}: none of the {n_rows} rows of {label} names an image of class {class_name!r} in "
                f"SRC (the first names {header[col_file]} {first_file!r}); is it "
                "that class's sheet, and is that the file-name column?"
            )
    return GroupTable(
        where, digest.hexdigest(), groups, unmatched, option=_SHEETS, sheets=tuple(s[0] for s in sheets)
    )
