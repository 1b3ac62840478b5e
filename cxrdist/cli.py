"""The arguments cxrdist's commands share, each defined once: recipe overrides, the model to use, images,
batch size, workers and the device.

Errors, exit codes and printing are `shard_tools.cli` / `shard_tools.errors` (one contract for both
packages): a command is ``def main(argv) -> int`` run as ``sys.exit(run_main(main))``; one that every rank
of a job runs (`cxrdist.train`) goes through `run_on_every_rank`, the same contract told rank by rank.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from shard_tools.cli import non_negative_int, positive_int, print_problem, run_main
from shard_tools.errors import InputError
from shard_tools.images import IMAGE_SUFFIXES

SILENT_RANK_EXIT_DELAY_S = 5.0  # see run_on_every_rank


def run_on_every_rank(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """`shard_tools.cli.run_main` for a command that every rank of a job runs (``accelerate launch -m
    cxrdist.train``). Each line names its rank; what every rank meets alike (a bad recipe, a stop that all
    ranks checkpointed together) is said once, by rank 0; a collective failing because another rank died
    is one line and exit 1 (`LostRank`), not a traceback; a second Ctrl-C is `Aborted` (no checkpoint)."""
    from cxrdist.config import ConfigError
    from cxrdist.distributed import (
        Aborted,
        LostRank,
        Preempted,
        is_main_launch_process,
        lost_rank,
        lost_rank_message,
        rank_prefix,
    )

    def on_this_rank(argv: Sequence[str] | None) -> int:
        try:
            return main(argv)
        except KeyboardInterrupt:  # the first Ctrl-C stops the loop with a checkpoint (StopFlag)
            raise Aborted("interrupted by a second Ctrl-C, without a checkpoint") from None
        except RuntimeError as e:
            if not lost_rank(e):
                raise
            raise LostRank(lost_rank_message(e)) from None

    def say(message: object, label: str = "error", style: str = "red") -> None:
        if isinstance(message, (ConfigError, Preempted)) and not is_main_launch_process():
            # torchrun stops every rank as soon as one exits: a silent rank leaving first would get rank 0
            # killed before it says the line. Let rank 0 exit first (it is stopped with us if it is slower).
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # being stopped now is the expected end: silent
            time.sleep(SILENT_RANK_EXIT_DELAY_S)
            return
        if isinstance(message, (Preempted, Aborted)):
            style = "yellow"
        print_problem(message, f"{rank_prefix()}{label}", style)

    return run_main(on_this_rank, argv, say=say)


def add_overrides(p: argparse.ArgumentParser, what: str = "the recipe") -> None:
    """`--set section.key=value` (repeatable), applied over the recipe by `cxrdist.config.load_config`."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override one value of {what}, e.g. --set train.epochs=2 (repeatable)",
    )


def add_model(p: argparse.ArgumentParser, onnx: bool = False) -> None:
    what = "run directory (uses its best/) or a directory with model.safetensors + meta.json"
    p.add_argument("model", help=what + (", or a .onnx file from cxrdist.export" if onnx else ""))


def add_inputs(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "inputs",
        nargs="+" if required else "*",
        metavar="IMAGE_OR_DIR",
        help="images (.png, .jpg, .dcm, ...), or folders searched recursively",
    )


def find_images(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named directly (any suffix) plus image files found under folders; and inputs that are missing.

    Each file once, where it is first met: `predict x.png .` (a folder holding x.png) or a symlink to a file
    also named does not predict it twice (compared by resolved path)."""
    files, missing = [], []
    for item in inputs:
        path = Path(item)
        # Not only regular files: a FIFO or a link to /dev/zero named like an image is listed, so that
        # `images.load_gray` refuses it by name ("not a regular file") instead of it vanishing silently.
        if path.is_dir():
            files += sorted(
                p for p in path.rglob("*") if not p.is_dir() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.exists():
            files.append(path)
        else:
            missing.append((item, "no such file or directory"))
    seen: set[Path] = set()
    unique = []
    for path in files:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique, missing


def refuse_existing(paths: Sequence[Path], force: bool, what: str = "--out") -> None:
    """No-clobber (README, "Exit codes"): a command replaces files that already exist only with `--force`.
    `paths`: every file the command is about to write. Call it before any long work."""
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more file(s) it would write)" if len(existing) > 1 else ""
        raise InputError(
            f"{existing[0]} already exists{more}; pass --force to replace, or choose another {what}"
        )


def add_batching(p: argparse.ArgumentParser, batch_size: int, workers: int | None = None) -> None:
    p.add_argument(
        "--batch-size", type=positive_int, default=batch_size, help=f"images per batch (default {batch_size})"
    )
    if workers is not None:
        p.add_argument(
            "--num-workers",
            type=non_negative_int,
            default=workers,
            help=f"loader processes per rank (default {workers}; 0 = in the main process)",
        )


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)"
    )


def resolve_device(name: str | None):
    """The torch device for `--device`; InputError (exit 2) for an unknown name or a GPU that is absent."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: this machine has no CUDA GPU available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise InputError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def check_writable_file(path: Path, what: str = "--out") -> None:
    """Fail before long work when `path` cannot be written: its folder is missing or read-only, or it is a
    folder. (A probe file is created and removed in the target folder.)"""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{path.name}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(
            f"{what} {path} cannot be written ({e.strerror or e}); choose another path"
        ) from None
