"""Shortcut mitigations measured on real radiographs: does a model trained with them still classify the
intact test split, and does it stop scoring above chance when the lungs are hidden?

    python -m benchmarks.mitigations [--src DIR] [--work /tmp/mit] [--epochs 20] [--seeds 0,1,2,3,4]

Packs the real 3-class sample at 128 px into WORK/shards (once; pack's default 70/15/15 split), then for
each seed trains the study CNN with its augmentation (recipes/cnn_augmented.toml) five times, the same
epochs each, in fp32: as shipped (baseline), with `augment.border_erase = 0.5`, with every frame erased
(`border_erase = 1`, widths 12% to 20%), with `data.lung_focus = "mask"` and with `"crop"`. Each model
is scored on the test split four ways, occluding on the device before the model's own preprocessing (its
lung focus) and the normalisation, as the shortcut audit does:

    intact        the images as they are
    lungs_hidden  the lung template set to `cxrdist.lungs.FILL` (flat gray that normalises to ~0)
    lungs_only    everything but the lung template set to FILL
    border_only   everything but the outer `BORDER_FRACTION` (12%) frame set to FILL

The real sample ships no lung masks, so "the lungs" are `cxrdist.lungs`' two-ellipse template here.
Accuracy and balanced accuracy come with 95% intervals (stratified bootstrap, 1,000 resamples, seed 0) for
every run; across seeds the table gives the mean and the range. Chance balanced accuracy is 1/3.

Prints both tables and writes WORK/mitigations.json (every run's numbers, the setup and the machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    IMAGE_SIZE_PX,
    ROOT,
    BenchError,
    describe_machine,
    machine_info,
    markdown_table,
    print_table,
    train_run,
    write_json,
)
from cxrdist.artifacts import load_trained_model
from cxrdist.augment import eval_transform
from cxrdist.data import eval_batches, read_manifest
from cxrdist.evaluate import SplitScores, probabilities, split_metrics
from cxrdist.lungs import border_mask, focus, hide, template_mask
from cxrdist.uncertainty import bootstrap_intervals

SAMPLE = ROOT / "../shared/data/cxr-real-3class/COVID-19_Radiography_Dataset"
CLASSES = "COVID,Normal,Viral Pneumonia"
RECIPE = "recipes/cnn_augmented.toml"
# name -> the --set overrides that switch the mitigation on (nothing else differs between runs)
MITIGATIONS = {
    "baseline": [],
    "border_erase": ["augment.border_erase=0.5"],
    # every training image, always at least the audit's 12% frame: the frame never carries a label
    "border_erase=1": ["augment.border_erase=1.0", "augment.border_erase_width=[0.12, 0.2]"],
    "lung_focus=mask": ["data.lung_focus=mask"],
    "lung_focus=crop": ["data.lung_focus=crop"],
}
OCCLUSIONS = ("intact", "lungs_hidden", "lungs_only", "border_only")
# fp32 and contiguous tensors in training's own evaluation too, so that its test metrics and the scoring
# here are the same arithmetic: the intact scores are checked equal to the run's test_metrics.json.
EXACT = ["train.mixed_precision=no", "train.channels_last=false"]
RESAMPLES, BOOTSTRAP_SEED = 1000, 0


def pack_once(src: Path, out: Path) -> Path:
    """The sample packed at 128 px into `out`, reused when an earlier run packed it there."""
    if not (out / "manifest.json").is_file():
        from shard_tools.pack import pack

        pack(src, out, size=IMAGE_SIZE_PX, classes=CLASSES.split(","), progress=False)
    return out


def occluded(images: torch.Tensor, how: str) -> torch.Tensor:
    """uint8 (B, 1, H, W) with the region `how` names hidden (see the module docstring)."""
    h, w = images.shape[-2:]
    lungs = template_mask(h, w, images.device)
    hidden = {
        "intact": torch.zeros_like(lungs),
        "lungs_hidden": lungs,
        "lungs_only": ~lungs,
        "border_only": ~border_mask(h, w, device=images.device),
    }[how]
    return hide(images, hidden)


@torch.no_grad()
def score_occlusions(run_dir: Path, shards: Path) -> dict[str, dict[str, Any]]:
    """Per occlusion: accuracy, balanced accuracy, per-class recall and macro AUC, with 95% intervals, of
    the run's best model on the test split. Occlusion first, then the model's lung focus, then the
    normalisation; the temperature the run fitted, as the run's own test metrics use it."""
    model, meta = load_trained_model(run_dir, torch.device("cpu"))
    manifest = read_manifest(str(shards))
    logits: dict[str, list[torch.Tensor]] = {how: [] for how in OCCLUSIONS}
    labels, keys = [], []
    for images, batch_labels, batch_keys in eval_batches(
        manifest, "test", batch_size=128, rank=0, world_size=1, num_workers=0
    ):
        for how in OCCLUSIONS:
            x = eval_transform(focus(occluded(images, how), meta.lung_focus), meta.in_chans)
            logits[how].append(model(x).float())
        labels.append(batch_labels)
        keys += batch_keys
    order = np.argsort(np.array(keys, dtype=object), kind="stable")
    y = torch.cat(labels).numpy()[order]
    out = {}
    for how in OCCLUSIONS:
        scores = SplitScores(tuple(keys[i] for i in order), y, torch.cat(logits[how]).numpy()[order])
        probs = probabilities(scores, meta.temperature)
        m = split_metrics(scores, manifest.classes, probs)
        iv = bootstrap_intervals(probs, y, manifest.classes, resamples=RESAMPLES, seed=BOOTSTRAP_SEED)
        out[how] = {
            "accuracy": m["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"],
            "macro_roc_auc": m["macro"]["roc_auc"],
            "recall": {c: m["per_class"][c]["recall"] for c in manifest.classes},
            "confusion_matrix": m["confusion_matrix"],
            "intervals": {k: iv[k] for k in ("accuracy", "balanced_accuracy")},
        }
    return out


def cell(m: dict[str, Any], metric: str) -> str:
    lo, hi = m["intervals"][metric]
    return f"{m[metric]:.3f} [{lo:.2f}, {hi:.2f}]"


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ({min(values):.2f}-{max(values):.2f})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.mitigations", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=SAMPLE, help="the real 3-class sample (class folders)")
    p.add_argument("--work", type=Path, default=Path("/tmp/mit"), help="shards, runs and the JSON go here")
    p.add_argument("--epochs", type=int, default=20, help="epochs of every run (the recipe's 20)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="run.seed values, comma-separated")
    p.add_argument("--only", default="", help="comma-separated mitigation names (default: all)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.src.is_dir():
        raise BenchError(f"--src {args.src}: not a folder (the real 3-class sample)")
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.only.split(",") if args.only else list(MITIGATIONS)
    shards = pack_once(args.src, args.work / "shards")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for seed in seeds:
        for name in names:
            run_dir = args.work / "runs" / f"{name.replace('=', '-')}-seed{seed}"
            sets = [f"train.epochs={args.epochs}", f"run.seed={seed}", "eval.gradcam_per_class=0", *EXACT]
            trained = train_run(RECIPE, run_dir, shards, [*sets, *MITIGATIONS[name]])
            scored = score_occlusions(run_dir, shards)
            if abs(scored["intact"]["accuracy"] - trained["test"]["accuracy"]) > 1e-9:
                raise BenchError(f"{run_dir}: intact accuracy differs from the run's test_metrics.json")
            runs[name].append({"seed": seed, "wall_s": trained["wall_s"], "test": scored})
            print(
                f"{name} seed {seed}: {trained['wall_s']:.0f} s, intact balanced accuracy "
                f"{scored['intact']['balanced_accuracy']:.3f}, lungs hidden "
                f"{scored['lungs_hidden']['balanced_accuracy']:.3f}",
                flush=True,
            )

    header = ["mitigation", "intact accuracy", "intact balanced acc."]
    header += [f"{how.replace('_', ' ')} balanced acc." for how in OCCLUSIONS[1:]]
    first = [
        [name, cell(r[0]["test"]["intact"], "accuracy")]
        + [cell(r[0]["test"][how], "balanced_accuracy") for how in OCCLUSIONS]
        for name, r in runs.items()
    ]
    across = [
        [name, spread([x["test"]["intact"]["accuracy"] for x in r])]
        + [spread([x["test"][how]["balanced_accuracy"] for x in r]) for how in OCCLUSIONS]
        for name, r in runs.items()
    ]
    title = f"seed {seeds[0]}, 95% intervals (bootstrap {RESAMPLES}, seed {BOOTSTRAP_SEED}); chance 0.333"
    print_table(title, header, first)
    print_table(f"mean (min-max) over seeds {args.seeds}", header, across)
    print("\n" + markdown_table(header, first) + "\n" + markdown_table(header, across))
    machine = machine_info(torch.device("cpu"))
    write_json(
        args.work / "mitigations.json",
        {
            "recipe": RECIPE,
            "epochs": args.epochs,
            "seeds": seeds,
            "shards": str(shards),
            "mask_source": "template",
            "machine": machine,
            "runs": runs,
        },
    )
    print(f"{describe_machine(machine)}\n{args.work / 'mitigations.json'}")
    return 0


if __name__ == "__main__":
    from shard_tools.cli import run_main

    sys.exit(run_main(main))
