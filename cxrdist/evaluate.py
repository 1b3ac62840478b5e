"""Exact evaluation of a model on one split of the shards, on any number of ranks.

Library use (the training loop calls this every epoch)::

    metrics = evaluate_split(model, manifest, "val", EvalSettings(...), rank=r, world_size=w)

Every rank evaluates the shards `eval_batches` assigns it (possibly none), then all ranks join one
all-reduce of the confusion matrix and one gather of the scores. The result is identical on every rank and
counts every sample of the split exactly once.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from cxrdist.artifacts import ModelMeta, find_model_dir, load_trained_model
from cxrdist.augment import eval_transform
from cxrdist.cli import add_batching, add_model, check_writable_file
from cxrdist.data import Manifest, eval_batches, read_manifest, to_device
from cxrdist.metrics import all_reduce_sum, confusion_matrix, gather_rows, summarize
from shard_tools.cli import run_main
from shard_tools.errors import CxrdistError, InputError
from shard_tools.files import atomic_write_json


class EvalError(CxrdistError):
    """The evaluation did not see exactly the samples the manifest lists. Exit 1."""


@dataclass(frozen=True)
class EvalSettings:
    device: torch.device
    batch_size: int = 128
    num_workers: int = 2
    in_chans: int = 3
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None  # bf16/fp16 autocast; None = fp32
    tta_hflip: bool = False  # average the softmax of the image and its mirror image


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    manifest: Manifest,
    split: str,
    settings: EvalSettings,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Metrics dict (see `cxrdist.metrics.summarize`) plus `loss`, identical on every rank.

    `model` must be the unwrapped module: a DDP wrapper would broadcast buffers in forward, and that
    deadlocks when ranks run different numbers of eval batches (a rank may have no shard at all).
    Raises `EvalError` when the number of samples evaluated differs from the manifest's count.
    """
    was_training = model.training
    model.eval()
    k = len(manifest.classes)
    device = settings.device
    cm = torch.zeros(k, k, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    probs_parts, label_parts = [], []
    for images, labels, _keys in eval_batches(
        manifest,
        split,
        batch_size=settings.batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=settings.num_workers,
    ):
        images, labels = to_device((images, labels), device)
        x = eval_transform(images, settings.in_chans, settings.channels_last)
        with _autocast(device, settings.autocast_dtype):
            logits = model(x).float()
            if settings.tta_hflip:
                probs = (logits.softmax(1) + model(x.flip(3)).float().softmax(1)) / 2
            else:
                probs = logits.softmax(1)
        loss_sum += F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").double()
        cm += confusion_matrix(probs.argmax(1), labels, k)
        probs_parts.append(probs)
        label_parts.append(labels)
    model.train(was_training)

    # Exactly one reduction and one gather, on every rank, whatever it evaluated.
    cm = all_reduce_sum(cm)
    loss_sum = all_reduce_sum(loss_sum)
    probs = torch.cat(probs_parts) if probs_parts else torch.zeros(0, k, device=device)
    labels = torch.cat(label_parts) if label_parts else torch.zeros(0, dtype=torch.int64, device=device)
    all_probs = gather_rows(probs.float())
    all_labels = gather_rows(labels)

    seen, expected = int(cm.sum()), manifest.count(split)
    if seen != expected:
        raise EvalError(
            f"evaluated {seen} samples of split '{split}' but the manifest at {manifest.source} lists "
            f"{expected}. The shards do not match their manifest: run `python -m shard_tools.verify`."
        )
    metrics = summarize(cm.cpu(), manifest.classes, all_probs.cpu(), all_labels.cpu())
    metrics["loss"] = float(loss_sum) / max(seen, 1)
    return metrics


# ------------------------------------------------------------------------------------------------- CLI


def check_compatible(meta: ModelMeta, manifest: Manifest) -> None:
    """A model is only ever evaluated with the class order and image size it was trained on."""
    if tuple(meta.classes) != tuple(manifest.classes):
        raise InputError(
            f"the model was trained on classes {list(meta.classes)} but the shards at {manifest.source} "
            f"list {list(manifest.classes)}: labels would be misread. Evaluate on shards packed with the "
            "same classes (shard_tools.pack --classes)."
        )
    if meta.image_size != manifest.image_size:
        raise InputError(
            f"the model was trained at {meta.image_size} px but the shards at {manifest.source} are "
            f"{manifest.image_size} px. Pack them with --size {meta.image_size}."
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cxrdist.evaluate",
        description="Exact per-class evaluation of a trained model on one split of packed shards. "
        "Runs alone or under `accelerate launch` with any number of processes, with identical results.",
    )
    add_model(p)
    p.add_argument("--shards", required=True, help="directory or http(s) URL holding manifest.json")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", type=Path, help="metrics JSON to write (default: MODEL/eval_<split>.json)")
    p.add_argument("--tta", action="store_true", help="average predictions over the image and its mirror")
    add_batching(p, batch_size=128, workers=2)
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from accelerate import PartialState

    from cxrdist.plots import plot_confusion
    from cxrdist.report import print_metrics_table  # TODO(tables)

    args = parse_args(argv)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise InputError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    out = args.out or find_model_dir(args.model) / f"eval_{args.split}.json"
    check_writable_file(out)  # before the evaluation, so a long one is never thrown away
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only hosts: gloo ranks
    model, meta = load_trained_model(args.model, state.device)
    manifest = read_manifest(args.shards)
    check_compatible(meta, manifest)
    settings = EvalSettings(
        device=state.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        in_chans=meta.in_chans,
        autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision),
        tta_hflip=args.tta,
    )
    metrics = evaluate_split(
        model, manifest, args.split, settings, rank=state.process_index, world_size=state.num_processes
    )
    if state.is_main_process:
        result = {
            **metrics,
            "split": args.split,
            "shards": manifest.source,
            "model": str(find_model_dir(args.model)),
            "tta_hflip": args.tta,
        }
        atomic_write_json(out, result)
        png = plot_confusion(
            metrics["confusion_matrix"],
            manifest.classes,
            out.with_name(out.stem + "_confusion.png"),
            title=f"{args.split} split, n={metrics['num_samples']}",
        )
        console = Console(soft_wrap=True)  # paths stay on one line in logs
        print_metrics_table(
            metrics, manifest.classes, console, title=f"{args.split} split of {manifest.source}"
        )
        console.print(f"wrote {out} and {png}", highlight=False)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
