"""Exact distributed evaluation under the real launcher: 2 and 3 gloo ranks on CPU, 2 test shards.

Each launch runs tests/dist_eval_worker.py. The keys the ranks evaluated, taken together, must be the
split exactly; the all-reduced confusion matrix and gathered scores must equal a single-process run;
every metric must equal scikit-learn's; every rank must make the same number of training steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_eval_worker import fake_probs
from test_metrics import check_against_sklearn

from cxrdist.data import eval_batches, read_manifest
from cxrdist.stats.metrics import confusion_matrix, summarize

from launch import free_port
from shardgen import write_shards

WORKER = Path(__file__).with_name("dist_eval_worker.py")
TEST_SHARDS = [13, 9]  # 2 shards: with 3 ranks, one rank has none
TRAIN_SHARDS = [3, 17, 5]  # unequal


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_shards")
    samples = write_shards(out, {"train": TRAIN_SHARDS, "test": TEST_SHARDS}, seed=3)
    return out, samples


@pytest.fixture(scope="module")
def single_process(shards):
    """The reference: one process, one worker, the same fake model."""
    out, _ = shards
    m = read_manifest(str(out))
    probs, labels, keys = [], [], []
    for images, batch_labels, batch_keys in eval_batches(
        m, "test", batch_size=4, rank=0, world_size=1, num_workers=0
    ):
        probs.append(fake_probs(images, len(m.classes)))
        labels.append(batch_labels)
        keys.extend(batch_keys)
    probs, labels = torch.cat(probs), torch.cat(labels)
    cm = confusion_matrix(probs.argmax(1), labels, len(m.classes))
    return {
        "cm": cm,
        "probs": probs,
        "labels": labels,
        "keys": keys,
        "metrics": summarize(cm, m.classes, probs, labels),
    }


def _launch(shard_dir: Path, out: Path, world_size: int) -> dict:
    flags = (
        f"--multi_gpu --num_processes {world_size} --num_machines 1 --mixed_precision no --dynamo_backend no"
    )
    launch = [sys.executable, "-m", "accelerate.commands.launch", *flags.split()]
    cmd = [
        *launch,
        "--main_process_port",
        str(free_port()),
        str(WORKER),
        str(shard_dir),
        str(out),
        str(world_size),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_eval_is_exact(shards, single_process, tmp_path, world_size):
    shard_dir, samples = shards
    result = _launch(shard_dir, tmp_path, world_size)
    assert result["world_size"] == world_size

    # Keys, taken together, are the split exactly: no duplicate, no miss.
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert all(r["world_size"] == world_size for r in per_rank)
    keys = [k for r in per_rank for k in r["keys"]]
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(k for k, s in samples.items() if s.split == "test")
    if world_size == 3:
        assert per_rank[2]["keys"] == []  # more ranks than shards: rank 2 had nothing, yet it reduced

    # The reduced matrix and the gathered scores equal the single-process run (scores in rank order).
    assert result["confusion_matrix"] == single_process["cm"].tolist()
    probs, labels = np.array(result["probs"]), np.array(result["labels"])
    order = {k: i for i, k in enumerate(single_process["keys"])}
    reference = single_process["probs"].numpy()[[order[k] for k in keys]]
    np.testing.assert_array_equal(probs, reference)
    assert result["metrics"] == single_process["metrics"]

    # Every metric equals scikit-learn's on the same predictions.
    check_against_sklearn(result["metrics"], labels, probs.argmax(1), probs)
    assert 0 < result["metrics"]["accuracy"] < 1  # the fake model errs: metrics are not trivial

    # Same number of training steps on every rank, over unequal shards.
    assert result["train_steps"] == [result["expected_train_steps"]] * world_size
