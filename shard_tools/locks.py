"""One writer per output: an exclusive lock that a second writer meets at once, with the holder named.

Every command that writes a lasting output takes a lock first: `cxrdist.train` on its run.dir (the lock
file lives inside it, `.cxrdist.lock`, and stays: it also marks the folder as a cxrdist run directory),
and `shard_tools.pack`, `cxrdist.evaluate --out`, `cxrdist.explain --out`, `cxrdist.export` and
`cxrdist.report` on their output (a hidden `.<name>.lock` beside it, removed when done: OUT folders are
swapped whole, so a lock inside them would be swapped away).

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on the lock file. The operating system releases it when the
holding process ends, however it ends (a crash, SIGKILL, the OOM killer), so a dead run never blocks its
own `--resume`; nothing ever has to be cleaned up by hand. The holder writes who it is into the file (pid,
host, command, start time) so that the refused writer can say whom it waits for.

Known limit (RELIABILITY.md): on NFS, Linux emulates flock with the server's byte-range locks (NFSv4, or
NFSv3 with lockd), which do hold across nodes; a file system mounted with `nolock` (or `local_lock=all`)
keeps locks on each node only, and then two nodes can both hold "the" lock.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shard_tools.errors import CxrdistError, InputError


class Busy(InputError):
    """Another process is writing the same output. Exit 2: wait for it, or choose another output."""


class LockFailed(CxrdistError):
    """The lock file cannot be created or locked (read-only folder, no lock support). Exit 1."""


@dataclass
class Lock:
    """A held lock. `created`: this process made the lock file (so a failed start can remove it)."""

    path: Path
    fd: int
    created: bool

    def release(self, remove: bool = False) -> None:
        """Give the lock back; `remove` also deletes the file (before unlocking, so that a waiting writer
        that opened the old file notices, see `acquire`)."""
        if self.fd < 0:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1


def holder_line(path: Path) -> str:
    """Who holds the lock at `path`, from what the holder wrote: 'pid 123 on node7, started ...'."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}, command: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


def acquire(path: Path | str, what: str) -> Lock:
    """Take the exclusive lock on file `path` (created if missing) for the output `what` (used in the
    message). Raises `Busy` naming the holder, or `LockFailed`."""
    path = Path(path)
    while True:
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                continue  # removed between the two opens by a holder that finished: try again
            except OSError as e:
                raise LockFailed(f"cannot open the lock file {path} for {what} ({e.strerror})") from None
        except OSError as e:
            raise LockFailed(f"cannot create the lock file {path} for {what} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(
                f"{what} is in use by another process ({holder_line(path)}; lock {path}). Wait for it to "
                "finish or stop it, or choose another output."
            ) from None
        except OSError as e:  # ENOLCK: no lock support (an NFS mount without a lock manager)
            os.close(fd)
            raise LockFailed(f"cannot lock {path} for {what} ({e.strerror})") from None
        # A holder that removes its lock file does so while holding it; if that happened between our open
        # and our flock, we hold a lock on a file that no longer has the name: start again.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv)[:500],
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return Lock(path, fd, created)


def lock_path_beside(output: Path | str) -> Path:
    """The lock file of an output file or folder: hidden, beside it (`out/` -> `.out.lock`)."""
    output = Path(os.path.abspath(output))
    return output.with_name(f".{output.name}.lock")


@contextlib.contextmanager
def output_lock(output: Path | str, what: str) -> Iterator[Lock | None]:
    """Hold the lock of `output` (see `lock_path_beside`) for the block; the lock file is removed after.

    Where no lock file can be made (the folder is missing, unwritable, or a file), the block runs
    unlocked: it cannot write its output there either, and its own checks say so in its own words."""
    try:
        lock = acquire(lock_path_beside(output), what)
    except LockFailed:
        lock = None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release(remove=True)
