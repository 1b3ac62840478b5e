"""The run that `cxrdist.train` builds once (`setup`), and how every rank scores with its evaluation model.

`Run` is everything the epoch loop and the outputs step need; `TrainError` is a run that cannot continue.
Scoring (`score_split`, `validate`) is collective: every rank calls it with the same run and gets the same
scores, each rank scoring its share of the split. `check_data_unchanged` stops every rank together when the
shards were replaced under the run. Writes to run.dir: only `export_best` (best/ on the main process, every
rank stopping together if that fails). Shared by `cxrdist.train` (the loop) and `cxrdist.outputs` (the step
after it), so that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cxrdist.artifacts import ArtifactError, export_model, model_meta
from cxrdist.config import Config
from cxrdist.data import DataError, Manifest
from cxrdist.device_cache import DeviceCache
from cxrdist.distributed import StopFlag, all_ranks_ok
from cxrdist.evaluate import (
    AUTOCAST_DTYPES,
    ScoringSettings,
    SplitScores,
    evaluate_split,
    probabilities,
    split_metrics,
)
from cxrdist.rundir import BEST_DIR
from shard_tools.errors import CxrdistError


class TrainError(CxrdistError):
    """The run cannot continue (a non-finite loss, a failed export); the message says why and what to do."""


@dataclass
class Run:
    """Everything the epoch loop needs, built once by `setup`."""

    cfg: Config
    accelerator: Any
    manifest: Manifest
    model: torch.nn.Module  # prepared (DDP / compiled) module used for training
    raw_model: torch.nn.Module  # the plain module: evaluation and export
    ema: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    weight: torch.Tensor | None
    cache: DeviceCache | None  # the train split on the device (data.cache = "device"), else None
    val_cache: DeviceCache | None  # the val split too, when both fit data.cache_max_gb
    run_dir: Path
    in_chans: int  # model.in_chans resolved (1 or 3)
    channels_last: bool  # train.channels_last resolved for this device and model
    steps: int  # micro-batches per epoch per rank
    mixed_precision: str  # train.mixed_precision resolved for this device: "no", "bf16" or "fp16"
    peak_lr: float  # optim.lr scaled to the global batch (cxrdist.optim.scaled_lr)
    total_optimizer_steps: int
    warmup_steps: int
    stop: StopFlag
    generator: torch.Generator  # augmentation draws, on the device; re-seeded every step
    data_identity: str | None  # sha256 of the local manifest.json read at start (`check_data_unchanged`)


def say(accelerator: Any, message: str) -> None:
    """Print on the job's main process only (`accelerator.print` prints once per node)."""
    if accelerator.is_main_process:
        print(message, flush=True)


def manifest_identity(manifest: Manifest) -> str | None:
    """sha256 of a local manifest.json as it is now; None for a remote one (not watched)."""
    import hashlib

    location = Path(manifest.source)
    if not location.is_file():
        return None
    try:
        return hashlib.sha256(location.read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def check_data_unchanged(run: Run, when: str) -> None:
    """Stop, on every rank together, when the shards were replaced while this run read them (`pack --force`
    into data.shards): the epoch may have mixed two datasets, and test images may have been trained on."""
    acc = run.accelerator
    changed = acc.is_main_process and manifest_identity(run.manifest) != run.data_identity
    if not all_ranks_ok(acc, not changed):
        raise DataError(
            f"{run.manifest.source} changed while this run read its shards (replaced during {when}: two "
            f"datasets may be mixed, test images may have been trained on). Nothing of {when} was recorded. "
            "Restore the original shards and continue with --resume, or start a new run on the new ones."
        )


def eval_settings(run: Run, tta: bool = False) -> ScoringSettings:
    """How the run scores a split: on its device, channels and precision, so that the numbers are the
    model's as trained."""
    cfg = run.cfg
    return ScoringSettings(
        device=run.accelerator.device,
        batch_size=cfg.train.eval_batch_size or 2 * cfg.train.per_device_batch_size,
        num_workers=cfg.data.num_workers,
        in_chans=run.in_chans,
        channels_last=run.channels_last,
        autocast_dtype=AUTOCAST_DTYPES.get(run.mixed_precision),
        tta_hflip=tta,
        lung_focus=cfg.data.lung_focus,
    )


def best_meta(run: Run, epoch: int, val_metrics: dict) -> dict:
    """best/meta.json for the evaluation model after `epoch` (layout: `cxrdist.artifacts.model_meta`)."""
    training = {
        "epoch": epoch,
        "ema": run.ema is not None,
        "best_metric": run.cfg.train.best_metric,
        "val_metrics": val_metrics,
    }
    manifest = run.manifest
    return model_meta(
        run.cfg.model.name,
        run.in_chans,
        manifest.classes,
        manifest.image_size,
        training,
        lung_focus=run.cfg.data.lung_focus,
        mixed_precision=run.mixed_precision,  # eval_settings' autocast: evaluate's default
    )


def eval_model(run: Run) -> torch.nn.Module:
    return run.ema if run.ema is not None else run.raw_model


def score_split(run: Run, split: str, tta: bool = False) -> SplitScores:
    """Per-sample scores of the evaluation model (EMA if enabled) on `split`; the same on every rank."""
    acc = run.accelerator
    return evaluate_split(
        eval_model(run),
        run.manifest,
        split,
        eval_settings(run, tta),
        rank=acc.process_index,
        world_size=acc.num_processes,
        cache=run.val_cache if split == "val" else None,
    )


def validate(run: Run) -> dict:
    """The per-epoch validation metrics (raw softmax, no intervals: cheap)."""
    scores = score_split(run, "val")
    return split_metrics(scores, run.manifest.classes, probabilities(scores))


def export_best(run: Run, epoch: int, val: dict) -> dict[str, torch.Tensor]:
    """Keep the evaluation model's weights as the best so far, and write best/ (main process); every rank
    stops together if that fails."""
    acc = run.accelerator
    best_state = {k: v.detach().cpu().clone() for k, v in eval_model(run).state_dict().items()}
    problem = ""
    if acc.is_main_process:
        try:
            export_model(best_state, best_meta(run, epoch, val), run.run_dir / BEST_DIR)
        except ArtifactError as e:
            problem = str(e)
    if not all_ranks_ok(acc, not problem):
        raise TrainError(problem or "the main process could not write best/; see its message")
    return best_state
