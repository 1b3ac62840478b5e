"""Checkpoints: the loop state, naming, listing, saving and loading of `run.dir/checkpoints/epoch-*`.

A checkpoint is one folder, written by every rank into a hidden temporary folder, flushed to the disk
(fsync) and renamed into place by the main process, so a crash or power loss mid-save leaves the previous
checkpoint as the latest, and a torn file is refused on resume (`load_checkpoint`)::

    checkpoints/epoch-0003/                   after epoch 3
    checkpoints/epoch-0003-plus-000040/       40 micro-steps into epoch 4 (SIGTERM, Ctrl-C)
        model.safetensors  optimizer.bin  random_states_<rank>.pkl (one per rank)  [scaler.pt]
        train_state.json   the loop position (`TrainState`), never a pickle
        ema.safetensors    the EMA weights, when train.ema_decay > 0

Nothing here is unpickled unsafely: Accelerate loads its own files with ``weights_only=True``, the loop
state is JSON and weights are safetensors. Only folders whose name is exactly a checkpoint name count, so
one moved aside as `epoch-0002.bad` is never resumed from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrdist.distributed import all_ranks_ok
from shard_tools.errors import CxrdistError, InputError
from shard_tools.files import atomic_write_json, replace_dir

if TYPE_CHECKING:
    import torch

CHECKPOINTS = "checkpoints"
TRAIN_STATE_FILE = "train_state.json"
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.safetensors"  # Accelerate's save_state with safe serialization (its default)
OPTIMIZER_FILE = "optimizer.bin"
_NAME = re.compile(r"^epoch-[0-9]{4}(-plus-[0-9]{6})?$")


class CheckpointError(CxrdistError):
    """A checkpoint cannot be written; the previous one is kept. Exit 1."""


class ResumeError(InputError):
    """`--resume` cannot continue from what is in run.dir; the message says what to change. Exit 2."""


@dataclass
class TrainState:
    """Loop position and early-stopping bookkeeping. Saved as JSON in every checkpoint (never a pickle)."""

    epochs_done: int = 0
    step_in_epoch: int = 0  # micro-steps already done in epoch epochs_done + 1 (mid-epoch checkpoint)
    epoch_loss_partial: float = 0.0  # rank-mean loss sum over those steps
    optimizer_steps: int = 0
    best_value: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    world_size: int = 1  # ranks that wrote the checkpoint: resuming on another count would not be exact


def checkpoint_name(epochs_done: int, step_in_epoch: int) -> str:
    """`epoch-0003` after epoch 3; `epoch-0003-plus-000040` 40 micro-steps into epoch 4. Sorts in order."""
    name = f"epoch-{epochs_done:04d}"
    return f"{name}-plus-{step_in_epoch:06d}" if step_in_epoch else name


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Completed checkpoint folders, oldest first. Temporary (`.epoch-*.tmp`) and renamed ones never match."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator: Any, run_dir: Path, state: TrainState, ema: torch.nn.Module | None, keep: int
) -> Path:
    """Accelerate `save_state` (model, optimizer, scaler, RNG) into a temporary folder on every rank, plus
    the loop state as JSON and the EMA weights as safetensors; then one rename puts it in place and all
    but the newest `keep` checkpoints are removed. Raises `CheckpointError` on every rank together."""
    from safetensors.torch import save_file

    acc = accelerator
    ckpt_root = Path(run_dir) / CHECKPOINTS
    name = checkpoint_name(state.epochs_done, state.step_in_epoch)
    final, tmp = ckpt_root / name, ckpt_root / f".{name}.tmp"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    problem = ""
    try:
        acc.save_state(str(tmp))
        if acc.is_main_process:
            atomic_write_json(tmp / TRAIN_STATE_FILE, asdict(state))
            if ema is not None:
                ema_state = {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
                save_file(ema_state, str(tmp / EMA_FILE))
    except Exception as e:  # OSError, or the same I/O failure wrapped by torch or safetensors
        problem = f"{type(e).__name__}: {e}"
    if not problem:
        try:
            fsync_tree(tmp)  # every rank its own files: on the disk before the rename makes them the latest
        except OSError as e:
            problem = f"{type(e).__name__}: {e}"
    if not all_ranks_ok(acc, not problem):  # every rank stops here together instead of hanging
        raise CheckpointError(
            f"cannot write checkpoint {final} ({problem or 'failed on another rank'}). The previous "
            f"checkpoint in {ckpt_root} is kept: free space in run.dir, then continue with --resume."
        )
    if acc.is_main_process:
        replace_dir(tmp, final)
        _fsync_dir(ckpt_root)  # the rename itself, before older checkpoints go
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders, to the disk. Accelerate and safetensors write
    with plain buffered I/O; without this a power loss soon after the rename could leave the checkpoint
    named but with empty or partial files (the file system may commit the rename before the data)."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [*sorted(p for p in Path(folder).rglob("*") if p.is_dir()), Path(folder)]:
        _fsync_dir(path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def required_files(world_size: int, ema: bool, scaler: bool) -> list[str]:
    """What a complete checkpoint of a `world_size`-rank job holds (see the module docstring)."""
    names = [MODEL_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE]
    names += [f"random_states_{rank}.pkl" for rank in range(world_size)]
    return names + ([EMA_FILE] if ema else []) + (["scaler.pt"] if scaler else [])


def read_train_state(ckpt: Path) -> TrainState:
    """The loop state of a checkpoint. Raises `ResumeError` naming the file when it is missing or bad."""
    path = Path(ckpt) / TRAIN_STATE_FILE
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(TrainState)}
        return TrainState(**{k: v for k, v in data.items() if k in known})
    except FileNotFoundError:
        raise ResumeError(
            f"cannot resume from {ckpt}: {TRAIN_STATE_FILE} is missing. {_MOVE_ASIDE}"
        ) from None
    except (OSError, ValueError, TypeError) as e:
        raise ResumeError(
            f"cannot resume from {ckpt}: {path.name} is unreadable ({e}). {_MOVE_ASIDE}"
        ) from None


_MOVE_ASIDE = (
    "The checkpoint is incomplete or was not written by cxrdist: move it aside (rename it, e.g. to "
    "epoch-NNNN.bad) to resume from the one before it."
)


def check_complete(ckpt: Path, world_size: int, ema: bool, scaler: bool) -> TrainState:
    """Refuse a checkpoint that cannot be resumed exactly by this job: a missing file (each rank's RNG state
    included) or another number of ranks. Returns its loop state."""
    state = read_train_state(ckpt)
    if state.world_size != world_size:
        raise ResumeError(
            f"cannot resume from {ckpt}: it was written by {state.world_size} rank(s), this job has "
            f"{world_size}. Resume with {state.world_size} processes (the batches, their order and every "
            "random draw depend on the rank count), or start a new run."
        )
    missing = [name for name in required_files(world_size, ema, scaler) if not (Path(ckpt) / name).is_file()]
    if missing:
        raise ResumeError(f"cannot resume from {ckpt}: {', '.join(missing)} missing. {_MOVE_ASIDE}")
    return state


def load_checkpoint(accelerator: Any, ckpt: Path, ema: torch.nn.Module | None) -> TrainState:
    """Inverse of `save_checkpoint`, after `check_complete`. Reads only safetensors, JSON and weights-only
    torch files. Raises `ResumeError`."""
    from safetensors.torch import load_file

    scaler = getattr(accelerator, "scaler", None) is not None
    state = check_complete(ckpt, accelerator.num_processes, ema is not None, scaler)
    try:
        accelerator.load_state(str(ckpt))  # Accelerate loads its pickles with weights_only=True
        if ema is not None:
            ema.load_state_dict(load_file(str(Path(ckpt) / EMA_FILE), device=str(accelerator.device)))
    except Exception as e:  # unpickling refusals, corrupt safetensors: all mean the same to the user
        raise ResumeError(
            f"cannot resume from {ckpt}: {type(e).__name__}: {str(e).splitlines()[0][:300]}. {_MOVE_ASIDE}"
        ) from e
    return state
