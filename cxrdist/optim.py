"""Step maths: optimizer, learning rate (schedule, and its scaling with the global batch), loss, EMA, and
the precision a step runs in. Pure functions of the config; nothing here knows about ranks or files.

Learning rate and batch size (README, "One GPU or many"): a recipe's `optim.lr` is the rate for the global
batch `optim.lr_base_batch` it was tuned for. The per-device batch stays what the recipe says (it is what
fits and feeds one device), so the global batch grows with the number of ranks, and the rate follows it, as
timm's `lr_base` / `lr_base_size` and Goyal et al. (2017, "Accurate, Large Minibatch SGD") do: linearly for
SGD, with the square root for Adam and AdamW ("auto", timm's rule), after `optim.warmup_epochs` of linear
warm-up. `lr_base_batch = 0` turns scaling off (the rate is used as written whatever the world size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cxrdist.config import OptimConfig, TrainConfig


def lr_scaling_rule(cfg: OptimConfig) -> str:
    """ "linear", "sqrt" or "none": `optim.lr_scaling` with "auto" resolved by optimizer, as timm does."""
    if cfg.lr_base_batch == 0:
        return "none"
    if cfg.lr_scaling != "auto":
        return cfg.lr_scaling
    return "linear" if cfg.name == "sgd" else "sqrt"


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """The peak learning rate for `global_batch_size` images per optimizer step (module docstring)."""
    rule = lr_scaling_rule(cfg)
    if rule == "none":
        return cfg.lr
    ratio = global_batch_size / cfg.lr_base_batch
    return cfg.lr * (ratio if rule == "linear" else math.sqrt(ratio))


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up from 0 to `peak_lr`, then constant
    or cosine down to `cfg.min_lr_ratio * peak_lr`."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return peak_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak_lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters; `lr` (default `cfg.lr`) is only the initial
    value: the loop sets every step's rate from `lr_at`."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if lr is None else lr
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


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


def resolve_channels_last(requested: str, device: torch.device, model_name: str) -> bool:
    """`train.channels_last` as used on `device`: "auto" is on for CUDA, and on a CPU only for seed_cnn,
    the one model measured faster there in channels_last (BENCHMARKS.md, "Training step")."""
    if requested != "auto":
        return requested == "true"
    return device.type == "cuda" or model_name == "seed_cnn"


def class_weights(class_counts: list[int]) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 per training image); 0 for a class with no training image."""
    counts = torch.tensor(class_counts, dtype=torch.float32)
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights


def loss_fn(
    logits: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, weight: torch.Tensor | None
) -> torch.Tensor:
    """Mean loss of float logits (B, K) against int64 labels (B,), in float32 whatever the autocast."""
    if cfg.loss == "nll":  # the study: log_softmax output + NLLLoss (the same function as cross-entropy)
        return F.nll_loss(F.log_softmax(logits.float(), dim=1), labels, weight=weight)
    return F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=cfg.label_smoothing)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, m in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
        if e.dtype.is_floating_point:
            e.lerp_(m.detach().to(e.dtype), 1.0 - decay)
        else:
            e.copy_(m)


LOWER_IS_BETTER = {"loss"}


def improved(value: float, best: float | None, metric: str) -> bool:
    """Whether `value` of `metric` beats `best` (None: nothing yet)."""
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best
