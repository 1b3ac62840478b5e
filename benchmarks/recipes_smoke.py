"""Short runs of the study's recipes on a folder of radiographs: test accuracy and wall time, as markdown.

    python benchmarks/recipes_smoke.py --src ../shared/data/cxr-real-sample/COVID-19_Radiography_Dataset
    python benchmarks/recipes_smoke.py --synthetic 300      # the synthetic set instead

Packs SRC at 128 px into a temporary directory, then trains each recipe with `python -m cxrdist.train`
(one process, CPU or the visible GPU) for a few epochs and prints a table for RESULTS.md. Nothing is
written into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = ("cnn", "cnn_augmented", "resnet18_scratch")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", type=Path, help="database folder (either layout)")
    src.add_argument("--synthetic", type=int, metavar="PER_CLASS", help="generate this many per class")
    p.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES))
    p.add_argument("--epochs", type=int, nargs="+", default=[15, 15, 5], help="per recipe, in order")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for every run")
    args = p.parse_args()
    from shard_tools.pack import pack
    from shard_tools.synth import generate

    epochs = (args.epochs * len(args.recipes))[: len(args.recipes)] if len(args.epochs) == 1 else args.epochs
    with tempfile.TemporaryDirectory(prefix="cxrdist-smoke-") as tmp:
        tmp = Path(tmp)
        data = args.src if args.src else generate(tmp / "synthetic", per_class=args.synthetic)
        manifest = pack(data, tmp / "shards", size=128, min_shards=4, progress=False)
        counts = {s: manifest["splits"][s]["count"] for s in ("train", "val", "test")}
        print(f"data: {args.src or f'synthetic, {args.synthetic} per class'}; split {counts}")
        rows = []
        for recipe, n in zip(args.recipes, epochs, strict=True):
            run_dir = tmp / f"run-{recipe}"
            cmd = [
                sys.executable,
                "-m",
                "cxrdist.train",
                f"recipes/{recipe}.toml",
                "--set",
                f"run.dir={run_dir}",
                "--set",
                f"data.shards={tmp / 'shards'}",
                "--set",
                f"train.epochs={n}",
            ]
            for item in args.overrides:
                cmd += ["--set", item]
            start = time.perf_counter()
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if res.returncode != 0:
                print(res.stderr[-3000:])
                return 1
            test = json.loads((run_dir / "test_metrics.json").read_text())
            rows.append(
                (
                    recipe,
                    n,
                    test["accuracy"],
                    test["balanced_accuracy"],
                    test["macro_f1"],
                    test["best_epoch"],
                    seconds,
                )
            )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu_name()}"
    print(f"\ndevice: {device}; torch {torch.__version__}\n")
    header = ("recipe", "epochs", "test accuracy", "balanced accuracy", "macro F1", "best epoch", "wall time")
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|---|")
    for recipe, n, acc, bacc, f1, best, s in rows:
        print(f"| {recipe} | {n} | {acc:.3f} | {bacc:.3f} | {f1:.3f} | {best} | {s:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
