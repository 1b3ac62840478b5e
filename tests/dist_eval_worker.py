"""Launched by tests/test_distributed_eval.py under `accelerate launch --multi_gpu --num_processes N`.

Every rank evaluates its share of the test split with a fixed fake model, then joins one all-reduce of
the confusion matrix and one gather of the scores, as `cxrdist.evaluate` does. It also runs one training
epoch with a collective per step, as DDP would: a rank with fewer steps would hang it.

Writes OUT/rank{r}.json (this rank's keys, step count) on every rank and OUT/result.json on rank 0.
Usage: dist_eval_worker.py SHARD_DIR OUT_DIR EXPECTED_WORLD_SIZE
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch


def fake_probs(images: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A deterministic stand-in for a model: class scores from two pixels' gray level, float32 (B, K).

    shardgen draws class k around gray level 40 + 50 k with noise, so this is right most of the time,
    not always: every metric gets a value that is neither 0 nor 1.
    """
    level = images[:, 0, 0, :2].float().mean(dim=1)  # (B,)
    centers = 40 + 50 * torch.arange(num_classes, dtype=torch.float32)
    logits = -((level[:, None] - centers[None, :]) / 20).square()
    return logits.softmax(dim=1)


def main() -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from cxrdist.data import eval_batches, read_manifest, steps_per_epoch, train_batches
    from cxrdist.metrics import all_reduce_sum, confusion_matrix, gather_rows, summarize

    shard_dir, out_dir, expected_world = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    # A short collective timeout: a rank stuck at a collective fails the test instead of hanging it.
    accelerator = Accelerator(
        cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))]
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
    assert world == expected_world, f"launched {world} processes, expected {expected_world}"

    manifest = read_manifest(shard_dir)
    k = len(manifest.classes)
    cm = torch.zeros(k, k, dtype=torch.int64)
    keys, probs_parts, label_parts = [], [], []
    for images, labels, batch_keys in eval_batches(
        manifest, "test", batch_size=3, rank=rank, world_size=world, num_workers=2
    ):
        probs = fake_probs(images, k)
        cm += confusion_matrix(probs.argmax(1), labels, k)
        probs_parts.append(probs)
        label_parts.append(labels)
        keys.extend(batch_keys)
    # Exactly one reduction and one gather on every rank, including a rank that evaluated nothing.
    total_cm = all_reduce_sum(cm)
    probs = torch.cat(probs_parts) if probs_parts else torch.zeros(0, k)
    labels = torch.cat(label_parts) if label_parts else torch.zeros(0, dtype=torch.int64)
    all_probs, all_labels = gather_rows(probs), gather_rows(labels)
    metrics = summarize(total_cm, manifest.classes, all_probs, all_labels)

    # One training epoch over unequal shards, with a collective per step, as gradient sync would be.
    batch_size = 2
    steps = steps_per_epoch(manifest.count("train"), batch_size * world)
    done = 0
    for images, _labels in train_batches(
        manifest,
        batch_size=batch_size,
        steps=steps,
        epoch=0,
        seed=0,
        rank=rank,
        world_size=world,
        num_workers=2,
        shuffle_buffer=8,
    ):
        all_reduce_sum(images.float().mean().reshape(1))
        done += 1
    steps_all = gather_rows(torch.tensor([done])).tolist()

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"keys": keys, "world_size": world}))
    if accelerator.is_main_process:
        result = {
            "world_size": world,
            "confusion_matrix": total_cm.tolist(),
            "metrics": metrics,
            "probs": all_probs.tolist(),
            "labels": all_labels.tolist(),
            "train_steps": steps_all,
            "expected_train_steps": steps,
        }
        (out_dir / "result.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
