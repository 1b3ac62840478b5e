"""Where a command may write its output folder OUT, and what ``--force`` may replace.

A command that writes a folder (`shard_tools.pack`, `shard_tools.synth`) builds it in a hidden staging
folder beside OUT (`files.staging_dir`) and swaps it in at the end (`files.replace_dir`). `prepare_out`
runs first, before any work:

- OUT absent, or an empty folder: fine.
- OUT a non-empty folder: refused without ``--force``; with it, replaced only if everything in it is what
  the command itself writes (`owned` says which entries are, e.g. pack's shards and manifest). Otherwise
  refused, naming a file that would be lost: ``--force`` never deletes anything else.
- OUT a file or a symbolic link: refused, even with ``--force``.
- OUT's folder not writable, or under a regular file: refused, before any work.

Every refusal is an `InputError` (exit 2) with one line naming OUT and what to do. The staging folders
a killed run left beside OUT are removed here (`files.remove_stale_staging`).

A failure while writing (disk full, a file size limit, an I/O error) is a `WriteError` (exit 1,
`write_failed`): the command removes its staging folder, so OUT keeps its previous content, or stays
absent.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from shard_tools.errors import CxrdistError, InputError
from shard_tools.files import remove_stale_staging, replace_dir, staging_dir


class WriteError(CxrdistError):
    """Writing the output failed (disk full, file size limit, I/O error). Exit code 1."""


def write_failed(out: Path, error: OSError) -> WriteError:
    """The one-line `WriteError` for an `OSError` met while writing OUT's staging folder."""
    what = f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")
    return WriteError(
        f"cannot write OUT {out}: {what}. Nothing was left half-written; free some space (or raise the "
        "file size limit) and run again, or choose another OUT"
    )


def prepare_out(out: Path, *, force: bool, foreign: Callable[[Path], list[str]], owned_what: str) -> Path:
    """Check OUT (see the module docstring) and return a new staging folder beside it.

    `foreign(out)` lists what in an existing, non-empty OUT the command did not write, (files, or
    folders with such files); `owned_what` says what it does write, for the messages ("shards and a
    manifest").
    """
    try:
        if out.is_symlink():
            raise InputError(
                f"OUT {out} is a symbolic link; give the folder itself (or a new path) so nothing behind the "
                "link is replaced"
            )
        if out.exists() and not out.is_dir():
            raise InputError(f"OUT {out} exists and is a file, not a folder; choose another OUT")
        if out.is_dir() and any(out.iterdir()):
            if not force:
                raise InputError(
                    f"OUT {out} is not empty; pass --force to replace it (only a folder of {owned_what} "
                    "is replaced), or choose another OUT"
                )
            lost = foreign(out)
            if lost:
                more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
                raise InputError(
                    f"OUT {out} holds more than {owned_what}: --force would delete {lost[0]}{more}. "
                    "Choose another OUT, or move those files away first"
                )
        remove_stale_staging(out)
        return staging_dir(out)
    except OSError as e:
        raise InputError(
            f"OUT {out} cannot be written: {_why(out, e)}; choose a folder you can write to"
        ) from None


@contextlib.contextmanager
def staged_out(
    out: Path, *, force: bool, foreign: Callable[[Path], list[str]], owned_what: str
) -> Iterator[Path]:
    """Write OUT through a staging folder: yields it (after `prepare_out`); when the block ends, it
    replaces OUT. If the block fails, the staging folder is removed and OUT keeps its previous content;
    an `OSError` becomes a one-line `WriteError`, anything else (Ctrl-C, SIGTERM) passes through."""
    tmp = prepare_out(out, force=force, foreign=foreign, owned_what=owned_what)
    try:
        yield tmp
        replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(out, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _why(out: Path, error: OSError) -> str:
    """The reason OUT cannot be made, naming the path at fault rather than a temporary name."""
    for parent in out.absolute().parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            return f"{error.strerror or error} in {parent}"
    return str(error.strerror or error)
