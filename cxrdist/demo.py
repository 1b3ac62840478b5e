"""The one-command demo: synthetic radiographs -> shards -> training -> evaluation -> Grad-CAM.

    python -m cxrdist.demo [--out DIR]

Needs no download and no GPU: it generates the four-class synthetic dataset (`shard_tools.synth`), packs
it (`shard_tools.pack`), trains `recipes/demo.toml` in this process, evaluates the best model on the test
split, and draws a Grad-CAM grid. Finishes in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from cxrdist.artifacts import load_trained_model
from cxrdist.config import ConfigError, load_config
from cxrdist.explain import explain_shards, print_summary
from cxrdist.report import print_metrics_table, print_problem

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo.toml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cxrdist.demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="everything lands here (default demo_out)"
    )
    p.add_argument("--per-class", type=int, default=300, help="synthetic images per class")
    p.add_argument("--size", type=int, default=128, help="packed image size in pixels")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a value of recipes/demo.toml, e.g. --set train.epochs=2",
    )
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from cxrdist.train import TrainError, train
    from shard_tools.pack import PackError, pack
    from shard_tools.synth import generate

    args = parse_args(argv)
    console = Console(soft_wrap=True)  # paths stay on one line in logs
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        if not args.force:
            print_problem(console, f"{out} is not empty: pass --force to replace it, or --out elsewhere")
            return 2
        shutil.rmtree(out)
    if not RECIPE.is_file():
        print_problem(console, f"{RECIPE} not found: run the demo from a cxrdist checkout")
        return 2
    start = time.perf_counter()
    try:
        cfg = load_config(
            RECIPE, [f"run.dir={out / 'run'}", f"data.shards={out / 'shards'}", *args.overrides]
        )
        console.rule("1/4 synthetic radiographs")
        generate(out / "synthetic", per_class=args.per_class, seed=cfg.run.seed)
        console.rule("2/4 pack into WebDataset shards")
        pack(out / "synthetic", out / "shards", size=args.size, seed=cfg.run.seed, min_shards=4, force=True)
        console.rule("3/4 train recipes/demo.toml, then test the best model")
        run_dir = train(cfg)
        console.rule("4/4 Grad-CAM on test images")
        model, meta = load_trained_model(run_dir, torch.device("cpu"))
        summary = explain_shards(
            model, meta, str(out / "shards"), out / "gradcam", 4, "test", torch.device("cpu")
        )
        print_summary(summary, console)
    except (ConfigError, PackError, TrainError) as e:
        print_problem(console, e)
        return 1
    console.rule(f"done in {time.perf_counter() - start:.0f} s")
    test = json.loads((run_dir / "test_metrics.json").read_text())
    print_metrics_table(test, meta.classes, console, title=f"test split, best epoch {test['best_epoch']}")
    for name in ("test_metrics.json", "confusion_test.png", "curves.png"):
        console.print(f"  {run_dir / name}")
    console.print(f"  {summary['grid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
