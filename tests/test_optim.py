"""Step maths: the learning-rate schedule and its scaling with the global batch, class weights, seeds,
and what "auto" resolves to for precision and memory format."""

from __future__ import annotations

import pytest
import torch

from cxrdist.config import ConfigError, OptimConfig, load_config
from cxrdist.optim import (
    class_weights,
    lr_at,
    lr_scaling_rule,
    resolve_channels_last,
    resolve_mixed_precision,
    scaled_lr,
)
from cxrdist.rng import derive_seed


def test_lr_schedule():
    cfg = OptimConfig(lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, 100, 10, 1.0, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, 100, 10, 1.0, cfg) == pytest.approx(0.1)
    steps = [lr_at(s, 100, 10, 1.0, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))
    assert lr_at(50, 100, 0, 0.3, OptimConfig(lr=0.3)) == 0.3
    assert lr_at(0, 100, 10, 2.0, cfg) == pytest.approx(0.2)  # warm-up climbs to the scaled peak


def test_lr_scales_with_the_global_batch():
    sgd = OptimConfig(name="sgd", lr=0.01, lr_base_batch=32)
    assert scaled_lr(sgd, 32) == pytest.approx(0.01)
    assert scaled_lr(sgd, 64) == pytest.approx(0.02)  # auto = linear for SGD (Goyal et al.)
    assert scaled_lr(sgd, 16) == pytest.approx(0.005)
    adam = OptimConfig(name="adam", lr=1e-3, lr_base_batch=64)
    assert lr_scaling_rule(adam) == "sqrt"
    assert scaled_lr(adam, 256) == pytest.approx(2e-3)  # sqrt(4) = 2
    assert scaled_lr(OptimConfig(name="adam", lr=1e-3, lr_base_batch=64, lr_scaling="linear"), 256) == 4e-3
    assert scaled_lr(OptimConfig(lr=1e-3), 4096) == 1e-3  # lr_base_batch 0: as written
    assert lr_scaling_rule(OptimConfig(lr=1e-3)) == "none"


def test_class_weights_and_seeds():
    w = class_weights([100, 300, 0, 200])
    assert w[2] == 0
    assert w[0] * 100 == pytest.approx(w[1] * 300) == pytest.approx(w[3] * 200)
    counts = torch.tensor([100.0, 300.0, 0.0, 200.0])
    assert float((w * counts).sum() / counts.sum()) == pytest.approx(1.0)  # mean weight per image is 1
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)
    assert 0 <= derive_seed("cache", 0, 1) < 2**63


def test_auto_memory_format_and_precision_follow_the_measurements():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_channels_last("auto", cpu, "seed_cnn") is True  # 1.7x faster on the CPU
    assert resolve_channels_last("auto", cpu, "resnet18") is False  # 0.8x on the CPU
    assert resolve_channels_last("auto", cuda, "resnet18") is True
    assert resolve_channels_last("true", cpu, "resnet18") is True
    assert resolve_channels_last("false", cuda, "seed_cnn") is False
    assert resolve_mixed_precision("no", cpu) == "no" and resolve_mixed_precision("bf16", cpu) == "bf16"
    assert resolve_mixed_precision("auto", cpu) in ("no", "bf16")  # bf16 only where the CPU has it natively


def test_channels_last_takes_true_false_and_auto():
    assert load_config(None, ["train.channels_last=true"]).train.channels_last == "true"
    assert load_config(None, ["train.channels_last=false"]).train.channels_last == "false"
    assert load_config(None).train.channels_last == "auto"
    with pytest.raises(ConfigError, match=r"\[train\] channels_last: 'maybe' is not one of"):
        load_config(None, ["train.channels_last=maybe"])
