"""`cxrdist.train` end to end through its real entry points: one process, two ranks, two "nodes", resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cxrdist.config import load_config

from launch import (
    ROOT,
    accelerate_launch,
    fast_overrides,
    free_port,
    launch_cmd,
    overrides,
    quiet_env,
    run_module,
)

pytestmark = pytest.mark.slow


def assert_complete_run(run_dir: Path, epochs: int) -> dict:
    for name in (
        "config.toml",
        "manifest.json",
        "metrics.jsonl",
        "test_metrics.json",
        "best/model.safetensors",
        "best/meta.json",
        "confusion_test.png",
        "curves.png",
    ):
        assert (run_dir / name).is_file(), f"{name} missing from {run_dir}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    assert (run_dir / "checkpoints" / f"epoch-{epochs:04d}").is_dir()
    meta = json.loads((run_dir / "best/meta.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert meta["classes"] == manifest["classes"] and meta["image_size"] == manifest["image_size"]
    test = json.loads((run_dir / "test_metrics.json").read_text())
    assert test["num_samples"] == manifest["splits"]["test"]["count"]
    return test


def world_size_of(run_dir: Path) -> int:
    for line in (run_dir / "config.toml").read_text().splitlines():
        if line.startswith("# world_size:"):
            return int(line.split(":")[1])
    raise AssertionError("config.toml records no world_size")


def test_one_process_end_to_end(train_shards, tmp_path):
    """Device cache, bf16 autocast, EMA and a cosine schedule, one process."""
    run_dir = tmp_path / "run"
    res = run_module(
        "cxrdist.train",
        "recipes/demo.toml",
        *fast_overrides(run_dir, train_shards, 6, "train.mixed_precision=bf16", "train.ema_decay=0.5"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    test = assert_complete_run(run_dir, 6)
    assert world_size_of(run_dir) == 1
    assert "input device cache" in res.stdout
    assert test["accuracy"] > 0.5, test  # chance is 0.25 on four balanced classes
    assert "macro avg" in res.stdout and "COVID" in res.stdout
    # The resolved config is a recipe: it loads back into the same values.
    resolved = load_config(run_dir / "config.toml")
    assert (resolved.run.dir, resolved.train.epochs, resolved.train.ema_decay) == (str(run_dir), 6, 0.5)


def test_two_ranks_end_to_end(train_shards, tmp_path):
    """Streaming from the shards, two gloo ranks."""
    run_dir = tmp_path / "run2"
    res = accelerate_launch(
        2, "cxrdist.train", "recipes/demo.toml", *fast_overrides(run_dir, train_shards, 6, "data.cache=none")
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert world_size_of(run_dir) == 2
    assert "on 2 process(es)" in res.stdout and "input streaming" in res.stdout
    test = assert_complete_run(run_dir, 6)
    assert test["accuracy"] > 0.5, test


def test_two_nodes_on_one_host_form_one_job(train_shards, tmp_path):
    """Two launchers, --num_machines 2, one process each: a 2-rank job, as on two real nodes."""
    run_dir = tmp_path / "nodes"
    port = str(free_port())
    procs = []
    for machine_rank in (0, 1):
        cmd = [
            *launch_cmd(1, "cxrdist.train")[:3],
            "--multi_gpu",
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "cxrdist.train",
            "recipes/demo.toml",
            *fast_overrides(run_dir, train_shards, 2),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (_out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert world_size_of(run_dir) == 2
    assert_complete_run(run_dir, 2)


def test_interrupted_run_resumes_to_the_same_weights(cnn_shards, tmp_path):
    """The study's seed CNN with augmentation, a cosine schedule and EMA: killed, resumed, identical."""
    extra = ("optim.schedule=cosine", "optim.warmup_epochs=1", "train.ema_decay=0.9")
    straight = tmp_path / "straight"
    res = run_module(
        "cxrdist.train", "recipes/cnn_augmented.toml", *overrides(straight, cnn_shards, 4, *extra)
    )
    assert res.returncode == 0, res.stderr[-3000:]

    # Same recipe, killed (SIGKILL: no chance to clean up) as soon as epoch 2's checkpoint lands.
    broken = tmp_path / "broken"
    cmd = [
        sys.executable,
        "-m",
        "cxrdist.train",
        "recipes/cnn_augmented.toml",
        *overrides(broken, cnn_shards, 4, *extra),
    ]
    log = tmp_path / "broken.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=quiet_env(), stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 300
    while not (broken / "checkpoints/epoch-0002").exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (broken / "checkpoints/epoch-0004").exists(), "run finished before it could be interrupted"

    res = run_module(
        "cxrdist.train",
        "recipes/cnn_augmented.toml",
        *overrides(broken, cnn_shards, 4, *extra),
        "--resume",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    assert_complete_run(broken, 4)
    a = load_file(str(straight / "checkpoints/epoch-0004/model.safetensors"))
    b = load_file(str(broken / "checkpoints/epoch-0004/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    for name in ("best/model.safetensors",):
        ea, eb = load_file(str(straight / name)), load_file(str(broken / name))
        for key in ea:
            torch.testing.assert_close(ea[key], eb[key], rtol=0, atol=0, msg=key)
    rows_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["val"]["confusion_matrix"] for r in rows_a] == [r["val"]["confusion_matrix"] for r in rows_b]


def test_run_dir_guards(cnn_shards, tmp_path):
    run_dir = tmp_path / "guard"
    res = run_module("cxrdist.train", "recipes/cnn.toml", *overrides(run_dir, cnn_shards, 1), "--resume")
    assert res.returncode == 2 and "no checkpoint" in res.stderr
    assert not run_dir.exists()  # a start that failed leaves no empty run dir behind
    res = run_module("cxrdist.train", "recipes/cnn.toml", *overrides(run_dir, cnn_shards, 1))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_module("cxrdist.train", "recipes/cnn.toml", *overrides(run_dir, cnn_shards, 1))
    assert res.returncode == 2 and "--resume" in res.stderr and "already holds an earlier run" in res.stderr


def test_non_finite_loss_stops_with_the_step(cnn_shards, tmp_path):
    run_dir = tmp_path / "nan"
    res = run_module("cxrdist.train", "recipes/cnn.toml", *overrides(run_dir, cnn_shards, 2, "optim.lr=1e12"))
    assert res.returncode == 1
    assert "non-finite loss" in res.stderr and "optimizer step" in res.stderr
    assert not (run_dir / "checkpoints/epoch-0002").exists()


def test_bad_recipe_and_bad_shards_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 'many'\n")
    res = run_module("cxrdist.train", str(bad))
    assert res.returncode == 2 and "bad.toml" in res.stderr and "epochs" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_module(
        "cxrdist.train",
        "recipes/cnn.toml",
        "--set",
        f"run.dir={tmp_path / 'r'}",
        "--set",
        f"data.shards={tmp_path / 'nowhere'}",
    )
    assert res.returncode == 2 and "nowhere" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "r").exists()


def test_training_options_accumulate_clip_smooth_weight_stop_and_log(train_shards, tmp_path):
    """Gradient accumulation, clipping, label smoothing, class weights, AdamW, a TensorBoard tracker and
    early stopping, all in one short run; then every option must have left its trace."""
    run_dir = tmp_path / "opts"
    res = run_module(
        "cxrdist.train",
        "recipes/demo.toml",
        *fast_overrides(
            run_dir,
            train_shards,
            8,
            "train.grad_accum_steps=2",
            "train.grad_clip_norm=0.5",
            "train.label_smoothing=0.1",
            "train.class_weights=true",
            "train.patience=1",
            "train.best_metric=accuracy",
            # Too small to learn anything: validation accuracy only drifts with BatchNorm's statistics,
            # so it soon fails to improve and early stopping fires.
            "optim.lr=1e-12",
            "optim.warmup_epochs=0",
            "run.log_with=['tensorboard']",
        ),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "early stop" in res.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The loop stopped exactly at the first epoch that did not beat the best so far (ties do not).
    best_so_far, stop = None, None
    for r in rows:
        if best_so_far is not None and r["val"]["accuracy"] <= best_so_far["val"]["accuracy"]:
            stop = r["epoch"]
            break
        best_so_far = r
    assert stop == len(rows) < 8, [r["val"]["accuracy"] for r in rows]
    best = best_so_far
    assert json.loads((run_dir / "test_metrics.json").read_text())["best_epoch"] == best["epoch"]
    assert json.loads((run_dir / "best/meta.json").read_text())["epoch"] == best["epoch"]
    assert list(run_dir.rglob("events.out.tfevents.*")), "no TensorBoard event file"
    # Accumulation halves the optimizer steps: 84*4/16 = 21 micro-steps -> 22 (a multiple of 2) -> 11 steps.
    state = json.loads((run_dir / "checkpoints" / f"epoch-{len(rows):04d}" / "train_state.json").read_text())
    assert state["optimizer_steps"] == 11 * len(rows)


def test_fp16_needs_a_gpu(train_shards, tmp_path):
    res = run_module(
        "cxrdist.train",
        "recipes/demo.toml",
        *fast_overrides(tmp_path / "fp16", train_shards, 1, "train.mixed_precision=fp16"),
    )
    assert res.returncode == 2 and "fp16" in res.stderr and "bf16" in res.stderr


def test_the_same_recipe_learns_alike_on_one_and_two_ranks(train_shards, tmp_path):
    """One recipe on 1 and 2 gloo ranks, the same seeds: two ranks double the global batch, the learning
    rate follows it (sqrt rule for AdamW: x 1.41, logged at start-up), and test accuracy matches within
    noise (72 test images per run, 3 seeds each)."""
    accuracy: dict[int, list[float]] = {1: [], 2: []}
    for ranks in (1, 2):
        for seed in (0, 1, 2):
            run_dir = tmp_path / f"r{ranks}s{seed}"
            sets = [
                "optim.lr_base_batch=16",  # the rate in recipes/demo.toml, as if tuned at batch 16
                f"run.seed={seed}",
                "data.num_workers=0",
                "eval.bootstrap_resamples=0",
                "eval.gradcam_per_class=0",
            ]
            args = fast_overrides(run_dir, train_shards, 4, *sets)
            res = accelerate_launch(ranks, "cxrdist.train", "recipes/demo.toml", *args, timeout=600)
            assert res.returncode == 0, res.stderr[-3000:]
            expected_lr = 2e-3 * ranks**0.5
            assert f"learning rate {expected_lr:.4g}" in res.stdout and "sqrt scaling" in res.stdout
            accuracy[ranks].append(json.loads((run_dir / "test_metrics.json").read_text())["accuracy"])
    mean = {r: sum(v) / len(v) for r, v in accuracy.items()}
    assert mean[1] > 0.45, accuracy  # the recipe learns at all (chance is 0.25)
    assert abs(mean[1] - mean[2]) <= 0.1, accuracy
