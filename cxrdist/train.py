"""Train a chest X-ray classifier on WebDataset shards, on one CPU or many GPUs, through Accelerate.

    accelerate launch -m cxrdist.train recipes/resnet18_pretrained.toml --set train.epochs=5
    python -m cxrdist.train recipes/demo.toml            # one process, no launcher needed
    accelerate launch -m cxrdist.train RECIPE --resume   # continue from the run's latest checkpoint

Data path per step: uint8 batch from the shards (or the device cache) -> device -> augment + normalise on
the device -> model under autocast -> loss. Only this module and the CLIs touch Accelerate's state.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

# OpenMP threads (libgomp, torch's CPU thread pool) spin while they wait for each other by default. Next to
# the loader workers, or anything else busy on the machine, a spinning thread holds the core that a
# descheduled one needs: on 2 cores a training step ran 2-8x slower beside one busy process. Sleeping
# instead cost nothing measurable on an idle CPU (BENCHMARKS.md). Only takes effect before torch loads
# libgomp, i.e. when this module is the entry point (`python -m cxrdist.train`); a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cxrdist.artifacts import (
    ArtifactError,
    atomic_write_json,
    atomic_write_text,
    export_model,
    provenance,
    replace_dir,
)
from cxrdist.augment import normalize_stats, train_transform
from cxrdist.config import Config, ConfigError, OptimConfig, TrainConfig, config_to_dict, load_config
from cxrdist.data import DataError, DeviceCache, Manifest, read_manifest, steps_per_epoch, to_device
from cxrdist.data import train_batches as stream_train_batches
from cxrdist.evaluate import EvalError, EvalSettings, evaluate_split
from cxrdist.models import ModelError, check_input_size, create_model
from cxrdist.report import print_problem

CHECKPOINTS = "checkpoints"
TRAIN_STATE_FILE = "train_state.json"
EMA_FILE = "ema.safetensors"
LOWER_IS_BETTER = {"loss"}


class TrainError(RuntimeError):
    """The run cannot start or continue; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- helpers


def lr_at(step: int, total_steps: int, warmup_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from 0, then constant or cosine."""
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, epoch, rank, stream): stable across runs and Python versions."""
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _cpu_has_native_bf16() -> bool:
    # Private torch helpers (2.1+); an older torch simply reports no native bf16.
    checks = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return any(check() for check in checks if check is not None)


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """`train.mixed_precision` as used on `device`: "auto" is "bf16" where bf16 matmuls and convolutions
    are native (CUDA compute capability 8.0+, CPUs with AVX512-BF16 or AMX), else "no"."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "no"
    if device.type == "cpu":
        return "bf16" if _cpu_has_native_bf16() else "no"
    return "no"


def class_weights(class_counts: list[int]) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 per training image); 0 for a class with no training image."""
    counts = torch.tensor(class_counts, dtype=torch.float32)
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, weight: torch.Tensor | None):
    if cfg.loss == "nll":  # the study: log_softmax output + NLLLoss (the same function as cross-entropy)
        return F.nll_loss(F.log_softmax(logits.float(), dim=1), labels, weight=weight)
    return F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=cfg.label_smoothing)


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


class Preempted(Exception):
    """SIGTERM or Ctrl-C: every rank finished its step and the checkpoint is saved."""

    def __init__(self, signal_name: str, checkpoint: Path) -> None:
        super().__init__(
            f"stopped by {signal_name}; checkpoint saved to {checkpoint}. Continue with --resume."
        )
        self.signal_name = signal_name


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it at optimizer-step boundaries. A second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.signal_name = ""

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self.signal_name and signum == signal.SIGINT:
            raise KeyboardInterrupt  # impatient second Ctrl-C: stop now, without a checkpoint
        self.signal_name = signal.Signals(signum).name


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, m in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
        if e.dtype.is_floating_point:
            e.lerp_(m.detach().to(e.dtype), 1.0 - decay)
        else:
            e.copy_(m)


def improved(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def checkpoint_name(epochs_done: int, step_in_epoch: int) -> str:
    """`epoch-0003` after epoch 3; `epoch-0003-plus-000040` 40 micro-steps into epoch 4. Sorts in order."""
    name = f"epoch-{epochs_done:04d}"
    return f"{name}-plus-{step_in_epoch:06d}" if step_in_epoch else name


def list_checkpoints(run_dir: Path) -> list[Path]:
    # Completed directories only: ".epoch-*.tmp" ones are half-written saves and never match.
    return sorted(p for p in (run_dir / CHECKPOINTS).glob("epoch-[0-9][0-9][0-9][0-9]*") if p.is_dir())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_metrics_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ run setup


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
    cache: DeviceCache | None
    run_dir: Path
    steps: int  # micro-batches per epoch per rank
    mixed_precision: str  # train.mixed_precision resolved for this device: "no", "bf16" or "fp16"
    stop: StopFlag
    total_optimizer_steps: int
    warmup_steps: int


def keep_freed_memory() -> None:
    """Let glibc keep freed large blocks for reuse instead of unmapping them (training on the CPU).

    By default glibc hands every block above its mmap threshold (128 KiB, adapting up to 32 MiB) back to
    the OS when it is freed, so every training step maps its activations afresh and the kernel zeroes
    each page again: on 2 cores the seed CNN's step ran 1.4-1.5x faster with the blocks kept
    (BENCHMARKS.md). The cost: the process keeps its peak memory instead of shrinking between steps.
    Nothing happens where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    if not mallopt(m_mmap_threshold, 256 << 20):  # older glibc cap it at 32 MiB
        mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)


def all_ranks_ok(accelerator, ok: bool) -> bool:
    """True only if `ok` holds on every rank, so that all ranks fail together instead of hanging."""
    flag = torch.tensor([1 if ok else 0], device=accelerator.device)
    return bool(accelerator.gather(flag).min().item() == 1)


def check_run_dir(accelerator, run_dir: Path, resume: bool) -> None:
    """Fail early, on every rank together, if the run directory is unusable for this start."""
    problem = ""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{accelerator.process_index}"
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
    except OSError as e:
        problem = f"run.dir {run_dir} is not writable ({e.strerror}). Choose another run.dir or free space."
    if not problem:
        has_ckpt = latest_checkpoint(run_dir) is not None
        if resume and not has_ckpt:
            problem = f"--resume: no checkpoint under {run_dir / CHECKPOINTS}. Start without --resume."
        elif not resume and has_ckpt:
            problem = (
                f"run.dir {run_dir} already holds checkpoints of an earlier run. Pass --resume to continue "
                "it, or set another run.dir (--set run.dir=...)."
            )
    if not all_ranks_ok(accelerator, not problem):
        raise TrainError(problem or f"another rank could not use run.dir {run_dir}; see its message")


def check_space(accelerator, run_dir: Path, model: torch.nn.Module, keep_checkpoints: int) -> None:
    """Fail before the first step, on every rank together, when run.dir cannot take this run's files.

    A checkpoint holds the weights and the optimizer state (up to twice the weights, for Adam); the run
    keeps `keep_checkpoints` of them, writes one more before deleting the oldest, and exports best/. The
    largest single file is the optimizer state, which a per-file limit (`ulimit -f`) must also allow.
    """
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    largest_file = 2 * weights + (64 << 10)  # optimizer.bin, plus its pickle framing
    needed = (keep_checkpoints + 1) * 3 * weights + weights + (16 << 20)  # + logs, plots, RNG states
    problem = ""
    free = shutil.disk_usage(run_dir).free
    file_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if free < needed:
        problem = (
            f"run.dir {run_dir} has {free / 2**20:.1f} MiB free; this run's checkpoints need about "
            f"{needed / 2**20:.1f} MiB. Free space, lower run.keep_checkpoints or choose another run.dir."
        )
    elif file_limit != resource.RLIM_INFINITY and file_limit < largest_file:
        problem = (
            f"run.dir {run_dir}: files are limited to {file_limit} bytes (ulimit -f) but a checkpoint "
            f"file of this model needs about {largest_file} bytes. Raise the limit."
        )
    if not all_ranks_ok(accelerator, not problem):
        raise TrainError(problem or f"another rank has no room in run.dir {run_dir}; see its message")


def verify_shards(accelerator, manifest: Manifest) -> None:
    """sha256 and size of every local shard against the manifest, before any is used (main process)."""
    from shard_tools.verify import check_checksums

    problems: list[str] = []
    if accelerator.is_main_process:
        location = Path(manifest.source)
        if location.exists():
            problems = check_checksums(location.parent, manifest.data)
            accelerator.print(f"data.verify_checksums: {'FAILED' if problems else 'all shards match'}")
        else:  # remote: hashing would mean downloading every shard twice
            accelerator.print(f"data.verify_checksums: {manifest.source} is remote; checksums not verified")
    if not all_ranks_ok(accelerator, not problems):
        shown = "\n  ".join(problems[:20]) or "see the main process's output"
        raise TrainError(
            f"shards at {manifest.source} do not match their manifest:\n  {shown}\n"
            "Repack them, or restore the damaged files, then run `python -m shard_tools.verify`."
        )


def write_run_header(run: Run) -> None:
    """config.toml (resolved, loadable as a recipe) and the manifest it trains on. Main process only."""
    import tomli_w

    prov = provenance()
    header = "".join(f"# {k}: {v}\n" for k, v in prov.items())
    header += f"# world_size: {run.accelerator.num_processes}\n"
    header += f"# mixed_precision used: {run.mixed_precision}\n"
    atomic_write_text(run.run_dir / "config.toml", header + tomli_w.dumps(config_to_dict(run.cfg)))
    atomic_write_json(run.run_dir / "manifest.json", run.manifest.data)


def setup(cfg: Config, resume: bool) -> tuple[Run, TrainState]:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    check_trackers(cfg.run.log_with)
    use_cuda = torch.cuda.is_available()
    local_device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    )
    mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision, local_device)
    accelerator = Accelerator(
        # Without a GPU, Accelerate only forms a process group when told it runs on CPU (gloo ranks).
        cpu=not use_cuda,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=list(cfg.run.log_with) or None,
        project_dir=cfg.run.dir,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist.timeout_s))],
    )
    device = accelerator.device
    if mixed_precision == "fp16" and device.type != "cuda":
        raise TrainError("train.mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on this device")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls/convs: same accuracy, ~2x faster
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotune once
    else:
        keep_freed_memory()

    run_dir = Path(cfg.run.dir)
    check_run_dir(accelerator, run_dir, resume)
    if not cfg.data.shards:
        raise TrainError("data.shards is empty: set it in the recipe or with --set data.shards=DIR_OR_URL")
    manifest = read_manifest(cfg.data.shards)
    check_input_size(cfg.model.name, manifest.image_size)
    if cfg.data.verify_checksums:
        verify_shards(accelerator, manifest)

    set_seed(cfg.run.seed)  # same initial weights on every rank (DDP also broadcasts them)
    raw_model = create_model(cfg.model, num_classes=len(manifest.classes))
    if cfg.train.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    raw_model.to(device)
    ema = copy.deepcopy(raw_model).eval().requires_grad_(False) if cfg.train.ema_decay > 0 else None
    optimizer = build_optimizer(raw_model, cfg.optim)
    check_space(accelerator, run_dir, raw_model, cfg.run.keep_checkpoints)
    model = torch.compile(raw_model) if cfg.train.compile else raw_model
    # The WebDataset loader is deliberately NOT prepared: Accelerate would re-shard or broadcast it.
    model, optimizer = accelerator.prepare(model, optimizer)

    world = accelerator.num_processes
    train_count = manifest.count("train")
    steps = steps_per_epoch(train_count, cfg.train.per_device_batch_size * world)
    steps = math.ceil(steps / cfg.train.grad_accum_steps) * cfg.train.grad_accum_steps
    opt_steps_per_epoch = steps // cfg.train.grad_accum_steps
    warmup_steps = round(cfg.optim.warmup_epochs * opt_steps_per_epoch)

    weight = None
    if cfg.train.class_weights:
        weight = class_weights(manifest.class_counts("train")).to(device)

    cache = None
    if cfg.data.cache == "device":
        cache = DeviceCache.load(
            manifest,
            "train",
            device,
            int(cfg.data.cache_max_gb * 2**30),
            num_workers=cfg.data.num_workers,
            max_bad_samples=cfg.data.max_bad_samples,
        )
        if cache is None:
            accelerator.print(
                f"data.cache = 'device': the train split does not fit data.cache_max_gb = "
                f"{cfg.data.cache_max_gb}; streaming from the shards instead."
            )

    state = TrainState()
    run = Run(
        cfg=cfg,
        accelerator=accelerator,
        manifest=manifest,
        model=model,
        raw_model=raw_model,
        ema=ema,
        optimizer=optimizer,
        weight=weight,
        cache=cache,
        run_dir=run_dir,
        steps=steps,
        mixed_precision=mixed_precision,
        total_optimizer_steps=opt_steps_per_epoch * cfg.train.epochs,
        warmup_steps=warmup_steps,
        stop=StopFlag(),
    )
    if accelerator.is_main_process and not resume:
        write_run_header(run)
    if cfg.run.log_with:
        accelerator.init_trackers("cxrdist", config=_flat(config_to_dict(cfg)))
    return run, state


def check_trackers(log_with: tuple[str, ...]) -> None:
    from accelerate.utils import is_tensorboard_available

    if "tensorboard" in log_with and not is_tensorboard_available():
        raise TrainError(
            "run.log_with includes 'tensorboard' but it is not installed: pip install 'cxrdist[tensorboard]' "
            "or remove it from run.log_with"
        )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = str(v) if isinstance(v, list) else v
    return out


# ------------------------------------------------------------------------------------------- the loop


# Host syncs (`.item()`, the stop-flag all-reduce) happen every this many optimizer steps and at the end of
# an epoch, not every step: each one makes the host wait for the device, which then idles while the host
# queues the next step. Ranks therefore stop up to this many steps after a signal (seconds at most).
SYNC_EVERY = 10


def any_rank(acc, flag: bool) -> bool:
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a training step draws from (dropout and the like) on `device`.

    `torch.manual_seed` would do, but it also seeds every accelerator backend, and in a CUDA build on a
    CPU-only host it records a stack trace for lazy CUDA seeding each time: ~0.15 ms per step.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device, the one this rank trains on


def train_one_epoch(run: Run, state: TrainState, epoch: int, progress: Progress) -> dict[str, float]:
    """One epoch of exactly `run.steps` micro-batches on every rank. Returns mean loss and images/s.

    Starts at `state.step_in_epoch` (non-zero after a mid-epoch resume). Raises `Preempted` after saving
    a checkpoint when any rank was asked to stop, and `TrainError` when a gradient norm was not finite.
    Both are checked at optimizer-step boundaries every `SYNC_EVERY` optimizer steps and at the end of
    the epoch (a single process checks its stop flag after every optimizer step: that needs no sync).
    """
    cfg, acc = run.cfg, run.accelerator
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    run.model.train()
    gen = torch.Generator(device=device)
    first = state.step_in_epoch
    if run.cache is not None:
        batches = run.cache.train_batches(
            batch_size=cfg.train.per_device_batch_size,
            steps=run.steps,
            epoch=epoch,
            seed=cfg.run.seed,
            rank=rank,
            world_size=world,
        )
    else:
        batches = stream_train_batches(
            run.manifest,
            batch_size=cfg.train.per_device_batch_size,
            steps=run.steps,
            epoch=epoch,
            seed=cfg.run.seed,
            rank=rank,
            world_size=world,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            max_bad_samples=cfg.data.max_bad_samples,
        )
    in_chans = cfg.model.in_chans
    task = progress.add_task(f"epoch {epoch}/{cfg.train.epochs}", total=run.steps, completed=first, info="")
    loss_sum = torch.full((), state.epoch_loss_partial, device=device)
    # First optimizer step of this epoch whose gradient norm was not finite (-1: none yet), and its loss.
    # Kept on the device and read at sync points. fp16's grad scaler skips such steps by itself.
    check_finite = run.mixed_precision != "fp16"
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    bad_loss = torch.zeros((), device=device)

    def raise_if_not_finite() -> None:
        if check_finite and (step := int(bad_step.item())) >= 0:
            raise TrainError(
                f"non-finite loss or gradient at epoch {epoch}, optimizer step {step} (loss on this rank: "
                f"{bad_loss.item():.4g}). Last good checkpoint kept in {run.run_dir / CHECKPOINTS}; lower "
                "optim.lr or set train.grad_clip_norm."
            )

    start = time.perf_counter()
    i = -1
    for i, batch in enumerate(batches):
        if i < first:
            continue  # replaying the epoch's fixed batch order up to a mid-epoch checkpoint
        # Randomness is a function of (seed, epoch, rank, step), so a resumed run replays it exactly.
        seed_step(derive_seed(cfg.run.seed, epoch, rank, i, 0), device)
        gen.manual_seed(derive_seed(cfg.run.seed, epoch, rank, i, 1))
        images, labels = to_device(batch, device)
        with acc.accumulate(run.model):
            x = train_transform(images, cfg.augment, gen, in_chans, cfg.train.channels_last)
            loss = loss_fn(run.model(x), labels, cfg.train, run.weight)
            acc.backward(loss)
            if acc.sync_gradients:
                lr = lr_at(state.optimizer_steps, run.total_optimizer_steps, run.warmup_steps, cfg.optim)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                max_norm = cfg.train.grad_clip_norm or float("inf")
                grad_norm = acc.clip_grad_norm_(run.model.parameters(), max_norm)
                if check_finite:
                    # Gradients are already all-reduced: every rank sees the same norm and stops together.
                    first_bad = ~torch.isfinite(grad_norm) & (bad_step < 0)
                    bad_step = torch.where(first_bad, state.optimizer_steps, bad_step)
                    bad_loss = torch.where(first_bad, loss.detach().float(), bad_loss)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        if not acc.sync_gradients:
            progress.update(task, completed=i + 1)
            continue
        state.optimizer_steps += 1
        if run.ema is not None:
            ema_update(run.ema, run.raw_model, cfg.train.ema_decay)
        at_sync = state.optimizer_steps % SYNC_EVERY == 0 or i == run.steps - 1
        if at_sync:
            raise_if_not_finite()
            rate = (i + 1 - first) * images.shape[0] * world / (time.perf_counter() - start)
            progress.update(task, completed=i + 1, info=f"loss {loss.item():.4f}  {rate:,.0f} img/s")
        else:
            progress.update(task, completed=i + 1)
        # Stop only between optimizer steps, and only all ranks together (one tiny all-reduce).
        if i + 1 < run.steps and (world == 1 or at_sync) and any_rank(acc, bool(run.stop.signal_name)):
            raise_if_not_finite()  # never checkpoint weights a non-finite step has touched
            state.step_in_epoch = i + 1
            state.epoch_loss_partial = acc.reduce(loss_sum, reduction="mean").item()
            ckpt = save_checkpoint(run, state)
            progress.remove_task(task)
            raise Preempted(run.stop.signal_name or "a signal on another rank", ckpt)
    if i + 1 != run.steps:  # too few batches would leave the other ranks waiting at a collective
        raise DataError(f"training loader yielded {i + 1} batches, expected {run.steps}")
    seconds = time.perf_counter() - start
    progress.remove_task(task)
    mean_loss = acc.reduce(loss_sum, reduction="mean").item() / run.steps
    images_seen = (run.steps - first) * cfg.train.per_device_batch_size * world
    state.step_in_epoch, state.epoch_loss_partial = 0, 0.0
    return {"train_loss": mean_loss, "images_per_s": images_seen / seconds, "epoch_seconds": seconds}


def eval_settings(run: Run) -> EvalSettings:
    cfg = run.cfg
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.mixed_precision)
    return EvalSettings(
        device=run.accelerator.device,
        batch_size=cfg.train.eval_batch_size or 2 * cfg.train.per_device_batch_size,
        num_workers=cfg.data.num_workers,
        in_chans=cfg.model.in_chans,
        channels_last=cfg.train.channels_last,
        autocast_dtype=dtype,
    )


def model_meta(run: Run, epoch: int, val_metrics: dict) -> dict:
    mean, std = normalize_stats(run.cfg.model.in_chans)
    return {
        "model": {"name": run.cfg.model.name, "in_chans": run.cfg.model.in_chans},
        "classes": list(run.manifest.classes),
        "image_size": run.manifest.image_size,
        "normalization": {"mean": list(mean), "std": list(std), "input": "uint8 gray / 255"},
        "epoch": epoch,
        "ema": run.ema is not None,
        "best_metric": run.cfg.train.best_metric,
        "val_metrics": val_metrics,
        "provenance": provenance(),
    }


def save_checkpoint(run: Run, state: TrainState) -> Path:
    """Accelerate `save_state` (model, optimizer, scaler, RNG) into a temporary directory on every rank,
    plus the loop state as JSON and the EMA weights as safetensors; then one rename puts it in place."""
    from safetensors.torch import save_file

    acc = run.accelerator
    ckpt_root = run.run_dir / CHECKPOINTS
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
            if run.ema is not None:
                ema_state = {k: v.detach().cpu().contiguous() for k, v in run.ema.state_dict().items()}
                save_file(ema_state, str(tmp / EMA_FILE))
    except Exception as e:  # OSError, or the same I/O failure wrapped by torch or safetensors
        problem = f"{type(e).__name__}: {e}"
    if not all_ranks_ok(acc, not problem):  # every rank stops here together instead of hanging
        raise TrainError(
            f"cannot write checkpoint {final} ({problem or 'failed on another rank'}). The previous "
            f"checkpoint in {ckpt_root} is kept: free space in run.dir, then continue with --resume."
        )
    if acc.is_main_process:
        replace_dir(tmp, final)
        for old in list_checkpoints(run.run_dir)[: -run.cfg.run.keep_checkpoints]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def load_checkpoint(run: Run, ckpt: Path) -> TrainState:
    """Inverse of `save_checkpoint`. Reads only safetensors, JSON and weights-only torch files."""
    from safetensors.torch import load_file

    try:
        run.accelerator.load_state(str(ckpt))  # Accelerate loads its pickles with weights_only=True
        state = TrainState(**json.loads((ckpt / TRAIN_STATE_FILE).read_text()))
        if run.ema is not None:
            run.ema.load_state_dict(load_file(str(ckpt / EMA_FILE), device=str(run.accelerator.device)))
    except Exception as e:  # unpickling refusals, missing files, corrupt safetensors: all mean the same
        raise TrainError(
            f"cannot resume from {ckpt}: {type(e).__name__}: {str(e)[:500]}\n"
            "The checkpoint is damaged or was not written by cxrdist. Move it aside to resume from the "
            "one before it."
        ) from e
    return state


def eval_model(run: Run) -> torch.nn.Module:
    return run.ema if run.ema is not None else run.raw_model


def evaluate_run(run: Run, split: str) -> dict:
    """Exact metrics of the evaluation model (EMA if enabled) on `split`; the same dict on every rank."""
    acc = run.accelerator
    return evaluate_split(
        eval_model(run),
        run.manifest,
        split,
        eval_settings(run),
        rank=acc.process_index,
        world_size=acc.num_processes,
    )


def train(cfg: Config, resume: bool = False) -> Path:
    """Run a whole recipe. Returns the run directory."""
    run, state = setup(cfg, resume)
    acc = run.accelerator
    metrics_path = run.run_dir / "metrics.jsonl"
    best_dir = run.run_dir / "best"
    best_state: dict[str, torch.Tensor] | None = None
    if resume:
        ckpt = latest_checkpoint(run.run_dir)
        state = load_checkpoint(run, ckpt)
        acc.print(
            f"resumed from {ckpt} (epoch {state.epochs_done} done, {state.step_in_epoch} steps into the next)"
        )
        if acc.is_main_process:  # drop rows of epochs after the checkpoint: they will be redone
            rows = [r for r in read_metrics_rows(metrics_path) if r["epoch"] <= state.epochs_done]
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        if state.best_epoch:
            from safetensors.torch import load_file

            if not (best_dir / "model.safetensors").exists():
                raise TrainError(f"--resume: {best_dir} is missing; every rank must see the run directory")
            best_state = load_file(str(best_dir / "model.safetensors"))

    acc.print(
        f"cxrdist: {cfg.model.name} on {acc.num_processes} process(es), device {acc.device}, "
        f"{run.manifest.count('train')} train images, {run.steps} steps/epoch of "
        f"{cfg.train.per_device_batch_size} per device, mixed precision {run.mixed_precision}, "
        f"input {'device cache' if run.cache is not None else 'streaming'}"
    )
    console = Console(soft_wrap=True)  # paths stay on one line in logs
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not acc.is_main_process,
    )
    metric_name = cfg.train.best_metric
    run.stop.install()
    with progress:
        for epoch in range(state.epochs_done + 1, cfg.train.epochs + 1):
            stats = train_one_epoch(run, state, epoch, progress)
            val = evaluate_run(run, "val")
            state.epochs_done = epoch
            is_best = improved(val[metric_name], state.best_value, metric_name)
            if is_best:
                state.best_value, state.best_epoch, state.bad_epochs = val[metric_name], epoch, 0
                best_state = {k: v.detach().cpu().clone() for k, v in eval_model(run).state_dict().items()}
                problem = ""
                if acc.is_main_process:
                    try:
                        export_model(best_state, model_meta(run, epoch, val), best_dir)
                    except ArtifactError as e:
                        problem = str(e)
                if not all_ranks_ok(acc, not problem):
                    raise TrainError(problem or "the main process could not write best/; see its message")
            else:
                state.bad_epochs += 1
            lr = run.optimizer.param_groups[0]["lr"]
            row = {"epoch": epoch, **stats, "lr": lr, "val": val, "best": is_best}
            # The row goes in before the checkpoint: a crash between the two redoes this epoch on resume,
            # and resume drops rows past its checkpoint, so the log never loses or repeats an epoch.
            if acc.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            acc.log(
                {"train/loss": stats["train_loss"], "lr": lr, "images_per_s": stats["images_per_s"]}
                | {f"val/{k}": val[k] for k in ("loss", "accuracy", "balanced_accuracy", "macro_f1")},
                step=epoch,
            )
            acc.print(
                f"epoch {epoch:3d}/{cfg.train.epochs}  train_loss {stats['train_loss']:.4f}  "
                f"val_loss {val['loss']:.4f}  val_acc {val['accuracy']:.4f}  val_macro_f1 "
                f"{val['macro_f1']:.4f}  {stats['images_per_s']:,.0f} img/s{'  *best*' if is_best else ''}"
            )
            save_checkpoint(run, state)
            if any_rank(acc, bool(run.stop.signal_name)):  # a signal during evaluation or saving
                raise Preempted(
                    run.stop.signal_name or "a signal on another rank", latest_checkpoint(run.run_dir)
                )
            if cfg.train.patience and state.bad_epochs >= cfg.train.patience:
                acc.print(f"early stop: no {metric_name} improvement for {state.bad_epochs} epochs")
                break

    # Test the best weights, identically on every rank.
    if best_state is not None:
        eval_model(run).load_state_dict(best_state)
    test = evaluate_run(run, "test")
    if acc.is_main_process:
        finish_outputs(run, state, test)
    acc.end_training()
    return run.run_dir


def finish_outputs(run: Run, state: TrainState, test: dict) -> None:
    """test_metrics.json and plots; print the result table. Main process only."""
    from cxrdist.plots import plot_confusion, plot_curves
    from cxrdist.report import print_metrics_table

    out = {**test, "best_epoch": state.best_epoch, "split": "test", "provenance": provenance()}
    atomic_write_json(run.run_dir / "test_metrics.json", out)
    cm_png = plot_confusion(
        test["confusion_matrix"],
        run.manifest.classes,
        run.run_dir / "confusion_test.png",
        title=f"test, best epoch {state.best_epoch}",
    )
    curves_png = plot_curves(read_metrics_rows(run.run_dir / "metrics.jsonl"), run.run_dir / "curves.png")
    console = Console(soft_wrap=True)  # paths stay on one line in logs
    print_metrics_table(
        test, run.manifest.classes, console, title=f"test split (best epoch {state.best_epoch})"
    )
    if cm_png is None:
        console.print("plots skipped: install matplotlib (pip install 'cxrdist[plots]') for PNG plots")
    console.print(f"run directory: {run.run_dir}")
    for p in (cm_png, curves_png):
        if p is not None:
            console.print(f"  {p}")


# ------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cxrdist.train", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="TOML recipe, e.g. recipes/demo.toml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one recipe value, e.g. --set train.epochs=2 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.dir")
    return p.parse_args(argv)


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
    return isinstance(e, torch.distributed.DistError) or any(sign in str(e) for sign in _LOST_RANK_SIGNS)


def _is_main_launch_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _rank_prefix() -> str:
    return f"[rank {os.environ.get('RANK', '0')}] " if "WORLD_SIZE" in os.environ else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True, soft_wrap=True)
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        if _is_main_launch_process():
            print_problem(err, e, "config error")
        return 2
    try:
        train(cfg, resume=args.resume)
    except Preempted as e:
        if _is_main_launch_process():
            print_problem(err, e, "preempted", "yellow")
        return 128 + (signal.SIGINT if e.signal_name == "SIGINT" else signal.SIGTERM)
    except (TrainError, DataError, ModelError, EvalError, ArtifactError) as e:
        print_problem(err, e, f"{_rank_prefix()}error")
        return 1
    except RuntimeError as e:
        if not lost_rank(e):
            raise
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print_problem(
            err,
            f"lost contact with another rank ({detail}). It probably died (killed, out of memory, node "
            "lost): its own output says why. Continue from the last checkpoint with --resume.",
            f"{_rank_prefix()}error",
        )
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # Interpreter shutdown garbage-collects every object torch, torchvision and timm created at import:
    # about 1 s on 2 cores, for nothing. Frozen objects are skipped by that walk (the OS frees them).
    gc.freeze()
    sys.exit(code)
