"""Exact evaluation of a model on one split of the shards, on any number of ranks.

Library use (the training loop calls this every epoch)::

    metrics = evaluate_split(model, manifest, "val", EvalSettings(...), rank=r, world_size=w)

Every rank evaluates the shards `eval_batches` assigns it (possibly none), then all ranks join one
all-reduce of the confusion matrix and one gather of the scores. The result is identical on every rank and
counts every sample of the split exactly once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cxrdist.augment import eval_transform
from cxrdist.data import Manifest, eval_batches, to_device
from cxrdist.metrics import all_reduce_sum, confusion_matrix, gather_rows, summarize


class EvalError(RuntimeError):
    """The evaluation did not see exactly the samples the manifest lists."""


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
