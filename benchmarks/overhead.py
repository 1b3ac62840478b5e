"""The "overhead" section: how far a real training run is from pure compute.

For each (model, input) case, `python -m cxrdist.train` runs the model's recipe with all its defaults; the
steady-state images/s it writes to metrics.jsonl (epochs 2..N, training steps only, not validation) is
compared with `benchmarks.step.time_training_step` for the same model, batch, precision and memory format
on one in-memory batch, timed right before and right after the run and pooled, so that a slow drift of
the machine's speed hits both sides alike. Also reported: the best steady epoch over the best compute
repeat, which load from other processes (it only ever slows things down) disturbs least.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    RECIPES,
    ROOT,
    Dataset,
    load_average,
    median,
    print_table,
    ratio,
    steady_images_per_s,
    train_run,
)
from benchmarks.step import StepCase, StepTiming, time_training_step


def resolved_training(recipe: str, device: torch.device) -> dict[str, Any]:
    """What `cxrdist.train` will use for this recipe on `device` with no overrides."""
    from cxrdist.config import load_config
    from cxrdist.optim import resolve_channels_last, resolve_mixed_precision

    cfg = load_config(ROOT / recipe)
    return {
        "batch_size": cfg.train.per_device_batch_size,
        "precision": resolve_mixed_precision(cfg.train.mixed_precision, device),
        "channels_last": resolve_channels_last(cfg.train.channels_last, device, cfg.model.name),
        "compile": cfg.train.compile,
        "num_workers": cfg.data.num_workers,
    }


def bench_overhead(
    data: dict[str, Dataset],
    work: Path,
    cases: tuple[tuple[str, str], ...],
    epochs: dict[str, int],
    timing: StepTiming,
    device: torch.device,
) -> dict[str, Any]:
    """e2e / compute for each (model, data.cache) case, on `data[model]`, `epochs[model]` epochs."""
    rows = []
    for model_name, cache in cases:
        recipe = RECIPES[model_name]
        settings = resolved_training(recipe, device)
        step_case = StepCase(
            model_name,
            settings["batch_size"],
            settings["precision"],
            settings["channels_last"],
            settings["compile"],
        )
        load_before = load_average()
        before = time_training_step(step_case, timing, device)
        run = train_run(
            recipe,
            work / "runs" / f"{model_name}-{cache}",
            data[model_name].shards,
            [f"train.epochs={epochs[model_name]}", f"data.cache={cache}"],
        )
        after = time_training_step(step_case, timing, device)
        steady = steady_images_per_s(run["rows"])
        repeats = before["repeats"] + after["repeats"]
        rows.append(
            {
                "model": model_name,
                "input": "streaming" if cache == "none" else "device cache",
                **settings,
                "train_images": data[model_name].counts["train"],
                "epochs": epochs[model_name],
                "epoch_seconds": [r["epoch_seconds"] for r in run["rows"]],
                "e2e_images_per_s": median(steady),
                "e2e_best_images_per_s": max(steady),
                "compute_images_per_s": median(repeats),
                "compute_best_images_per_s": max(repeats),
                "compute_repeats": repeats,
                "overhead": ratio(median(repeats), median(steady)),
                "overhead_best": ratio(max(repeats), max(steady)),
                "load_before": load_before,
                "load_after": load_average(),
            }
        )
    print_table(
        "overhead: end-to-end epoch time (python -m cxrdist.train, median of epochs 2..N) / pure compute "
        "time (median); best: fastest epoch / fastest compute repeat",
        [
            "model",
            "input",
            "train images",
            "precision",
            "e2e img/s",
            "compute img/s",
            "e2e / compute",
            "best / best",
            "load",
        ],
        [
            [
                f"{r['model']} b{r['batch_size']}",
                r["input"],
                r["train_images"],
                r["precision"],
                r["e2e_images_per_s"],
                r["compute_images_per_s"],
                f"{r['overhead']:.2f}x" if r["overhead"] else "-",
                f"{r['overhead_best']:.2f}x" if r["overhead_best"] else "-",
                f"{r['load_before'][0]:.1f}-{r['load_after'][0]:.1f}",
            ]
            for r in rows
        ],
    )
    return {"rows": rows}
