"""The study CNN on one gray channel against the study's three replicated channels: same function, speed.

    python -m benchmarks.gray_stem [--batch-size 32] [--repeats 7] [--steps 20]

`model.in_chans` auto gives seed_cnn a 1-channel first convolution with the per-channel normalisation
folded into its kernel and bias (`cxrdist.models.fold_rgb_stem`): exactly the function of the study's
3-channel layer on gray replicated to RGB, because the convolution has no padding. This script checks the
outputs agree for the same weights, then times, interleaved and best of --repeats, the whole training step
as `cxrdist.train` runs it on batches already in memory (train_transform with the recipe's augmentation
off and on, forward, backward, SGD step), fp32 channels_last, 1 channel against 3 (the baseline).
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import (
    IMAGE_SIZE_PX,
    ROOT,
    best_rates,
    clocked,
    default_device,
    describe_machine,
    machine_info,
    match_training_process,
    print_table,
    ratio,
)


def step_case(in_chans: int, augment: bool, batch: int, steps: int, device: torch.device):
    """A `Case`: `steps` training steps of seed_cnn with `in_chans` input channels, from uint8 images."""
    from cxrdist.augment import train_transform
    from cxrdist.config import AugmentConfig, ModelConfig, load_config
    from cxrdist.models import create_model
    from cxrdist.optim import build_optimizer, loss_fn

    cfg = load_config(ROOT / "recipes/cnn_augmented.toml")
    aug = cfg.augment if augment else AugmentConfig(enabled=False)
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="seed_cnn", in_chans=in_chans), 4)
    model = model.to(device=device, memory_format=torch.channels_last).train()
    optimizer = build_optimizer(model, cfg.optim)
    images = torch.randint(0, 256, (batch, 1, IMAGE_SIZE_PX, IMAGE_SIZE_PX), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 4, (batch,), device=device)
    generator = torch.Generator(device=device)

    def run() -> int:
        for i in range(steps):
            generator.manual_seed(i)
            x = train_transform(images, aug, generator, in_chans, channels_last=True)
            loss = loss_fn(model(x), labels, cfg.train, None)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return batch * steps

    run()  # warm-up: allocations, oneDNN kernel selection
    return clocked(run)


def max_output_difference(device: torch.device) -> float:
    """Largest |logit difference| between the study's 3-channel CNN and its folded 1-channel form."""
    from cxrdist.augment import eval_transform, normalize_stats
    from cxrdist.models import fold_rgb_stem, seed_cnn

    torch.manual_seed(0)
    rgb, gray = seed_cnn(in_chans=3).eval().to(device), seed_cnn(in_chans=1).eval().to(device)
    state = dict(rgb.state_dict())
    state["features.0.weight"], state["features.0.bias"] = fold_rgb_stem(
        state["features.0.weight"], state["features.0.bias"], normalize_stats(3), normalize_stats(1)
    )
    gray.load_state_dict(state)
    images = torch.randint(0, 256, (64, 1, IMAGE_SIZE_PX, IMAGE_SIZE_PX), dtype=torch.uint8, device=device)
    with torch.no_grad():
        return float((rgb(eval_transform(images, 3)) - gray(eval_transform(images, 1))).abs().max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32, help="the recipe's per-device batch")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    args = p.parse_args(argv)
    device = default_device()
    match_training_process(device)
    print(describe_machine(machine_info(device)))
    print(f"max |logit difference| 3-channel vs folded 1-channel: {max_output_difference(device):.2e}")
    rows = []
    for augment in (False, True):
        cases = [step_case(c, augment, args.batch_size, args.steps, device) for c in (3, 1)]
        three, one = best_rates(cases, args.repeats)
        rows.append(["on" if augment else "off", three, one, f"{ratio(one, three):.2f}x"])
    print_table(
        f"seed_cnn training step, fp32 channels_last, batch {args.batch_size}, {IMAGE_SIZE_PX} px, "
        f"best of {args.repeats} interleaved repeats of {args.steps} steps",
        ["augmentation", "3 channels img/s (baseline)", "1 channel img/s", "speed-up"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
