"""Writing outputs so that nothing half-written ever looks complete: atomic files and folder swaps.

Every output of shard_tools and cxrdist (shards, manifests, models, metrics, plots, reports) is written
under a temporary name in its target's own folder and renamed into place. A crash, Ctrl-C, SIGTERM or a full
disk leaves the previous complete output (or nothing), plus at most a hidden temporary entry that the next
run of the same command removes (`remove_stale_staging`).

Temporary names: files ``.<name>.<random>.tmp``; folders ``.<name>.tmp-<pid>-<random>`` (the pid lets a
later run tell a crashed run's leftovers from a live run's folder).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


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
    gone); return what was removed. A live run's folder is left alone."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.glob(f".{final.name}.tmp-*-*"):
        pid = p.name[len(f".{final.name}.tmp-") :].split("-", 1)[0]
        if p.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    old = final.with_name(f".{final.name}.old")
    if old.is_dir():  # a swap interrupted after moving the previous folder aside and placing the new one
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


def replace_dir(tmp_dir: Path | str, final_dir: Path | str) -> None:
    """Move a fully written `tmp_dir` to `final_dir`, replacing any previous one.

    The previous folder is renamed aside first and removed only after the new one is in place, so at every
    instant either the old or the new complete folder exists under (or beside) the final name; if the
    second rename fails, the previous folder is put back.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
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
