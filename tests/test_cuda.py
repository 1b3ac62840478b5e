"""cxrdist on a real CUDA GPU: each test runs a CUDA path and compares it with the CPU path or the eager run.

Every test is marked `cuda` and skipped where CUDA is absent (CI has no GPU, so there they all skip). On a
GPU machine: `python -m pytest -m cuda tests/test_cuda.py`, or the whole GPU check, `python -m benchmarks
--gpu` (benchmarks/gpu.py), which runs them first. Sizes are tiny: each test takes seconds, the compiled
run about a minute.

Tolerances: two CUDA training runs are not bit-identical (cuDNN autotuning, which `cxrdist.train` turns on,
and atomics in the weight-gradient kernels change the order of float sums), so runs are compared with
atol 1e-4 / rtol 1e-3 on the weights after a few dozen steps. Calibrated on the seed CNN on the CPU: a
1e-6 relative nudge to every weight left 18 SGD steps later a largest difference of 6e-7, while a resume
that lost the optimizer's momentum left 5e-3 to 9e-3.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import ROOT, fast_overrides, quiet_env, run_module

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
WEIGHTS_TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}  # module docstring


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def final_metrics(run_dir: Path) -> tuple[dict, int]:
    """(test_metrics.json, the manifest's test count) of a finished run."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return json.loads((run_dir / "test_metrics.json").read_text()), manifest["splits"]["test"]["count"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors state dict with torch.compile's `_orig_mod.` prefix taken off its keys."""
    return {k.removeprefix("_orig_mod."): v for k, v in load_file(str(path)).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], **WEIGHTS_TOLERANCE, msg=key)


def seed_cnn_sets(run_dir: Path, shards: Path, epochs: int, *extra: str) -> list[str]:
    """The demo recipe (cosine schedule with warm-up, augmentation, device cache) on the study's seed CNN
    with SGD, fp32 (TF32 as train sets it), batch 64: 6 steps an epoch on `cnn_shards`."""
    return fast_overrides(
        run_dir,
        shards,
        epochs,
        "model.name=seed_cnn",
        "optim.name=sgd",
        "optim.lr=0.01",
        "train.per_device_batch_size=64",
        *extra,
    )


# ------------------------------------------------------------------------------------------ in process


def test_channels_last_forward_matches_contiguous(monkeypatch):
    """The same weights in channels_last and NCHW give the same logits; the transforms hand channels_last
    input when asked."""
    from cxrdist.augment import eval_transform, train_transform
    from cxrdist.config import AugmentConfig, ModelConfig
    from cxrdist.models import create_model

    images = torch.randint(0, 256, (8, 1, 64, 64), dtype=torch.uint8, device=CUDA)
    x = eval_transform(images, 3, channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
    generator = torch.Generator(device=CUDA).manual_seed(0)
    xt = train_transform(images, AugmentConfig(), generator, 3, channels_last=True)
    assert xt.is_contiguous(memory_format=torch.channels_last)

    torch.manual_seed(0)
    nchw = create_model(ModelConfig(name="resnet18"), num_classes=4).to(CUDA).eval()
    nhwc = create_model(ModelConfig(name="resnet18"), num_classes=4)
    nhwc.load_state_dict(nchw.state_dict())
    nhwc = nhwc.to(CUDA, memory_format=torch.channels_last).eval()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 on both sides
    with torch.no_grad():
        expected = nchw(x.contiguous())
        got = nhwc(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_augmentation_on_cuda_matches_cpu(monkeypatch):
    """With the same per-sample parameters (drawn once, on the CPU), every augmentation gives the same
    pixels on CUDA as on the CPU. The random draws themselves differ between the devices' generators."""
    import cxrdist.augment as augment
    from cxrdist.config import AugmentConfig

    cfg = AugmentConfig(
        rotation_degrees=15.0, hflip_prob=0.5, crop_scale=(0.6, 1.0), brightness=0.2, contrast=0.2
    )
    images = torch.randint(0, 256, (16, 1, 64, 64), dtype=torch.uint8)
    params = augment.draw_params(16, cfg, torch.Generator().manual_seed(0))
    assert params.flip.any() and not params.flip.all()  # both branches of the flip are exercised
    on_cpu = augment.train_transform(images, cfg, torch.Generator().manual_seed(0), in_chans=3)

    monkeypatch.setattr(augment, "draw_params", lambda *_: type(params)(*(p.to(CUDA) for p in params)))
    on_cuda = augment.train_transform(images.to(CUDA), cfg, torch.Generator(device=CUDA), in_chans=3)
    assert on_cuda.device.type == "cuda"
    # Normalised values (std ~0.22): 2e-4 is under a twentieth of one grey level.
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=0, atol=2e-4)


def test_device_cache_on_cuda_matches_cpu(synth_shards):
    """The cache filled onto CUDA holds what the CPU cache holds; its epochs are permutations of it,
    repeatable from (seed, epoch), with each image kept with its label."""
    from cxrdist.data import DeviceCache, read_manifest, steps_per_epoch

    manifest = read_manifest(str(synth_shards))
    on_cpu = DeviceCache.load(manifest, "train", CPU, 1 << 30, num_workers=1)
    on_cuda = DeviceCache.load(manifest, "train", CUDA, 1 << 30, num_workers=1)
    assert on_cuda.images.device.type == "cuda" and on_cuda.labels.device.type == "cuda"
    assert on_cuda.keys == on_cpu.keys and len(on_cuda) == manifest.count("train")
    assert torch.equal(on_cuda.images.cpu(), on_cpu.images) and torch.equal(
        on_cuda.labels.cpu(), on_cpu.labels
    )

    n = len(on_cuda)
    batch = next(b for b in (8, 7, 6, 5, 4, 3, 2, 1) if n % b == 0)  # one epoch = one whole permutation
    steps = steps_per_epoch(n, batch)
    position = {"batch_size": batch, "steps": steps, "epoch": 3, "seed": 7, "rank": 0, "world_size": 1}
    first = list(on_cuda.train_batches(**position))
    again = list(on_cuda.train_batches(**position))
    assert len(first) == steps
    for (x, y), (x2, y2) in zip(first, again):
        assert x.device.type == "cuda" and torch.equal(x, x2) and torch.equal(y, y2)

    def pairs(batches: list) -> list[tuple[bytes, int]]:
        return sorted((img.cpu().numpy().tobytes(), int(lab)) for x, y in batches for img, lab in zip(x, y))

    # The CUDA epoch and the CPU cache's epoch hold the same (image, label) pairs, each row once; only
    # the order differs (each device's generator draws its own permutation).
    rows_of_cache = sorted(
        (img.numpy().tobytes(), int(lab)) for img, lab in zip(on_cpu.images, on_cpu.labels)
    )
    assert pairs(first) == pairs(list(on_cpu.train_batches(**position))) == rows_of_cache


def test_pinned_batches_transfer_unchanged(synth_shards):
    """The streaming loader pins its batches when asked; non-blocking copies to CUDA keep every value."""
    from cxrdist.data import read_manifest, to_device, train_batches

    manifest = read_manifest(str(synth_shards))
    batches = list(
        train_batches(
            manifest,
            batch_size=8,
            steps=3,
            epoch=1,
            seed=0,
            rank=0,
            world_size=1,
            num_workers=1,
            shuffle_buffer=32,
            pin_memory=True,
        )
    )
    assert len(batches) == 3
    for images, labels in batches:
        assert images.is_pinned() and labels.is_pinned()
        on_cuda = to_device((images, labels), CUDA)
        torch.cuda.synchronize()
        assert on_cuda[0].device.type == "cuda" and on_cuda[0].dtype == torch.uint8
        assert torch.equal(on_cuda[0].cpu(), images) and torch.equal(on_cuda[1].cpu(), labels)


# ---------------------------------------------------------------------------------------- real runs


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_run_on_cuda(precision, train_shards, tmp_path):
    """A real `python -m cxrdist.train` under autocast (fp16 with its grad scaler): finite losses, test
    metrics over every test image, channels_last on."""
    run_dir = tmp_path / precision
    res = run_module(
        "cxrdist.train",
        "recipes/demo.toml",
        *fast_overrides(
            run_dir, train_shards, 2, f"train.mixed_precision={precision}", "train.channels_last=true"
        ),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"# mixed_precision used: {precision}" in (run_dir / "config.toml").read_text()
    for row in rows(run_dir):
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["val"]["loss"]), row
    test, count = final_metrics(run_dir)
    assert test["num_samples"] == count and 0.0 <= test["accuracy"] <= 1.0
    scaler = run_dir / "checkpoints" / "epoch-0002" / "scaler.pt"
    assert scaler.is_file() == (precision == "fp16"), "fp16 trains with a grad scaler, bf16 without"


@pytest.mark.slow
def test_evaluation_on_cuda_equals_cpu(trained_run, train_shards, tmp_path):
    """`python -m cxrdist.evaluate` of the same weights on CUDA and on the CPU: the same confusion matrix
    over exactly the manifest's test images. TF32 off on CUDA: fp32 there and here differ in the last bits
    only, so no prediction can flip."""
    out = {}
    for device, env in (("cuda", {"NVIDIA_TF32_OVERRIDE": "0"}), ("cpu", {"CUDA_VISIBLE_DEVICES": ""})):
        out[device] = tmp_path / f"{device}.json"
        args = (str(trained_run), "--shards", str(train_shards), "--split", "test", "--out", str(out[device]))
        res = run_module("cxrdist.evaluate", *args, **env)
        assert res.returncode == 0, res.stderr[-3000:]
    on_cuda, on_cpu = (json.loads(out[d].read_text()) for d in ("cuda", "cpu"))
    manifest = json.loads((train_shards / "manifest.json").read_text())
    assert on_cuda["num_samples"] == on_cpu["num_samples"] == manifest["splits"]["test"]["count"]
    assert on_cuda["confusion_matrix"] == on_cpu["confusion_matrix"]
    assert on_cuda["accuracy"] == on_cpu["accuracy"] and on_cuda["macro_f1"] == on_cpu["macro_f1"]
    assert on_cuda["loss"] == pytest.approx(on_cpu["loss"], rel=1e-4)


@pytest.mark.slow
def test_interrupted_run_resumes_on_cuda_to_the_straight_run(cnn_shards, tmp_path):
    """Killed (SIGKILL) once epoch 2's checkpoint lands, then --resume: the weights, EMA included, end
    where a straight run's do (module docstring: tolerance), with the optimizer, schedule, EMA and device
    cache restored on CUDA."""
    extra = ("train.ema_decay=0.9",)
    straight = tmp_path / "straight"
    res = run_module("cxrdist.train", "recipes/demo.toml", *seed_cnn_sets(straight, cnn_shards, 4, *extra))
    assert res.returncode == 0, res.stderr[-3000:]

    broken = tmp_path / "broken"
    cmd = [
        sys.executable,
        "-m",
        "cxrdist.train",
        "recipes/demo.toml",
        *seed_cnn_sets(broken, cnn_shards, 4, *extra),
    ]
    log = tmp_path / "broken.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=quiet_env(), stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 300
    while not (broken / "checkpoints/epoch-0002").exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (broken / "checkpoints/epoch-0004").exists(), "run finished before it could be interrupted"

    res = run_module(
        "cxrdist.train", "recipes/demo.toml", *seed_cnn_sets(broken, cnn_shards, 4, *extra), "--resume"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    assert [r["epoch"] for r in rows(broken)] == [1, 2, 3, 4]
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(
            straight / "checkpoints/epoch-0004" / name, broken / "checkpoints/epoch-0004" / name
        )
    for a, b in zip(rows(straight), rows(broken)):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3), (a, b)


@pytest.mark.slow
def test_compiled_run_matches_eager_on_cuda(cnn_shards, tmp_path):
    """train.compile=true runs on CUDA and trains as eager does: same losses and weights (tolerance)."""
    runs = {}
    for compiled in (False, True):
        runs[compiled] = tmp_path / f"compile-{compiled}"
        sets = seed_cnn_sets(runs[compiled], cnn_shards, 2, f"train.compile={str(compiled).lower()}")
        res = run_module("cxrdist.train", "recipes/demo.toml", *sets)
        assert res.returncode == 0, res.stderr[-3000:]
    assert "compile = true" in (runs[True] / "config.toml").read_text()
    for a, b in zip(rows(runs[False]), rows(runs[True])):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3), (a, b)
        assert b["val"]["loss"] == pytest.approx(a["val"]["loss"], rel=1e-3), (a, b)
    ckpt = "checkpoints/epoch-0002/model.safetensors"
    assert_same_weights(runs[False] / ckpt, runs[True] / ckpt)
