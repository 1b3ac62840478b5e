"""Ranks acting together: agreement collectives, stop signals, and telling a lost rank from a bug.

Every rank of a job must take the same branch at every collective, or the job hangs until the collective
timeout. So a decision one rank makes (its disk is full, it got SIGTERM) goes through `all_ranks_ok` or
`any_rank` first, and all ranks act on the agreed answer together. Only `cxrdist.train` and the CLIs use
this module; it takes an Accelerate `Accelerator` (or `PartialState`) as its only handle on the job.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

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
