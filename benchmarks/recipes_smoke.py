"""Short runs of the study's recipes on a folder of radiographs: test accuracy and wall time, as markdown.

    python -m benchmarks.recipes_smoke --src ../shared/data/cxr-real-sample/COVID-19_Radiography_Dataset
    python -m benchmarks.recipes_smoke --synthetic 300      # the synthetic set instead

Packs SRC at 128 px into a temporary directory, then trains each recipe with `python -m cxrdist.train`
(one process, CPU or the visible GPU) for a few epochs and prints a table for RESULTS.md. Nothing is
written into the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import IMAGE_SIZE_PX, cpu_model, markdown_table, train_run
from shard_tools.cli import positive_int, run_main

DEFAULT_RECIPES = ("cnn", "cnn_augmented", "resnet18_scratch")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", type=Path, help="database folder (either layout)")
    src.add_argument(
        "--synthetic", type=positive_int, metavar="PER_CLASS", help="generate this many per class"
    )
    p.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES))
    p.add_argument("--epochs", type=positive_int, nargs="+", default=[15, 15, 5], help="per recipe, in order")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for every run")
    args = p.parse_args(argv)
    from shard_tools.pack import pack
    from shard_tools.synth import generate

    epochs = (args.epochs * len(args.recipes))[: len(args.recipes)] if len(args.epochs) == 1 else args.epochs
    with tempfile.TemporaryDirectory(prefix="cxrdist-smoke-") as tmp:
        tmp = Path(tmp)
        data = args.src if args.src else generate(tmp / "synthetic", per_class=args.synthetic)
        manifest = pack(data, tmp / "shards", size=IMAGE_SIZE_PX, min_shards=4, progress=False)
        counts = {s: manifest["splits"][s]["count"] for s in ("train", "val", "test")}
        print(f"data: {args.src or f'synthetic, {args.synthetic} per class'}; split {counts}")
        rows = []
        for recipe, n in zip(args.recipes, epochs, strict=True):
            sets = [f"train.epochs={n}", *args.overrides]
            run = train_run(f"recipes/{recipe}.toml", tmp / f"run-{recipe}", tmp / "shards", sets)
            test = run["test"]
            rows.append(
                [
                    recipe,
                    n,
                    f"{test['accuracy']:.3f}",
                    f"{test['balanced_accuracy']:.3f}",
                    f"{test['macro_f1']:.3f}",
                    test["best_epoch"],
                    f"{run['wall_s']:.0f} s",
                ]
            )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu_model()}"
    print(f"\ndevice: {device}, {os.cpu_count()} cores; torch {torch.__version__}\n")
    header = ["recipe", "epochs", "test accuracy", "balanced accuracy", "macro F1", "best epoch", "wall time"]
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
