"""Training-step throughput on batches already on the device (compute only), and its FLOP count.

`time_training_step` is the compute-only reference every end-to-end figure is divided by: the recipe's
model, optimizer and loss, forward + backward + optimizer step on one fixed batch, nothing else. Input:
float32 (B, C, 128, 128), already normalised (what `cxrdist.augment` hands the model), in the model's
memory format. `bench_step` is the "step" section of `python -m benchmarks`: both models in fp32 and
bf16, NCHW and channels_last, eager and (optionally) compiled, each against fp32 NCHW eager.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.common import IMAGE_SIZE_PX, RECIPES, ROOT, print_table, ratio, sync

AUTOCAST = {"no": None, "bf16": torch.bfloat16}  # fp16 would need a grad scaler: not a compute-only case


@dataclass(frozen=True)
class StepCase:
    model: str  # a key of RECIPES: its recipe gives the optimizer and the loss
    batch_size: int
    precision: str  # a key of AUTOCAST
    channels_last: bool
    compile: bool


@dataclass(frozen=True)
class StepTiming:
    warmup: int  # untimed steps first (the first one also compiles or autotunes)
    repeats: int  # timed repeats; the median is reported
    repeat_s: float  # each repeat runs enough steps to last about this long


class _Step:
    """One case's model, optimizer, loss and fixed batch, ready to step on `device`."""

    def __init__(self, case: StepCase, device: torch.device) -> None:
        from cxrdist.config import load_config
        from cxrdist.models import create_model, input_channels
        from cxrdist.optim import build_optimizer, loss_fn

        cfg = load_config(ROOT / RECIPES[case.model])
        torch.manual_seed(0)
        fmt = torch.channels_last if case.channels_last else torch.contiguous_format
        model = create_model(cfg.model, num_classes=4).to(device=device, memory_format=fmt).train()
        self.model, self.device, self.train_cfg, self.loss_fn = model, device, cfg.train, loss_fn
        self.optimizer = build_optimizer(model, cfg.optim)
        self.forward = torch.compile(model) if case.compile else model
        shape = (case.batch_size, input_channels(cfg.model), IMAGE_SIZE_PX, IMAGE_SIZE_PX)
        self.x = torch.randn(shape, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 4, (case.batch_size,), device=device)
        self.dtype = AUTOCAST[case.precision]

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.forward(self.x)
        loss = self.loss_fn(logits, self.y, self.train_cfg, None)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def seconds(self, steps: int) -> float:
        """Wall time of `steps` steps, the device drained before and after (its work runs ahead)."""
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self()
        sync(self.device)
        return time.perf_counter() - start


def time_training_step(case: StepCase, timing: StepTiming, device: torch.device) -> dict[str, Any]:
    """Images/s of `case` on `device`: the median of `timing.repeats` timed repeats after the warm-up.

    Returns the case's fields plus `images_per_s`, `repeats` (each repeat's images/s), `steps_per_repeat`
    and `first_step_s` (compile or autotuning included). Errors propagate.
    """
    out: dict[str, Any] = {
        "model": case.model,
        "batch_size": case.batch_size,
        "precision": case.precision,
        "channels_last": case.channels_last,
        "compile": case.compile,
    }
    try:
        step = _Step(case, device)
        out["first_step_s"] = last = step.seconds(1)
        for _ in range(timing.warmup - 1):
            last = step.seconds(1)
        steps = max(1, math.ceil(timing.repeat_s / max(last, 1e-6)))
        rates = [case.batch_size * steps / step.seconds(steps) for _ in range(timing.repeats)]
    finally:
        if case.compile:
            torch._dynamo.reset()
    return {**out, "images_per_s": statistics.median(rates), "repeats": rates, "steps_per_repeat": steps}


def flops_per_image(model_name: str, device: torch.device) -> float:
    """Floating-point operations (a multiply-add is 2) of one image's forward + backward in the recipe's
    model at 128 px, as torch's FLOP counter sees them (convolutions and matrix products; the elementwise
    rest is noise next to them). The floor a step's time can be compared with."""
    from torch.utils.flop_counter import FlopCounterMode

    step = _Step(StepCase(model_name, 2, "no", False, False), device)
    with FlopCounterMode(display=False) as counter:
        logits = step.model(step.x)
        step.loss_fn(logits, step.y, step.train_cfg, None).backward()
    return counter.get_total_flops() / 2


def bench_step(
    batch_size: int, timing: StepTiming, compile_cases: str, device: torch.device
) -> dict[str, Any]:
    """The "step" section: every model x precision x memory format, eager, and compiled where
    `compile_cases` says ("none", "channels_last" or "all"). `batch_size` 0: each recipe's own.

    A compiled case that fails (no working compiler, say) is recorded with its error; eager ones raise.
    """
    from cxrdist.config import load_config

    rows = []
    for model_name, recipe in RECIPES.items():
        batch = batch_size or load_config(ROOT / recipe).train.per_device_batch_size
        for channels_last in (False, True):
            for precision in ("no", "bf16"):
                rows.append(
                    time_training_step(
                        StepCase(model_name, batch, precision, channels_last, False), timing, device
                    )
                )
                if compile_cases == "all" or (compile_cases == "channels_last" and channels_last):
                    case = StepCase(model_name, batch, precision, channels_last, True)
                    try:
                        rows.append(time_training_step(case, timing, device))
                    except Exception as e:  # noqa: BLE001 - recorded, not hidden: the table shows it
                        rows.append({**asdict(case), "error": f"{type(e).__name__}: {str(e).strip()[:2000]}"})
    for r in rows:  # the baseline: the same model in fp32, NCHW, eager (PyTorch's defaults)
        base = next(
            b
            for b in rows
            if b["model"] == r["model"]
            and (b["precision"], b["channels_last"], b["compile"]) == ("no", False, False)
        )
        r["vs_baseline"] = ratio(r.get("images_per_s"), base.get("images_per_s"))
    table = []
    for r in rows:
        result = r.get("images_per_s") if "error" not in r else "failed: " + r["error"].splitlines()[0][:60]
        table.append(
            [
                f"{r['model']} b{r['batch_size']}",
                "bf16" if r["precision"] == "bf16" else "fp32",
                "on" if r["channels_last"] else "off",
                "on" if r["compile"] else "off",
                result,
                f"{r['vs_baseline']:.2f}x" if r["vs_baseline"] else "-",
                r.get("first_step_s") if r["compile"] else None,
            ]
        )
    print_table(
        f"training step: in-memory batches, {IMAGE_SIZE_PX} px, median of {timing.repeats}, "
        f"{torch.get_num_threads()} threads, device {device}",
        ["model", "precision", "channels_last", "compile", "images/s", "vs fp32 NCHW eager", "compile s"],
        table,
    )
    return {"rows": rows, "threads": torch.get_num_threads()}
