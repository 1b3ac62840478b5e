"""Where `shard_tools.pack` finds its input images: a database folder, or the download's zip, read alike.

SRC is either

- a folder holding one folder per class (`SRC/<Class>/*.png` or `SRC/<Class>/images/*.png`), or
- a zip archive holding such class folders at its top level or one folder down. Kaggle serves the database
  as one zip with ``COVID-19_Radiography_Dataset/<Class>/images/*.png`` inside, lung masks beside them in
  ``<Class>/masks/`` and a metadata sheet per class (``<Class>.metadata.xlsx``, read by `shard_tools.groups`).

Lung masks (`find_masks`): an image ``<Class>/images/X.png`` (or ``<Class>/X.png``) has a mask when
``<Class>/masks/`` holds a file of the same stem (``X.png``; an exact name wins over another suffix).

The folder that holds the class folders is the *root*. Every image gets ``rel``, its POSIX path relative
to the root (``COVID/images/COVID-1.png``): the path recorded in the shards' ``.json`` and the one a
``--groups`` CSV names. A zip and the root folder extracted from it therefore list the same images with
the same ``rel``, keys and order, and pack writes byte-identical shards from both.

Zip members are never extracted: `read_image_bytes` opens the archive by path (once per process, so
forked pool workers never share a file offset) and reads a member by name. Members whose names are
absolute or contain ``..`` are ignored with a warning; none is ever turned into a filesystem path.
"""

from __future__ import annotations

import os
import posixpath
import stat
import struct
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from shard_tools.errors import InputError
from shard_tools.files import MAX_INPUT_BYTES, input_problem, read_input_file
from shard_tools.images import IMAGE_SUFFIXES
from shard_tools.schema import normalize_class_name, sample_key, slug

# A member larger than this is not read (a zip can declare any size; radiographs are a few MB); the same
# limit as for a file on disk.
MAX_MEMBER_BYTES = MAX_INPUT_BYTES

# macOS's Finder adds this folder of resource forks to the zips it makes.
_ZIP_JUNK = "__MACOSX"


@dataclass(frozen=True)
class Source:
    """One input image. `rel`: POSIX path relative to the root (recorded in the shards); `key`: its unique
    sample key; `archive`: the zip's path, or "" for a file on disk; `name`: the file's path on disk, or
    the member's name inside `archive`."""

    rel: str
    class_name: str
    label: int
    key: str
    archive: str
    name: str
    mask_rel: str = ""  # its lung mask's path relative to the root; "" when it has none (`find_masks`)
    mask_name: str = ""  # the mask's path on disk or member name in `archive`


@dataclass
class Tree:
    """The listing of SRC below its root: folders and files by POSIX path relative to the root."""

    src: Path
    is_zip: bool
    root: str = ""  # the root's member prefix inside a zip ("COVID-19_Radiography_Dataset/"), else ""
    dirs: dict[str, list[str]] = field(default_factory=dict)  # zip only: folder -> sorted sub-folders
    files: dict[str, list[str]] = field(default_factory=dict)  # zip only: folder -> sorted file names
    ignored: list[str] = field(default_factory=list)  # zip members never read (unsafe names)
    unlisted: list[str] = field(default_factory=list)  # zip members its central directory omits (damaged)

    def subdirs(self, rel: str) -> list[str]:
        """Names of the visible sub-folders of `rel` ("" is the root), sorted."""
        if self.is_zip:
            return [d for d in self.dirs.get(rel, []) if _visible(d)]
        folder = self.src / rel
        return sorted(p.name for p in folder.iterdir() if _visible(p.name) and p.is_dir())

    def file_names(self, rel: str) -> list[str]:
        """Names of the visible non-folder entries of `rel`, sorted."""
        if self.is_zip:
            return [f for f in self.files.get(rel, []) if _visible(f)]
        folder = self.src / rel
        return sorted(p.name for p in folder.iterdir() if _visible(p.name) and not p.is_dir())

    def locate(self, rel: str) -> tuple[str, str]:
        """(archive, name) that `read_image_bytes` or a path read needs for the file at `rel`."""
        if self.is_zip:
            return str(self.src), self.root + rel
        return "", str(self.src / rel)

    def unreadable(self, rel: str) -> str | None:
        """Why the file at `rel` will not be read, judged from its metadata alone (a FIFO would block,
        /dev/zero never ends); None when it may be. Zip members are checked as they are read."""
        if self.is_zip:
            return None
        try:
            return input_problem(os.stat(self.src / rel))
        except OSError as e:  # a dangling link
            return f"cannot read: {e.strerror or e}"

    def describe(self, rel: str = "") -> str:
        """`rel` as a user would find it: a path on disk, or `archive.zip:member/`."""
        if self.is_zip:
            return f"{self.src}:{self.root}{rel}"
        return str(self.src / rel) if rel else str(self.src)


def _visible(name: str) -> bool:
    # Hidden entries (.DS_Store, ._resource forks) are never images of a class.
    return not name.startswith(".")


# ----------------------------------------------------------------------------------------------- open


def open_tree(src: Path, class_names: Sequence[str]) -> Tree:
    """The listing of SRC (a folder or a zip), rooted at the folder that holds the class folders.

    Raises `InputError` when SRC is missing, unreadable, a file that is not a zip, or a zip with no (or
    more than one) folder of class folders at its top level or one folder down.
    """
    try:
        if not src.exists():
            raise InputError(f"SRC {src} does not exist")
        if src.is_dir():
            return Tree(src, is_zip=False)
        if not src.is_file():  # a FIFO would block the zip check forever
            raise InputError(f"SRC {src} is neither a folder nor a regular file; give the folder or the .zip")
        if not zipfile.is_zipfile(src):
            raise InputError(
                f"SRC {src} is a file but not a zip archive; give the database folder (the one holding a "
                "folder per class) or the download's .zip"
            )
        with zipfile.ZipFile(src) as zf:
            names = zf.namelist()
            unlisted = unlisted_members(src, zf)
    except OSError as e:
        raise InputError(f"SRC {src} cannot be read: {e.strerror or e}") from None
    except zipfile.BadZipFile as e:
        raise InputError(f"SRC {src} is a damaged zip archive ({e}); download it again") from None
    tree = _zip_tree(src, names, class_names)
    tree.unlisted = unlisted
    return tree


# The most bytes read between members while looking for ones the central directory does not list.
_UNLISTED_SCAN_BYTES = 64 * 2**20


def unlisted_members(src: Path, zf: zipfile.ZipFile) -> list[str]:
    """Names of members stored in the zip that its central directory does not list (a damaged
    directory): zipfile reads only the directory, so without this they would vanish without a word.

    Every listed member's local header gives the bytes it spans; a member header in the bytes between
    them (or before the directory) is an unlisted member, named from its own header."""
    spans = []
    with open(src, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) == 30 and head[:4] == b"PK\x03\x04":  # else reading it fails, and says so
                n, m = struct.unpack("<HH", head[26:30])
                spans.append((info.header_offset, info.header_offset + 30 + n + m + info.compress_size))
        spans.sort()
        gaps, pos = [], 0
        for start, end in [*spans, (getattr(zf, "start_dir", pos), 0)]:
            if start - pos >= 30:
                gaps.append((pos, start))
            pos = max(pos, end)
        names, budget = [], _UNLISTED_SCAN_BYTES
        for start, end in gaps:
            f.seek(start)
            gap = f.read(min(end - start, max(budget, 0)))
            budget -= len(gap)
            i = gap.find(b"PK\x03\x04")
            while 0 <= i <= len(gap) - 30:
                (flags,), (n,) = struct.unpack_from("<H", gap, i + 6), struct.unpack_from("<H", gap, i + 26)
                raw = gap[i + 30 : i + 30 + n]
                if 0 < n == len(raw):
                    names.append(raw.decode("utf-8" if flags & 0x800 else "cp437", errors="replace"))
                i = gap.find(b"PK\x03\x04", i + 4)
    return names


def is_unsafe_member(name: str) -> bool:
    """A member name that would point outside the archive's folder if it were a path: absolute (`/x`,
    `C:/x`, `\\\\server\\x`) or with a `..` component. Such members are never read."""
    path = name.replace("\\", "/")
    return path.startswith("/") or (len(path) > 1 and path[1] == ":") or ".." in path.split("/")


def _zip_tree(src: Path, names: Sequence[str], class_names: Sequence[str]) -> Tree:
    ignored = sorted({n for n in names if is_unsafe_member(n)})
    dirs: dict[str, set[str]] = defaultdict(set)
    files: dict[str, set[str]] = defaultdict(set)
    for name in names:
        if name in ignored:
            continue
        parts = [p for p in name.split("/") if p not in ("", ".")]
        is_dir = name.endswith("/")
        for i in range(len(parts) - (0 if is_dir else 1)):  # every folder on the way, entries or not
            dirs["/".join(parts[:i])].add(parts[i])
        if not is_dir and parts:
            files["/".join(parts[:-1])].add(parts[-1])
    wanted = {normalize_class_name(c) for c in class_names}

    def holds_classes(folder: str) -> bool:
        return any(normalize_class_name(d) in wanted for d in dirs.get(folder, ()) if _visible(d))

    candidates = [""] + [d for d in sorted(dirs.get("", ())) if _visible(d) and d != _ZIP_JUNK]
    roots = [c for c in candidates if holds_classes(c)]
    if not roots:
        top = sorted(dirs.get("", set()) | files.get("", set()))
        raise InputError(
            f"no class folders in {src}, neither at its top level nor one folder down: expected folders "
            f"named like {list(class_names)} (case, space and underscore ignored); its top level holds "
            f"{top[:8] or 'nothing'}"
        )
    if len(roots) > 1:
        shown = " and ".join(repr(r + "/" if r else "(top level)") for r in roots[:2])
        raise InputError(
            f"{src} holds class folders in more than one place ({shown}); extract the one you mean and "
            "pack that folder"
        )
    root = roots[0]

    def below(folder: str) -> str:  # the path relative to the root
        return folder[len(root) + 1 :] if root else folder

    prefix = f"{root}/" if root else ""
    tree = Tree(src, is_zip=True, root=prefix, ignored=ignored)
    for folder, subs in dirs.items():
        if folder == root or folder.startswith(prefix):
            tree.dirs[below(folder)] = sorted(subs)
    for folder, found in files.items():
        if folder == root or folder.startswith(prefix):
            tree.files[below(folder)] = sorted(found)
    return tree


# ---------------------------------------------------------------------------------------------- list


def find_class_dirs(tree: Tree, class_names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Map each class to its folder (relative to the root), and list the folders that match no class."""
    wanted = {normalize_class_name(c): c for c in class_names}
    found: dict[str, str] = {}
    unknown: list[str] = []
    try:
        subdirs = tree.subdirs("")
    except OSError as e:
        raise InputError(f"SRC {tree.describe()} cannot be read: {e.strerror or e}") from None
    for d in subdirs:
        c = wanted.get(normalize_class_name(d))
        if c is None:
            unknown.append(d)
        elif c in found:
            raise InputError(f"both {found[c]!r} and {d!r} in {tree.describe()} match class {c!r}; keep one")
        else:
            found[c] = d
    if not found:
        raise InputError(
            f"no class folders in {tree.describe()}: expected subfolders named like {list(class_names)} "
            f"(case, space and underscore ignored), found {unknown or 'none'}"
        )
    return found, unknown


def image_dir(tree: Tree, class_dir: str) -> str:
    """The folder holding a class's images: `<Class>/images/` (newer layout, beside `masks/`) if there
    is one, else `<Class>/`."""
    return f"{class_dir}/images" if "images" in tree.subdirs(class_dir) else class_dir


def list_sources(
    tree: Tree, class_dirs: dict[str, str], class_names: Sequence[str]
) -> tuple[list[Source], list[dict[str, str]]]:
    """All candidate images, sorted by (label, path), with unique keys; and the files skipped: not named
    like images, or not regular files of at most `MAX_INPUT_BYTES` (sub-folders such as `masks/` and
    hidden files are not listed at all)."""
    found: list[tuple[str, int, str, str]] = []  # class, label, rel, path relative to the image folder
    skipped: list[dict[str, str]] = []
    for label, c in enumerate(class_names):
        if c not in class_dirs:
            continue
        try:
            folder = image_dir(tree, class_dirs[c])
            names = tree.file_names(folder)
        except OSError as e:
            raise InputError(f"{tree.describe(class_dirs[c])} cannot be read: {e.strerror or e}") from None
        for name in names:
            rel = f"{folder}/{name}"
            if posixpath.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                skipped.append({"path": rel, "reason": f"not a {'/'.join(IMAGE_SUFFIXES)} file"})
            elif (why := tree.unreadable(rel)) is not None:  # a FIFO, a link to /dev/zero, 2 GB
                skipped.append({"path": rel, "reason": why})
            else:
                found.append((c, label, rel, name))
    keys = assign_keys([(c, name) for c, _, _, name in found])
    sources = [
        Source(rel=rel, class_name=c, label=label, key=k, archive=archive, name=name)
        for (c, label, rel, _), k in zip(found, keys)
        for archive, name in [tree.locate(rel)]
    ]
    return sources, skipped


def find_masks(
    tree: Tree, class_dirs: dict[str, str], sources: Sequence[Source]
) -> tuple[list[Source], list[str]]:
    """`sources` with their lung masks attached (`Source.mask_rel`, `mask_name`), and the orphans: mask
    files (rel paths, sorted) whose stem matches no file in their class's image folder (a file skipped as
    unreadable still counts: its mask is not an orphan). A class without a `masks/` folder gives its
    images no mask. Non-image files in `masks/` are not masks and are not listed."""
    by_stem: dict[tuple[str, str], list[str]] = defaultdict(list)  # (class folder, stem) -> mask rels
    orphans: list[str] = []
    for d in class_dirs.values():
        folder = f"{d}/masks"
        try:
            if "masks" not in tree.subdirs(d):
                continue
            names = tree.file_names(folder)
            image_stems = {posixpath.splitext(n)[0] for n in tree.file_names(image_dir(tree, d))}
        except OSError as e:
            raise InputError(f"{tree.describe(folder)} cannot be read: {e.strerror or e}") from None
        for name in names:
            if posixpath.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                by_stem[(d, posixpath.splitext(name)[0])].append(f"{folder}/{name}")
                if posixpath.splitext(name)[0] not in image_stems:
                    orphans.append(f"{folder}/{name}")
    out = []
    for s in sources:
        d = class_dirs[s.class_name]
        image_name = s.rel.rsplit("/", 1)[-1]
        candidates = by_stem.get((d, posixpath.splitext(image_name)[0]), [])
        exact = [m for m in candidates if m.rsplit("/", 1)[-1] == image_name]
        mask_rel = (exact or sorted(candidates) or [""])[0]
        if mask_rel:
            s = replace(s, mask_rel=mask_rel, mask_name=tree.locate(mask_rel)[1])
        out.append(s)
    return out, sorted(orphans)


def find_sheets(tree: Tree, class_names: Sequence[str], suffix: str) -> dict[str, str]:
    """Each class's metadata sheet beside the class folders, `<Class><suffix>` matched like a class folder
    (case, space and underscore ignored): class -> rel. Classes without one are absent."""
    wanted = {normalize_class_name(c): c for c in class_names}
    found: dict[str, str] = {}
    try:
        names = tree.file_names("")
    except OSError as e:
        raise InputError(f"SRC {tree.describe()} cannot be read: {e.strerror or e}") from None
    for name in names:
        if not name.lower().endswith(suffix):
            continue
        c = wanted.get(normalize_class_name(name[: -len(suffix)]))
        if c is not None and c in found:
            raise InputError(f"both {found[c]!r} and {name!r} in {tree.describe()} are sheets of class {c!r}")
        if c is not None:
            found[c] = name
    return found


def read_file(tree: Tree, rel: str) -> bytes:
    """The bytes of the regular file (or zip member) at `rel`, at most `MAX_MEMBER_BYTES`. Raises
    `InputError` naming it when it cannot be read."""
    archive, name = tree.locate(rel)
    try:
        if archive:
            return read_image_bytes(archive, name)
        return read_input_file(name)  # a FIFO or a /dev/zero link is refused before reading
    except OSError as e:
        raise InputError(f"{tree.describe(rel)} cannot be read: {e.strerror or e}") from None


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
        ext = slug(posixpath.splitext(items[i][1])[1].lstrip("."))
        key, n = f"{base[i]}-{ext}" if ext else base[i], 1
        while key in taken:
            n += 1
            key = f"{base[i]}-{ext}-{n}" if ext else f"{base[i]}-{n}"
        taken.add(key)
        keys[i] = key
    return keys


# ---------------------------------------------------------------------------------------------- read

_open_zips: dict[tuple[int, str], zipfile.ZipFile] = {}


def read_image_bytes(archive: str, name: str) -> bytes:
    """The bytes of member `name` of zip `archive` (at most `MAX_MEMBER_BYTES`).

    The archive is opened once per process and kept open: keyed by pid, so a forked worker opens its own
    file instead of sharing the parent's file offset. Raises `OSError` for a member that cannot be read
    (damaged, encrypted, compressed with an unsupported method, or too large), with the reason.
    """
    try:
        zf = _open_zips.get((os.getpid(), archive))
        if zf is None:
            zf = _open_zips[(os.getpid(), archive)] = zipfile.ZipFile(archive)
        info = zf.getinfo(name)
        if info.file_size > MAX_MEMBER_BYTES:
            raise OSError(f"{info.file_size} bytes in the zip, more than the limit of {MAX_MEMBER_BYTES}")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise OSError("a symbolic link inside the zip, not an image")
        with zf.open(info) as f:
            data = f.read(MAX_MEMBER_BYTES + 1)  # bounded even if the declared size lies
    except KeyError:
        raise OSError(f"no member {name!r} in {archive}") from None
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error) as e:
        # CRC mismatch, truncated archive or data, unsupported compression, encrypted (RuntimeError).
        raise OSError(f"cannot read it from the zip: {e}") from None
    if len(data) > MAX_MEMBER_BYTES:
        raise OSError(f"more than the limit of {MAX_MEMBER_BYTES} bytes once decompressed")
    return data


def close_archives() -> None:
    """Close the zips this process opened in `read_image_bytes` (pack calls it when done)."""
    for key in [k for k in _open_zips if k[0] == os.getpid()]:
        _open_zips.pop(key).close()
