"""The "baseline" section: the study's plain PyTorch script against `python -m cxrdist.train`.

Three programs on the same images, split, epochs and batch size (the seed CNN recipe's): the study's
script as a user would run it (`benchmarks/baseline_study.py`, the baseline), the same script given the
two process settings cxrdist makes for itself (`TUNED_ENV`: how much of the gap they alone close), and
`python -m cxrdist.train recipes/cnn.toml` with all its defaults. Wall time of each whole process
(evaluation included) and test accuracy.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    IMAGE_SIZE_PX,
    RECIPES,
    ROOT,
    TUNED_ENV,
    Dataset,
    image_folder,
    load_average,
    median,
    print_table,
    run_timed,
    train_run,
)
from benchmarks.overhead import resolved_training


def study_script(data: Dataset, work: Path, epochs: int, batch: int, tuned: bool) -> dict[str, Any]:
    """One run of `benchmarks/baseline_study.py` on the train and test splits of `data`."""
    workers = min(os.cpu_count() or 1, 8)
    out_json = work / f"study_script{'_tuned_env' if tuned else ''}.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "baseline_study.py"),
        str(image_folder(data, "train")),
        str(image_folder(data, "test")),
        f"--epochs={epochs}",
        f"--batch-size={batch}",
        f"--workers={workers}",
        f"--json={out_json}",
        f"--image-size={IMAGE_SIZE_PX}",
    ]
    _res, wall = run_timed(cmd, "benchmarks/baseline_study.py", tuned=tuned)
    study = json.loads(out_json.read_text())
    return {
        "wall_s": wall,
        "test_accuracy": study["test_accuracy"],
        "workers": workers,
        "train_images_per_s": study["train_images_per_s"],
        "env": TUNED_ENV if tuned else {},
    }


def bench_baseline(data: Dataset, work: Path, epochs: int, device: torch.device) -> dict[str, Any]:
    """The three programs; `epochs` 0 = the recipe's."""
    from cxrdist.config import load_config

    recipe = RECIPES["seed_cnn"]
    cfg = load_config(ROOT / recipe)
    epochs = epochs or cfg.train.epochs
    batch = cfg.train.per_device_batch_size
    load_before = load_average()
    scripts = {
        "study_script": study_script(data, work, epochs, batch, tuned=False),
        "study_script_tuned_env": study_script(data, work, epochs, batch, tuned=True),
    }
    ours = train_run(recipe, work / "runs" / "baseline-cxrdist", data.shards, [f"train.epochs={epochs}"])
    base = scripts["study_script"]["wall_s"]
    pack_s = data.pack_s
    result = {
        "recipe": recipe,
        "epochs": epochs,
        "batch_size": batch,
        "train_images": data.counts["train"],
        "test_images": data.counts["test"],
        **scripts,
        "cxrdist": {
            "wall_s": ours["wall_s"],
            "test_accuracy": ours["test_accuracy"],
            "train_images_per_s": median([r["images_per_s"] for r in ours["rows"]]),
            **resolved_training(recipe, device),
        },
        "pack_s": pack_s,
        "speedup": base / ours["wall_s"],
        "speedup_vs_tuned_env": scripts["study_script_tuned_env"]["wall_s"] / ours["wall_s"],
        "speedup_including_pack": base / (ours["wall_s"] + pack_s) if pack_s else None,
        "load_before": load_before,
        "load_after": load_average(),
    }
    rows = [
        ["plain PyTorch script (the study)", result["study_script"]],
        ["the same, with cxrdist's 2 env settings", result["study_script_tuned_env"]],
        ["python -m cxrdist.train", result["cxrdist"]],
    ]
    print_table(
        f"baseline: seed CNN recipe, {epochs} epochs, batch {batch}, {result['train_images']} train / "
        f"{result['test_images']} test images; wall time of the whole process",
        ["program", "wall s", "train img/s", "test accuracy", "cxrdist speed-up"],
        [
            [
                name,
                r["wall_s"],
                r["train_images_per_s"],
                r["test_accuracy"],
                f"{r['wall_s'] / ours['wall_s']:.2f}x",
            ]
            for name, r in rows
        ],
    )
    if pack_s:
        print(
            f"  packing these images once took {pack_s:.1f} s; speed-up over the plain script "
            f"counting it: {result['speedup_including_pack']:.2f}x"
        )
    return result
