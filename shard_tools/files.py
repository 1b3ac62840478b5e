"""Writing outputs so that nothing half-written ever looks complete: atomic files and folder swaps.

Every output of shard_tools and cxrdist (shards, manifests, models, metrics, plots, reports) is written
under a temporary name in its target's own folder and renamed into place. A crash, Ctrl-C, SIGTERM or a full
disk leaves the previous complete output (or nothing), plus at most a hidden temporary entry that the next
run of the same command removes (`remove_stale_staging`).

Temporary names: files ``.<name>.<random>.tmp``; folders ``.<name>.tmp-<pid>-<random>``, and a previous
folder moved aside during a swap ``.<name>.tmp-<pid>-<random>.old`` (the pid lets a later run tell a
crashed run's leftovers from a live run's folder). Only names of this shape are ever removed: a user's own
``.<name>.old`` or ``.<name>.bak`` beside the output is never touched.

Reading what a user gave (an image, a CSV) goes through `read_input_file`: only a regular file, at most
`MAX_INPUT_BYTES`, checked before a byte is read. A FIFO would block forever, /dev/zero never ends, and a
sparse file can claim gigabytes; each is refused with a reason that names it instead.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

# The largest input file read: 256 MiB, far above any radiograph (a few MB) or groups CSV, and the same
# limit zip members have (`sources.MAX_MEMBER_BYTES`).
MAX_INPUT_BYTES = 256 * 2**20

_FILE_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


class RefusedInput(OSError):
    """An input file refused before reading: not a regular file, or too large. `strerror` says which."""


def input_problem(st: os.stat_result, limit: int = MAX_INPUT_BYTES) -> str | None:
    """Why a file with this `os.stat` (links followed) is not read as input; None when it may be."""
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({_FILE_KINDS.get(stat.S_IFMT(st.st_mode), 'a special file')})"
    if st.st_size > limit:
        return f"too large: {st.st_size} bytes, more than the limit of {limit} ({limit / 2**20:g} MiB)"
    return None


def read_input_file(path: Path | str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Raises `RefusedInput` for anything else (a
    FIFO, a device, a link to one, a larger file), before reading it; `OSError` when it cannot be read."""
    problem = input_problem(os.stat(path), limit)
    if problem is None:
        # O_NONBLOCK: if a FIFO took the file's place since the stat, opening it still returns at once.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            problem = input_problem(os.fstat(fd), limit)
            if problem is None:
                data = f.read(limit + 1)
                if len(data) <= limit:
                    return data
                problem = f"too large: more than the limit of {limit} bytes ({limit / 2**20:g} MiB)"
    raise RefusedInput(errno.EINVAL, problem, str(path))


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename; files get the usual umask permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600 files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def staging_dir(final: Path | str) -> Path:
    """A new, empty, hidden folder beside `final` (same filesystem, so the final rename is atomic), with
    the usual umask permissions (mkdtemp's 0700 would make the output private once renamed)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    tmp.chmod(0o777 & ~umask())
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_staging(final: Path | str) -> list[Path]:
    """Remove the temporary folders a crashed or killed run left beside `final` (those whose process is
    gone); return what was removed. A live run's folder is left alone. A previous folder that a swap
    interrupted between its two renames had moved aside is put back in place, not removed."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for p in sorted(final.parent.glob(f".{final.name}.tmp-*-*")):
        pid = p.name[len(f".{final.name}.tmp-") :].split("-", 1)[0]
        if not (p.is_dir() and not p.is_symlink() and pid.isdigit() and not _pid_alive(int(pid))):
            continue
        if p.name.endswith(".old") and not (final.exists() or final.is_symlink()):
            os.replace(p, final)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def replace_dir(tmp_dir: Path | str, final_dir: Path | str) -> None:
    """Move a fully written `tmp_dir` to `final_dir`, replacing any previous one.

    The previous folder is renamed aside first and removed only after the new one is in place, so at every
    instant either the old or the new complete folder exists under (or beside) the final name; if the
    second rename fails, the previous folder is put back.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    # A name only this call makes (see the module docstring): `.<name>.old` may be the user's own folder.
    old = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}.old")
    if final_dir.exists() or final_dir.is_symlink():
        os.replace(final_dir, old)
    try:
        os.replace(tmp_dir, final_dir)
    except BaseException:
        if (old.exists() or old.is_symlink()) and not final_dir.exists():
            os.replace(old, final_dir)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()
