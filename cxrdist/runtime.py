"""Process settings for a training run: the Accelerator (its process group and precision) and the
per-device settings (TF32 and cuDNN autotuning on CUDA, glibc keeping freed blocks on a CPU).

Its own module so that the benchmarks apply exactly what training applies to their compute-only references
without importing `cxrdist.train` (the training entry point, which also sets `OMP_WAIT_POLICY` for the
process). Nothing here runs at import.
"""

from __future__ import annotations

import ctypes
import os
from datetime import timedelta
from typing import Any

import torch

from cxrdist.config import Config
from cxrdist.optim import resolve_mixed_precision
from shard_tools.errors import InputError


def make_accelerator(cfg: Config) -> Any:
    """The Accelerator for this process: gloo ranks on CPU-only hosts, the recipe's precision resolved."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    check_trackers(cfg.run.log_with)
    use_cuda = torch.cuda.is_available()
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision, local)
    if mixed_precision == "fp16" and not use_cuda:
        raise InputError("train.mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on this device")
    accelerator = Accelerator(
        # Without a GPU, Accelerate only forms a process group when told it runs on CPU (gloo ranks).
        cpu=not use_cuda,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=list(cfg.run.log_with) or None,
        project_dir=cfg.run.dir,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist.timeout_s))],
    )
    configure_device(accelerator.device)
    return accelerator


def configure_device(device: torch.device) -> None:
    """The process settings a training run uses on `device` (benchmarks apply the same to their
    compute-only references): on CUDA, TF32 and cuDNN autotuning; on a CPU, glibc keeping freed blocks."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls/convs: same accuracy, ~2x faster
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotune once
    else:
        keep_freed_memory()


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


def check_trackers(log_with: tuple[str, ...]) -> None:
    """InputError when the recipe asks for a tracker that is not installed (before any process group)."""
    from accelerate.utils import is_tensorboard_available

    if "tensorboard" in log_with and not is_tensorboard_available():
        raise InputError(
            "run.log_with includes 'tensorboard' but it is not installed: pip install 'cxrdist[tensorboard]' "
            "or remove it from run.log_with"
        )
