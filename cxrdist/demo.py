"""The one-command demo: synthetic radiographs -> shards -> training -> test metrics, Grad-CAM, report.

    python -m cxrdist.demo [--out DIR]

Needs no download and no GPU: it generates the four-class synthetic dataset (`shard_tools.synth`), packs
it (`shard_tools.pack`) and trains `recipes/demo.toml` in this process; training ends as every run does:
the best model is calibrated on the validation split and tested (95% intervals, ROC, reliability), a
Grad-CAM grid is drawn, the shortcut audit run (`cxrdist.audit`: does the model read the lungs?) and
`run/report.html` written; the demo ends with the audit's verdict. Finishes in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from cxrdist.cli import add_overrides
from cxrdist.config import load_config
from shard_tools.cli import positive_int, run_main, stdout_console
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
DEMO_OUTPUTS = ("synthetic", "shards", "run")


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
    from cxrdist.rundir import AUDIT_FILE, REPORT_FILE
    from cxrdist.train import train
    from shard_tools.pack import pack
    from shard_tools.synth import generate

    args = parse_args(argv)
    console = stdout_console()
    out: Path = args.out
    if not RECIPE.is_file():
        raise InputError(f"{RECIPE} not found: run the demo from a cxrdist checkout")
    cfg = load_config(RECIPE, [f"run.dir={out / 'run'}", f"data.shards={out / 'shards'}", *args.overrides])
    clear_out(out, args.force)
    start = time.perf_counter()
    console.rule("1/3 synthetic radiographs")
    generate(out / "synthetic", per_class=args.per_class, seed=cfg.run.seed, masks=True)  # audit: own masks
    console.rule("2/3 pack into WebDataset shards")
    pack(out / "synthetic", out / "shards", size=args.size, seed=cfg.run.seed, min_shards=4)
    console.rule("3/3 train recipes/demo.toml; test, calibrate and explain the best model")
    run_dir = train(cfg)
    console.rule(f"done in {time.perf_counter() - start:.0f} s")
    console.print(f"open the report: {run_dir / REPORT_FILE}", highlight=False)
    # The last word is whether the model read the lungs (cxrdist.audit), not its accuracy.
    console.print(json.loads((run_dir / AUDIT_FILE).read_text())["verdict"]["line"], highlight=False)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_main(main))
