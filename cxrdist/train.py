"""Train a chest X-ray classifier on WebDataset shards, on one CPU or many GPUs, through Accelerate.

    accelerate launch -m cxrdist.train recipes/resnet18_pretrained.toml --set train.epochs=5
    python -m cxrdist.train recipes/demo.toml            # one process, no launcher needed
    accelerate launch -m cxrdist.train RECIPE --resume   # continue from the run's latest checkpoint
    python -m cxrdist.train RECIPE --overwrite           # replace an earlier run in run.dir

Data path per step: uint8 batch from the shards (or the device cache) -> device -> augment + normalise on
the device -> model under autocast -> loss. The pieces: `cxrdist.data` (batches), `cxrdist.augment`,
`cxrdist.models`, `cxrdist.optim` (step maths), `cxrdist.checkpoint`, `cxrdist.rundir` (what run.dir holds),
`cxrdist.distributed` (ranks agreeing and stopping together), `cxrdist.evaluate`, `cxrdist.trainrun` (the
`Run` and scoring with its model), `cxrdist.outputs` (what is written once the last epoch has ended). This
module wires them into `setup`, the loop (`train_one_epoch`, `fit`) and one call to the outputs step, and is,
with the CLIs, the only one that touches Accelerate's state.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

# OpenMP threads (libgomp, torch's CPU thread pool) spin while they wait for each other by default. Next to
# the loader workers, or anything else busy on the machine, a spinning thread holds the core that a
# descheduled one needs: on 2 cores a training step ran 2-8x slower beside one busy process. Sleeping
# instead cost nothing measurable on an idle CPU (BENCHMARKS.md). Only takes effect before torch loads
# libgomp, i.e. when this module is the entry point (`python -m cxrdist.train`); a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402 - after the environment variable it reads at load

from cxrdist.artifacts import provenance  # noqa: E402
from cxrdist.augment import train_transform  # noqa: E402
from cxrdist.checkpoint import (  # noqa: E402
    CHECKPOINTS,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cxrdist.cli import add_overrides, run_on_every_rank  # noqa: E402
from cxrdist.config import Config, config_to_dict, load_config  # noqa: E402
from cxrdist.data import DataError, Manifest, read_manifest, steps_per_epoch, to_device  # noqa: E402
from cxrdist.data import train_batches as stream_train_batches  # noqa: E402
from cxrdist.device_cache import DeviceCache  # noqa: E402
from cxrdist.distributed import (  # noqa: E402
    Preempted,
    StopFlag,
    all_ranks_ok,
    any_rank,
    exit_process,
)
from cxrdist.lungs import focus  # noqa: E402
from cxrdist.models import check_input_size, create_model, input_channels  # noqa: E402
from cxrdist.optim import (  # noqa: E402
    build_optimizer,
    class_weights,
    ema_update,
    improved,
    loss_fn,
    lr_at,
    lr_scaling_rule,
    resolve_channels_last,
    scaled_lr,
)
from cxrdist.outputs import write_outputs  # noqa: E402
from cxrdist.rng import derive_seed  # noqa: E402
from cxrdist.rundir import (  # noqa: E402
    BEST_DIR,
    METRICS_FILE,
    RunDirClaim,
    append_metrics_row,
    check_same_data,
    check_space,
    prepare_run_dir,
    read_metrics_rows,
    release_run_dir,
    write_run_header,
)
from cxrdist.runtime import configure_device, keep_freed_memory, make_accelerator  # noqa: E402, F401
from cxrdist.trainrun import (  # noqa: E402
    Run,
    TrainError,
    check_data_unchanged,
    export_best,
    manifest_identity,
    say,
    validate,
)
from shard_tools.cli import raise_if_terminated, stdout_console  # noqa: E402
from shard_tools.errors import EXIT_OK, InputError  # noqa: E402
from shard_tools.files import atomic_write_text  # noqa: E402
from shard_tools.schema import SPLITS  # noqa: E402

# Host syncs (`.item()`, the stop-flag all-reduce) happen every this many optimizer steps and at the end of
# an epoch, not every step: each one makes the host wait for the device, which then idles while the host
# queues the next step. Ranks therefore stop up to this many steps after a signal (seconds at most).
SYNC_EVERY = 10


# ------------------------------------------------------------------------------------------ run setup


def verify_shards(accelerator: Any, manifest: Manifest) -> None:
    """sha256 and size of every local shard against the manifest, before any is used (main process)."""
    from shard_tools.verify import check_checksums

    problems: list[str] = []
    if accelerator.is_main_process:
        location = Path(manifest.source)
        if location.exists():
            problems = check_checksums(location.parent, manifest.data)
            say(accelerator, f"data.verify_checksums: {'FAILED' if problems else 'all shards match'}")
        else:  # remote: hashing would mean downloading every shard twice
            say(accelerator, f"data.verify_checksums: {manifest.source} is remote; checksums not verified")
    if not all_ranks_ok(accelerator, not problems):
        shown = "; ".join(problems[:5]) or "see the main process's output"
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(
            f"shards at {manifest.source} do not match their manifest: {shown}{more}. Repack them, or "
            "restore the damaged files, then run `python -m shard_tools.verify`."
        )


def check_data_fits(cfg: Config, manifest: Manifest, world: int, device: torch.device) -> None:
    """Refuse at start what would otherwise fail an epoch or more later: a split without images (no best
    epoch can be chosen without val, nothing reported without test), or a per-device batch whose input
    tensors alone exceed the device's memory."""
    empty = [split for split in SPLITS if manifest.count(split) == 0]
    if empty:
        raise InputError(
            f"{manifest.source}: no images in the {' and '.join(empty)} split{'s'[: len(empty) - 1]}; "
            "training needs train images, val images to choose the best epoch and test images to "
            "report on. Pack again with a --split that gives every split images (e.g. 0.8,0.1,0.1), or "
            "with more images per class or group."
        )
    # A batch larger than the train split is allowed (one partial batch an epoch: small smoke runs use
    # recipe defaults), but the device cache draws a sample order as long as the batch asked for.
    batch = cfg.train.per_device_batch_size
    eval_batch = cfg.train.eval_batch_size or 2 * batch
    # uint8 on the host, float32 on the device per channel: a lower bound, before any activation.
    input_bytes = max(batch, eval_batch) * manifest.image_size**2 * (1 + 4 * 3)
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if input_bytes > memory:
        raise InputError(
            f"train.per_device_batch_size {batch} (eval batch {eval_batch}) at {manifest.image_size} px: "
            f"the input tensors alone need {input_bytes / 2**30:.1f} GiB, more than the "
            f"{memory / 2**30:.1f} GiB of {device} (the train split holds {manifest.count('train')} images); "
            "lower it (use train.grad_accum_steps for a large effective batch)"
        )


def config_toml(cfg: Config, world_size: int, mixed_precision: str) -> str:
    """The resolved recipe (loadable as a recipe), headed by its provenance as comments."""
    import tomli_w

    header = "".join(f"# {k}: {v}\n" for k, v in provenance().items())
    header += f"# world_size: {world_size}\n# mixed_precision used: {mixed_precision}\n"
    return header + tomli_w.dumps(config_to_dict(cfg))


def setup(cfg: Config, accelerator: Any, claim: RunDirClaim, resume: bool) -> Run:
    """Data, model, optimizer and loop sizes for `cfg`, after every pre-flight check. The run header goes
    into the run directory `claim` holds."""
    from accelerate.utils import set_seed

    run_dir = Path(cfg.run.dir)
    if not cfg.data.shards:
        raise InputError("data.shards is empty: set it in the recipe or with --set data.shards=DIR_OR_URL")
    manifest = read_manifest(cfg.data.shards)
    if resume:
        check_same_data(run_dir, manifest.data, manifest.source)
    check_input_size(cfg.model.name, manifest.image_size)
    check_data_fits(cfg, manifest, accelerator.num_processes, accelerator.device)
    if cfg.data.verify_checksums:
        verify_shards(accelerator, manifest)

    device = accelerator.device
    set_seed(cfg.run.seed)  # same initial weights on every rank (DDP also broadcasts them)
    in_chans = input_channels(cfg.model)
    raw_model = create_model(cfg.model, num_classes=len(manifest.classes))
    channels_last = resolve_channels_last(cfg.train.channels_last, device, cfg.model.name)
    if channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    raw_model.to(device)
    ema = copy.deepcopy(raw_model).eval().requires_grad_(False) if cfg.train.ema_decay > 0 else None

    world = accelerator.num_processes
    global_batch = cfg.train.per_device_batch_size * world * cfg.train.grad_accum_steps
    peak_lr = scaled_lr(cfg.optim, global_batch)
    optimizer = build_optimizer(raw_model, cfg.optim, peak_lr)
    check_space(accelerator, run_dir, raw_model, cfg.run.keep_checkpoints)
    model = torch.compile(raw_model) if cfg.train.compile else raw_model
    # The WebDataset loader is deliberately NOT prepared: Accelerate would re-shard or broadcast it.
    model, optimizer = accelerator.prepare(model, optimizer)

    steps = steps_per_epoch(manifest.count("train"), cfg.train.per_device_batch_size * world)
    steps = math.ceil(steps / cfg.train.grad_accum_steps) * cfg.train.grad_accum_steps
    opt_steps_per_epoch = steps // cfg.train.grad_accum_steps
    warmup_steps = round(cfg.optim.warmup_epochs * opt_steps_per_epoch)
    say(accelerator, lr_line(cfg, world, global_batch, peak_lr))

    weight = class_weights(manifest.class_counts("train")).to(device) if cfg.train.class_weights else None
    cache = val_cache = None
    if cfg.data.cache == "device":
        budget = int(cfg.data.cache_max_gb * 1e9)
        cache = DeviceCache.load(
            manifest,
            "train",
            device,
            budget,
            num_workers=cfg.data.num_workers,
            max_bad_samples=cfg.data.max_bad_samples,
        )
        # Validation every epoch from memory too, when it fits beside train (never skipping a sample:
        # evaluation is exact).
        room = budget - DeviceCache.bytes_needed(manifest, "train")
        if cache is not None and DeviceCache.bytes_needed(manifest, "val") <= room:
            val_cache = DeviceCache.load(manifest, "val", device, room, num_workers=cfg.data.num_workers)
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
        val_cache=val_cache,
        run_dir=run_dir,
        in_chans=in_chans,
        channels_last=channels_last,
        steps=steps,
        mixed_precision=accelerator.mixed_precision,
        peak_lr=peak_lr,
        total_optimizer_steps=opt_steps_per_epoch * cfg.train.epochs,
        warmup_steps=warmup_steps,
        stop=StopFlag(),
        generator=torch.Generator(device=device),
        data_identity=manifest_identity(manifest),
    )
    if accelerator.is_main_process and not resume:
        write_run_header(claim, config_toml(cfg, world, run.mixed_precision), manifest.data)
    if cfg.run.log_with:
        accelerator.init_trackers("cxrdist", config=_flat(config_to_dict(cfg)))
    return run


def lr_line(cfg: Config, world: int, global_batch: int, peak_lr: float) -> str:
    """The start-up line that says which learning rate this run uses, and why."""
    rule = lr_scaling_rule(cfg.optim)
    batch = (
        f"global batch {global_batch} = {cfg.train.per_device_batch_size} per device x {world} rank(s)"
        + (f" x {cfg.train.grad_accum_steps} accumulation steps" if cfg.train.grad_accum_steps > 1 else "")
    )
    if rule == "none":
        return f"learning rate {peak_lr:g} as written (optim.lr_base_batch = 0: no scaling); {batch}"
    return (
        f"learning rate {peak_lr:.4g}: optim.lr {cfg.optim.lr:g} was tuned for a global batch of "
        f"{cfg.optim.lr_base_batch}; {batch}; {rule} scaling"
        + (f", {cfg.optim.warmup_epochs:g} warm-up epoch(s)" if cfg.optim.warmup_epochs else "")
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


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a training step draws from (dropout and the like) on `device`.

    `torch.manual_seed` would do, but it also seeds every accelerator backend, and in a CUDA build on a
    CPU-only host it records a stack trace for lazy CUDA seeding each time: ~0.15 ms per step.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device, the one this rank trains on


def epoch_batches(run: Run, epoch: int):
    """This rank's `run.steps` batches of the epoch, from the device cache or streamed from the shards."""
    cfg, acc = run.cfg, run.accelerator
    position = {
        "batch_size": cfg.train.per_device_batch_size,
        "steps": run.steps,
        "epoch": epoch,
        "seed": cfg.run.seed,
        "rank": acc.process_index,
        "world_size": acc.num_processes,
    }
    if run.cache is not None:
        return run.cache.train_batches(**position)
    return stream_train_batches(
        run.manifest,
        **position,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        max_bad_samples=cfg.data.max_bad_samples,
    )


class NonFiniteWatch:
    """The first optimizer step of an epoch whose gradient norm was not finite, kept on the device and read
    only at sync points (reading it every step would stall the device). fp16's grad scaler skips such
    steps by itself, so there the watch is off."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled
        self.step = torch.full((), -1, dtype=torch.int64, device=device)
        self.loss = torch.zeros((), device=device)

    def record(self, grad_norm: torch.Tensor, loss: torch.Tensor, optimizer_step: int) -> None:
        if self.enabled:
            # Gradients are already all-reduced: every rank sees the same norm and stops together.
            first_bad = ~torch.isfinite(grad_norm) & (self.step < 0)
            self.step = torch.where(first_bad, optimizer_step, self.step)
            self.loss = torch.where(first_bad, loss.detach().float(), self.loss)

    def raise_if_seen(self, epoch: int, run_dir: Path) -> None:
        if self.enabled and (step := int(self.step.item())) >= 0:
            raise TrainError(
                f"non-finite loss or gradient at epoch {epoch}, optimizer step {step} (loss on this rank: "
                f"{self.loss.item():.4g}). Last good checkpoint kept in {run_dir / CHECKPOINTS}; lower "
                "optim.lr or set train.grad_clip_norm."
            )


def train_step(
    run: Run, state: TrainState, batch: Any, epoch: int, i: int, watch: NonFiniteWatch
) -> torch.Tensor:
    """One micro-step (and an optimizer step when gradients sync). Returns the loss, on the device."""
    cfg, acc = run.cfg, run.accelerator
    rank, device = acc.process_index, acc.device
    # Randomness is a function of (seed, epoch, rank, step), so a resumed run replays it exactly.
    seed_step(derive_seed("step", cfg.run.seed, epoch, rank, i), device)
    run.generator.manual_seed(derive_seed("augment", cfg.run.seed, epoch, rank, i))
    images, labels = to_device(batch, device)
    images = focus(images, cfg.data.lung_focus)  # as evaluate_split and predict do; before augmentation
    with acc.accumulate(run.model):
        x = train_transform(images, cfg.augment, run.generator, run.in_chans, run.channels_last)
        loss = loss_fn(run.model(x), labels, cfg.train, run.weight)
        acc.backward(loss)
        if acc.sync_gradients:
            lr = lr_at(
                state.optimizer_steps, run.total_optimizer_steps, run.warmup_steps, run.peak_lr, cfg.optim
            )
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            grad_norm = acc.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip_norm or math.inf)
            watch.record(grad_norm, loss, state.optimizer_steps)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss


def train_one_epoch(run: Run, state: TrainState, epoch: int, progress: Any) -> dict[str, float]:
    """One epoch of exactly `run.steps` micro-batches on every rank. Returns mean loss and images/s.

    Starts at `state.step_in_epoch` (non-zero after a mid-epoch resume). Raises `Preempted` after saving
    a checkpoint when any rank was asked to stop, and `TrainError` when a gradient norm was not finite.
    Both are checked at optimizer-step boundaries every `SYNC_EVERY` optimizer steps and at the end of
    the epoch (a single process checks its stop flag after every optimizer step: that needs no sync).
    """
    cfg, acc = run.cfg, run.accelerator
    world = acc.num_processes
    run.model.train()
    first = done = state.step_in_epoch
    watch = NonFiniteWatch(acc.device, enabled=run.mixed_precision != "fp16")
    task = progress.add_task(f"epoch {epoch}/{cfg.train.epochs}", total=run.steps, completed=first, info="")
    loss_sum = torch.full((), state.epoch_loss_partial, device=acc.device)
    start = time.perf_counter()
    for i, batch in enumerate(epoch_batches(run, epoch)):
        if i < first:
            continue  # replaying the epoch's fixed batch order up to a mid-epoch checkpoint
        loss = train_step(run, state, batch, epoch, i, watch)
        loss_sum += loss.detach()
        done = i + 1
        if not acc.sync_gradients:
            progress.update(task, completed=done)
            continue
        state.optimizer_steps += 1
        if run.ema is not None:
            ema_update(run.ema, run.raw_model, cfg.train.ema_decay)
        at_sync = state.optimizer_steps % SYNC_EVERY == 0 or done == run.steps
        info = {}
        if at_sync:
            watch.raise_if_seen(epoch, run.run_dir)
            rate = (done - first) * cfg.train.per_device_batch_size * world / (time.perf_counter() - start)
            info = {"info": f"loss {loss.item():.4f}  {rate:,.0f} img/s"}
        progress.update(task, completed=done, **info)
        # Stop only between optimizer steps, and only all ranks together (one tiny all-reduce).
        if done < run.steps and (world == 1 or at_sync) and any_rank(acc, bool(run.stop.signal_name)):
            watch.raise_if_seen(epoch, run.run_dir)  # never checkpoint weights a non-finite step touched
            state.step_in_epoch = done
            state.epoch_loss_partial = acc.reduce(loss_sum, reduction="mean").item()
            ckpt = save_checkpoint(acc, run.run_dir, state, run.ema, cfg.run.keep_checkpoints)
            progress.remove_task(task)
            raise Preempted(run.stop.signal_name or "a signal on another rank", ckpt)
    if done != run.steps:  # too few batches would leave the other ranks waiting at a collective
        raise DataError(f"training loader yielded {done} batches, expected {run.steps}")
    seconds = time.perf_counter() - start
    progress.remove_task(task)
    mean_loss = acc.reduce(loss_sum, reduction="mean").item() / run.steps
    images_seen = (run.steps - first) * cfg.train.per_device_batch_size * world
    state.step_in_epoch, state.epoch_loss_partial = 0, 0.0
    return {"train_loss": mean_loss, "images_per_s": images_seen / seconds, "epoch_seconds": seconds}


# ----------------------------------------------------------------------------------------------- train


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Run a whole recipe. Returns the run directory. A start that fails before writing any result
    leaves run.dir as it found it (`cxrdist.rundir`)."""
    accelerator = make_accelerator(cfg)
    run_dir = Path(cfg.run.dir)
    claim = prepare_run_dir(accelerator, run_dir, resume=resume, overwrite=overwrite)
    try:
        run = setup(cfg, accelerator, claim, resume)
        raise_if_terminated()  # a SIGTERM during setup that a library's import swallowed
        fit(run, resume)
    except BaseException:  # SIGTERM too: `run_main` makes it raise until `fit` installs its stop flag
        if accelerator.is_main_process:
            release_run_dir(claim, failed=not resume)
        raise
    if accelerator.is_main_process:
        release_run_dir(claim, failed=False)
    accelerator.end_training()
    return run_dir


def fit(run: Run, resume: bool) -> None:
    """The epochs, then the outputs step with the best weights (`cxrdist.outputs.write_outputs`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cfg, acc = run.cfg, run.accelerator
    metrics_path = run.run_dir / METRICS_FILE
    best_state: dict[str, torch.Tensor] | None = None
    state = TrainState(world_size=acc.num_processes)
    rows: list[dict] = []  # metrics.jsonl so far (main process)
    if resume:
        ckpt = latest_checkpoint(run.run_dir)
        state = load_checkpoint(acc, ckpt, run.ema)
        say(
            acc,
            f"resumed from {ckpt} (epoch {state.epochs_done} done, "
            f"{state.step_in_epoch} steps into the next)",
        )
        if acc.is_main_process:  # drop rows of epochs after the checkpoint: they will be redone
            rows = [r for r in read_metrics_rows(run.run_dir) if r["epoch"] <= state.epochs_done]
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))  # a torn tail too
        if state.best_epoch:
            from safetensors.torch import load_file

            best_file = run.run_dir / BEST_DIR / "model.safetensors"
            if not best_file.exists():
                raise TrainError(f"--resume: {best_file} is missing; every rank must see the run directory")
            best_state = load_file(str(best_file))

    say(
        acc,
        f"cxrdist: {cfg.model.name} on {acc.num_processes} process(es), device {acc.device}, "
        f"{run.manifest.count('train')} train images, {run.steps} steps/epoch of "
        f"{cfg.train.per_device_batch_size} per device, mixed precision {run.mixed_precision}"
        f"{', channels_last' if run.channels_last else ''}, "
        f"input {'device cache' if run.cache is not None else 'streaming'}",
    )
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=stdout_console(),
        disable=not acc.is_main_process,
    )
    metric_name = cfg.train.best_metric
    run.stop.install()
    with progress:
        for epoch in range(state.epochs_done + 1, cfg.train.epochs + 1):
            stats = train_one_epoch(run, state, epoch, progress)
            val = validate(run)
            check_data_unchanged(run, f"epoch {epoch}")
            state.epochs_done = epoch
            is_best = improved(val[metric_name], state.best_value, metric_name)
            if is_best:
                state.best_value, state.best_epoch, state.bad_epochs = val[metric_name], epoch, 0
                best_state = export_best(run, epoch, val)
            else:
                state.bad_epochs += 1
            lr = run.optimizer.param_groups[0]["lr"]
            row = {"epoch": epoch, **stats, "lr": lr, "val": val, "best": is_best}
            # The row goes in before the checkpoint: a crash between the two redoes this epoch on resume,
            # and resume drops rows past its checkpoint, so the log never loses or repeats an epoch.
            write_metrics_row(run, rows, row)
            acc.log(
                {"train/loss": stats["train_loss"], "lr": lr, "images_per_s": stats["images_per_s"]}
                | {f"val/{k}": val[k] for k in ("loss", "accuracy", "balanced_accuracy", "macro_f1")},
                step=epoch,
            )
            say(
                acc,
                f"epoch {epoch:3d}/{cfg.train.epochs}  train_loss {stats['train_loss']:.4f}  "
                f"val_loss {val['loss']:.4f}  val_acc {val['accuracy']:.4f}  val_macro_f1 "
                f"{val['macro_f1']:.4f}  {stats['images_per_s']:,.0f} img/s{'  *best*' if is_best else ''}",
            )
            save_checkpoint(acc, run.run_dir, state, run.ema, cfg.run.keep_checkpoints)
            if any_rank(acc, bool(run.stop.signal_name)):  # a signal during evaluation or saving
                raise Preempted(
                    run.stop.signal_name or "a signal on another rank", latest_checkpoint(run.run_dir)
                )
            if cfg.train.patience and state.bad_epochs >= cfg.train.patience:
                say(acc, f"early stop: no {metric_name} improvement for {state.bad_epochs} epochs")
                break

    write_outputs(run, state, best_state)


def write_metrics_row(run: Run, rows: list[dict], row: dict) -> None:
    """Add this epoch's row to metrics.jsonl (main process, atomically); every rank stops together,
    before the checkpoint, if that fails (a full disk)."""
    acc, problem = run.accelerator, ""
    if acc.is_main_process:
        try:
            append_metrics_row(run.run_dir, rows, row)
            rows.append(row)
        except OSError as e:
            problem = (
                f"cannot write {run.run_dir / METRICS_FILE} ({e.strerror or e}); it still holds every "
                f"epoch before {row['epoch']}. Free space in run.dir, then continue with --resume."
            )
    if not all_ranks_ok(acc, not problem):
        raise TrainError(problem or "the main process could not write metrics.jsonl; see its message")


# ------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cxrdist.train", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="TOML recipe, e.g. recipes/demo.toml")
    add_overrides(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.dir")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in run.dir: its checkpoints, best model, metrics and plots are deleted",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit codes as in the README: 0, 1 run failed, 2 bad input, 130/143 interrupted (checkpoint saved).
    Every rank of a job runs it; its errors are told as every command's are (`run_on_every_rank`)."""
    return run_on_every_rank(run_recipe, argv)


def run_recipe(argv: list[str] | None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.recipe, args.overrides)
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return EXIT_OK


if __name__ == "__main__":
    # Not sys.exit: the interpreter's teardown can kill a gloo thread mid-release (SIGABRT), see exit_process.
    exit_process(main())
