"""Ranks acting together: agreement collectives, the gathers evaluation needs, stop signals, and telling a
lost rank from a bug.

Every rank of a job must take the same branch at every collective, or the job hangs until the collective
timeout. So a decision one rank makes (its disk is full, it got SIGTERM) goes through `all_ranks_ok` or
`any_rank` first, and all ranks act on the agreed answer together. Those two take an Accelerate
`Accelerator` (or `PartialState`) as their handle on the job; the gathers (`all_reduce_sum`, `gather_rows`,
`gather_objects`) use torch.distributed's default process group and are plain copies without one, so the
same evaluation code serves one process and many. torch is imported where it is used: the module stays
importable without it (`cxrdist.report` reads run folders).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, NoReturn

from shard_tools.errors import EXIT_SIGINT, EXIT_SIGTERM, CxrdistError


def all_ranks_ok(accelerator: Any, ok: bool) -> bool:
    """True only if `ok` holds on every rank, so that all ranks fail together instead of hanging."""
    import torch  # here: the module stays importable without torch (cxrdist.report reads run folders)

    flag = torch.tensor([1 if ok else 0], device=accelerator.device)
    return bool(accelerator.gather(flag).min().item() == 1)


def any_rank(accelerator: Any, flag: bool) -> bool:
    """True if `flag` holds on any rank (one tiny all-reduce; free on one process)."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


class Preempted(CxrdistError):
    """SIGTERM or Ctrl-C: every rank finished its step and the checkpoint is saved. Exit 143 or 130."""

    label = "preempted"

    def __init__(self, signal_name: str, checkpoint: Path | None) -> None:
        super().__init__(
            f"stopped by {signal_name}; checkpoint saved to {checkpoint}. Continue with --resume."
        )
        self.signal_name = signal_name
        self.exit_code = EXIT_SIGINT if signal_name == "SIGINT" else EXIT_SIGTERM


class LostRank(CxrdistError):
    """A collective failed because another rank died or stopped answering (`lost_rank`). Exit 1."""


class Aborted(CxrdistError):
    """A second Ctrl-C while the ranks were stopping for the first: stopped at once, without a checkpoint
    (the last one saved is still complete). Exit 130."""

    exit_code = EXIT_SIGINT
    label = "stopped"


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it at optimizer-step boundaries. A second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.signal_name = ""

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal_name and signum == signal.SIGINT:
            # Impatient second Ctrl-C: stop now, without a checkpoint. A KeyboardInterrupt, which no
            # `except Exception` clean-up swallows; `cxrdist.cli.run_on_every_rank` reports it as `Aborted`.
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name


# What gloo and NCCL say when the other end of a collective is gone or silent.
_LOST_RANK_SIGNS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Timed out",
    "timed out",
    "NCCL communicator was aborted",
)


def lost_rank(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another rank died or stopped answering."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    import torch

    return isinstance(e, torch.distributed.DistError) or any(sign in str(e) for sign in _LOST_RANK_SIGNS)


def lost_rank_message(e: BaseException) -> str:
    detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return (
        f"lost contact with another rank ({detail}). It probably died (killed, out of memory, node lost): "
        "its own output says why. Continue from the last checkpoint with --resume."
    )


def is_main_launch_process() -> bool:
    """Rank 0 of the job (before any process group exists: from the launcher's environment)."""
    return os.environ.get("RANK", "0") == "0"


def rank_prefix() -> str:
    """`[rank N] ` under a launcher, so that interleaved messages of several ranks say whose they are."""
    return f"[rank {os.environ.get('RANK', '0')}] " if "WORLD_SIZE" in os.environ else ""


def exit_process(code: int) -> NoReturn:
    """End the process with `code` once the command's `main` has returned (its ``__main__`` block): as
    `sys.exit` does, non-daemon threads are joined, atexit handlers run and output is flushed, but the
    interpreter's teardown is skipped and the OS frees what it would have.

    Why: a gloo worker thread may still hold the last reference to the job's last collective when `main`
    returns (a rank that does not write the outputs leaves milliseconds after the final gather), and
    dropping it releases Python tensors, which needs the GIL. Once teardown has begun, Python < 3.14 ends
    a thread that asks for the GIL with pthread_exit, whose unwinding through gloo's noexcept destructor
    calls std::terminate: 'terminate called without an active exception', the rank dies of SIGABRT (-6)
    after its work succeeded, and the launcher fails the job. Skipping teardown also skips the exit-time
    GC walk over everything torch, torchvision and timm created at import (about 1 s on 2 cores).
    """
    import atexit
    import sys

    threading._shutdown()  # what teardown does first: join non-daemon threads (and run their exit hooks)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say there
            pass
    os._exit(code)


# ------------------------------------------------------------------------------ gathers (evaluation)

# dtypes `gather_rows` can send: its shape header names one by its index here.
_GATHER_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8")


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _comm_device(t):
    """Where tensor `t` must live for the default process group's backend."""
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend())
    if backend == "nccl":  # CUDA tensors only
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":  # CPU always works; CUDA support depends on the build and the collective
        return torch.device("cpu")
    return t.device  # "cpu:gloo,cuda:nccl" and other backends take the tensor where it is


def all_reduce_sum(t):
    """The element-wise sum of tensor `t` over all ranks, on `t`'s device; `t` itself is left unchanged.

    Every rank must call it, with the same shape and dtype. A plain copy without a process group.
    """
    if not _distributed():
        return t.clone()
    import torch.distributed as dist

    x = t.to(_comm_device(t), copy=True)
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def gather_rows(t):
    """Rows ``(N_r, ...)`` of every rank, concatenated in rank order, on every rank, on `t`'s device.

    Ranks may hold different numbers of rows, zero included (pass an empty tensor of the right trailing
    shape). Rows are padded to the longest rank for the collective and trimmed after, so nothing is
    duplicated or lost. Every rank must call it. A plain copy without a process group.
    """
    if not _distributed():
        return t.clone()
    import torch
    import torch.distributed as dist

    dtype_name = str(t.dtype).removeprefix("torch.")
    if t.dim() == 0 or t.dim() > 8 or dtype_name not in _GATHER_DTYPES:
        raise ValueError(
            f"gather_rows takes (N, ...) tensors of up to 8 dims, got {tuple(t.shape)} {t.dtype}"
        )
    device = _comm_device(t)
    x = t.to(device)
    world = dist.get_world_size()
    # Shapes first: a rank with a different trailing shape or dtype fails loudly on every rank.
    header = [t.dim(), _GATHER_DTYPES.index(dtype_name), *t.shape, *([0] * (8 - t.dim()))]
    meta = torch.tensor(header, device=device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta)
    metas_cpu = [m.cpu() for m in metas]
    layouts = {(int(m[0]), int(m[1]), tuple(m[3:].tolist())) for m in metas_cpu}
    if len(layouts) != 1:
        raise ValueError(f"gather_rows: ranks disagree on trailing shape or dtype: {sorted(layouts)}")
    sizes = [int(m[2]) for m in metas_cpu]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(t.device)


def gather_objects(items: list) -> list:
    """Every rank's list (of picklable objects, e.g. sample keys), concatenated in rank order, on every
    rank. Every rank must call it. A plain copy without a process group."""
    if not _distributed():
        return list(items)
    import torch.distributed as dist

    parts: list[list] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]
