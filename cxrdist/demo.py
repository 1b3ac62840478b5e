"""The one-command demo: synthetic radiographs -> shards -> training -> evaluation -> Grad-CAM.

    python -m cxrdist.demo [--out DIR]

Needs no download and no GPU: it generates the four-class synthetic dataset (`shard_tools.synth`), packs
it (`shard_tools.pack`), trains `recipes/demo.toml` in this process, evaluates the best model on the test
split, and draws a Grad-CAM grid. Finishes in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from cxrdist.artifacts import load_trained_model
from cxrdist.cli import add_overrides
from cxrdist.config import load_config
from cxrdist.explain import explain_shards, print_summary
from shard_tools.cli import positive_int, run_main
from shard_tools.errors import EXIT_OK, InputError

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo.toml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cxrdist.demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="everything lands here (default demo_out)"
    )
    p.add_argument("--per-class", type=positive_int, default=300, help="synthetic images per class")
    p.add_argument("--size", type=positive_int, default=128, help="packed image size in pixels")
    add_overrides(p, "recipes/demo.toml")
    p.add_argument("--force", action="store_true", help="replace an earlier demo's output in OUT")
    return p.parse_args(argv)


# What the demo writes into OUT; --force replaces a folder holding only these.
DEMO_OUTPUTS = ("synthetic", "shards", "run", "gradcam")


def clear_out(out: Path, force: bool) -> None:
    """Make room for the demo in `out`: an empty or absent folder is used as is; an earlier demo's output
    is replaced with --force; anything else is refused, naming a file that would be lost."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {out} is a file; choose a folder")
    entries = sorted(out.iterdir())
    if not entries:
        return
    foreign = [p for p in entries if p.name not in DEMO_OUTPUTS]
    if foreign:
        raise InputError(
            f"--out {out} holds {foreign[0]}, which the demo did not write; choose another --out "
            "(--force only replaces an earlier demo's output)"
        )
    if not force:
        raise InputError(
            f"--out {out} holds an earlier demo's output: pass --force to replace it, or --out elsewhere"
        )
    for p in entries:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def main(argv: list[str] | None = None) -> int:
    from cxrdist.train import train
    from shard_tools.pack import pack
    from shard_tools.synth import generate

    args = parse_args(argv)
    console = Console(soft_wrap=True)  # paths stay on one line in logs
    out: Path = args.out
    if not RECIPE.is_file():
        raise InputError(f"{RECIPE} not found: run the demo from a cxrdist checkout")
    cfg = load_config(RECIPE, [f"run.dir={out / 'run'}", f"data.shards={out / 'shards'}", *args.overrides])
    clear_out(out, args.force)
    start = time.perf_counter()
    console.rule("1/4 synthetic radiographs")
    generate(out / "synthetic", per_class=args.per_class, seed=cfg.run.seed)
    console.rule("2/4 pack into WebDataset shards")
    pack(out / "synthetic", out / "shards", size=args.size, seed=cfg.run.seed, min_shards=4)
    console.rule("3/4 train recipes/demo.toml, then test the best model")
    run_dir = train(cfg)
    console.rule("4/4 Grad-CAM on test images")
    model, meta = load_trained_model(run_dir, torch.device("cpu"))
    summary = explain_shards(
        model, meta, str(out / "shards"), out / "gradcam", 4, "test", torch.device("cpu")
    )
    print_summary(summary, console)
    console.rule(f"done in {time.perf_counter() - start:.0f} s")
    for path in (
        run_dir / "test_metrics.json",
        run_dir / "confusion_test.png",
        run_dir / "curves.png",
        Path(summary["grid"]),
    ):
        if path.exists():
            console.print(f"  {path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_main(main))
