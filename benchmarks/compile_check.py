"""torch.compile against eager, one training step, in the same run: does `train.compile = true` pay?

    python -m benchmarks.compile_check [--models resnet18 seed_cnn] [--batch 512] [--out FILE.json]

Per model: images/s of the compute-only training step (`benchmarks.step.time_training_step`: a fixed
batch already on the device, bf16 autocast on CUDA, channels_last), eager first, then compiled, and the
ratio compiled / eager, with the compiled case's first step (the compile itself) in seconds. Each rate is
the median of 5 timed repeats of about 2 s. On a CPU it runs in fp32 and is only a smoke test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.step import StepCase, StepTiming, time_training_step

TIMING = StepTiming(warmup=5, repeats=5, repeat_s=2.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_check", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "seed_cnn"])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = "bf16" if cuda else "no"
    rows = []
    for model in args.models:
        eager, compiled = (
            time_training_step(StepCase(model, args.batch, precision, True, flag), TIMING, device)
            for flag in (False, True)
        )
        ratio = compiled["images_per_s"] / eager["images_per_s"]
        rows.append({"model": model, "eager": eager, "compiled": compiled, "ratio": ratio})
        print(
            f"{model:9s} batch {args.batch} {precision}: eager {eager['images_per_s']:,.0f} img/s, compiled "
            f"{compiled['images_per_s']:,.0f} img/s ({ratio:.2f}x; compile {compiled['first_step_s']:.0f} s)",
            flush=True,
        )
    if args.out:
        name = torch.cuda.get_device_name() if cuda else "cpu"
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
