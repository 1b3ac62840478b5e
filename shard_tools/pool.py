"""The one process pool of shard_tools (pack, verify, synth): ordered results, and no hang on any signal.

    with process_pool(workers) as pool:          # None for workers <= 1: run in this process
        for result in ordered_map(pool, fn, jobs):
            ...

Why not `multiprocessing.Pool`: its workers share queue locks, so a worker that dies while holding one (a
SIGTERM to the process group, as `timeout`, `scancel` and systemd send it; the out-of-memory killer)
leaves `Pool.terminate` waiting on that lock forever, and a task lost with its worker is waited for
forever. `concurrent.futures.ProcessPoolExecutor` notices a dead worker, but then ends the others with a
SIGTERM and joins them, which hangs if they ignore it. Here each worker has its own pipe, and nothing is
shared:

- Only the parent handles Ctrl-C and SIGTERM: workers ignore both (a signal to the process group reaches
  every worker too), so the parent's clean-up runs and the exit code is 130 or 143 every time.
- When the block ends, normally or not, the workers are killed (SIGKILL: an ignored SIGTERM would not end
  them) and reaped at once; nothing waits on a lock a dead worker held. On Linux a worker is also killed
  when the parent dies (`PR_SET_PDEATHSIG`), so none is left behind by a `kill -9`.
- A worker that dies mid-task (killed by the out-of-memory killer, a crash in a decoder) ends the map with
  `WorkerDied`: one line and exit 1, never a wait for a result that will not come.
- An exception raised by `fn` in a worker is raised again in the parent (a bug: its traceback is shown).

Workers are forked where the platform can (they start in milliseconds and need only numpy and PIL), so
`fn` and the jobs need not be importable by name; the pool is started before any thread (a progress bar)
so that forking never copies a lock another thread holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.connection
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from shard_tools.errors import CxrdistError

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WorkerDied(CxrdistError):
    """A worker process ended without finishing its task (killed, out of memory, crashed). Exit code 1."""


class _RemoteError(Exception):
    """An exception from a worker that could not be sent back as itself; holds its traceback text."""


def _worker_setup() -> None:
    # Ctrl-C and SIGTERM go to the whole process group; the parent alone decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # blocked by the parent
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _worker_main(conn: mp.connection.Connection, inherited: Sequence[mp.connection.Connection]) -> None:
    """Run chunks of jobs sent on `conn` until it sends None (or closes); send back each chunk's results."""
    _worker_setup()
    for c in inherited:  # the parent's ends of the other workers' pipes, copied by fork
        c.close()
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        fn, chunk = task
        try:
            reply = ("ok", [fn(job) for job in chunk])
        except Exception as e:
            reply = ("error", e, traceback.format_exc())
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError):
            conn.send(("error", _RemoteError(reply[2] if reply[0] == "error" else "unpicklable result"), ""))


class WorkerPool:
    """`workers` forked processes, each with its own pipe (see the module docstring). Use `process_pool`."""

    def __init__(self, workers: int):
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self._conns: list[mp.connection.Connection] = []
        self._procs: list[mp.process.BaseProcess] = []
        # Blocked while forking, so a SIGTERM cannot reach a worker before it ignores it (it would raise
        # the parent's `Terminated` there, with a traceback); the parent gets it right after.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for _ in range(workers):
                parent, child = ctx.Pipe()
                inherited = [*self._conns, parent] if ctx.get_start_method() == "fork" else []
                proc = ctx.Process(target=_worker_main, args=(child, inherited), daemon=True)
                self._procs.append(proc)
                proc.start()
                child.close()
                self._conns.append(parent)
        except BaseException:
            self.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def imap(self, fn: Callable[[Any], Any], jobs: Sequence[Any], chunksize: int = 1) -> Iterator[Any]:
        """`fn(job)` for every job, in job order. A worker gets one chunk at a time, so a send never
        blocks on a worker that is itself sending; at most 3 chunks per worker run ahead of the output."""
        chunks = [jobs[i : i + chunksize] for i in range(0, len(jobs), chunksize)]
        done: dict[int, list[Any]] = {}
        busy: dict[int, int] = {}  # worker -> chunk index it is working on
        next_chunk = next_out = 0
        while next_out < len(chunks):
            for w in range(len(self._procs)):
                ahead = next_chunk - next_out < 3 * len(self._procs)
                if w not in busy and next_chunk < len(chunks) and ahead:
                    self._conns[w].send((fn, chunks[next_chunk]))
                    busy[w], next_chunk = next_chunk, next_chunk + 1
            if next_out not in done:
                self._collect(busy, done)
                continue
            yield from done.pop(next_out)
            next_out += 1

    def _collect(self, busy: dict[int, int], done: dict[int, list[Any]]) -> None:
        """Wait for a busy worker's reply (or its death) and file it under its chunk's index."""
        waiting = {self._conns[w]: w for w in busy}
        sentinels = {p.sentinel: w for w, p in enumerate(self._procs)}
        for ready in mp.connection.wait([*waiting, *sentinels]):
            if ready in waiting:
                w = waiting[ready]
                try:
                    reply = ready.recv()
                except (EOFError, OSError, pickle.UnpicklingError):  # it died while sending
                    raise self._died(w) from None
                if reply[0] == "error":
                    raise reply[1] from _RemoteError(reply[2])
                done[busy.pop(w)] = reply[1]
                return
        raise self._died(next(sentinels[s] for s in mp.connection.wait(list(sentinels), timeout=0)))

    def _died(self, w: int) -> WorkerDied:
        proc = self._procs[w]
        proc.join(1)
        code = proc.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            how = f"was killed by {name}" + (" (the out-of-memory killer sends it)" if -code == 9 else "")
        else:
            how = f"exited with code {code}"
        return WorkerDied(f"a worker process {how} before finishing its task; nothing half-written was left")

    def close(self) -> None:
        """Kill and reap every worker (immediate: nothing they do can be waited on)."""
        for proc in self._procs:
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(OSError):
                    proc.kill()
        for proc in self._procs:
            if proc.pid is not None:  # started
                proc.join()
        for conn in self._conns:
            conn.close()


@contextlib.contextmanager
def process_pool(workers: int) -> Iterator[WorkerPool | None]:
    """A `WorkerPool` of `workers` processes, or None for `workers` <= 1 (run in this process); its
    workers are killed when the block ends, however it ends."""
    if workers <= 1:
        yield None
        return
    pool = WorkerPool(workers)
    try:
        yield pool
    finally:
        pool.close()


def ordered_map(
    pool: WorkerPool | None, fn: Callable[[Any], Any], jobs: Sequence[Any], chunksize: int | None = None
) -> Iterator[Any]:
    """`fn` over `jobs`, results in job order, in `pool` if there is one. By default chunks amortise the
    pipe's overhead, and dozens of them keep the workers evenly busy to the end."""
    if pool is None:
        return map(fn, jobs)
    return pool.imap(fn, jobs, chunksize or max(1, min(32, len(jobs) // 64)))
