"""Every performance figure of cxrdist, measured in one run on one machine: tables on stdout, JSON on disk.

    python -m benchmarks [--quick] [--out FILE.json] [--sections pack loader step overhead baseline]
                         [--work DIR] [--per-class N] [--compile none|channels_last|all]
    python -m benchmarks --gpu [--quick] [--out FILE.json] [--work DIR]

Sections, each with ratios against a baseline measured in the same run (each lives in its own module):

  pack      (`benchmarks/pack.py`) `shard_tools.pack` images/s, 299 -> 128 px: 1 worker (the baseline)
            vs all cores.
  loader    (`benchmarks/loader.py`) input pipeline images/s over the same images: the study's
            ImageFolder + DataLoader with CPU transforms (the baseline), cxrdist streaming, cxrdist device
            cache, raw tar reading (the upper bound for anything that reads shards).
  step      (`benchmarks/step.py`) training-step images/s on batches already in memory (warm-up
            excluded, median of repeats), seed_cnn and resnet18 at 128 px with their recipes' batch size,
            optimizer and loss: fp32 vs bf16 autocast, channels_last off / on, torch.compile off / on.
  overhead  (`benchmarks/overhead.py`) `python -m cxrdist.train` with the recipe's defaults: steady-state
            epoch images/s over the pure-compute images/s of the same model and settings; seed_cnn and
            resnet18, streaming from the shards and from the device cache.
  baseline  (`benchmarks/baseline.py`) the study's plain PyTorch script (`benchmarks/baseline_study.py`)
            vs `python -m cxrdist.train recipes/cnn.toml`: the same images, split, epochs and batch size;
            wall time of each whole process (evaluation included) and test accuracy.

`--gpu` runs the GPU check instead (`benchmarks/gpu.py`): CUDA tests plus compute-only vs end-to-end
throughput on one GPU.

Data: synthetic 299 px radiographs (`shard_tools.synth`, like the database), or with --src a folder of
real class folders (e.g. ../shared/data/cxr-real-sample/COVID-19_Radiography_Dataset), packed at 128 px
with the default 70/15/15 split (`benchmarks.common.synthetic_dataset`); the overhead section's larger
synthetic sets stay synthetic. Everything lives in a temporary folder (or
--work, kept for the next run); the JSON goes to --out (default: a new file in the system's temp folder,
printed at the end), so nothing lands in the repository. Other processes slow every figure: the load
average is recorded before and after each section; take results from a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.common import (
    IMAGE_SIZE_PX,
    default_device,
    describe_machine,
    load_average,
    machine_info,
    match_training_process,
    synthetic_dataset,
    write_json,
)
from benchmarks.step import StepTiming
from shard_tools.cli import positive_int, run_main
from shard_tools.errors import InputError

SECTIONS = ("pack", "loader", "step", "overhead", "baseline")


@dataclass(frozen=True)
class Plan:
    """How much of everything to measure. FULL takes about 10 minutes on 2 cores, QUICK under a minute."""

    per_class: int  # synthetic images per class (4 classes), 299 px
    repeats: int  # pack and loader cases: best of this many
    loader_batch: int
    step_timing: StepTiming
    step_batch: int  # 0 = the recipe's per_device_batch_size
    compile: str  # which step cases also run compiled: "none", "channels_last" or "all"
    # Per model: images per class of a second synthetic set, drawn at 128 px, so that a fast model's epoch
    # lasts seconds; 0 = the first set (a slow model's epoch is long enough on it).
    overhead_per_class: dict[str, int]
    overhead_epochs: dict[str, int]  # per model; the first epoch is warm-up, the rest are reported
    overhead_cases: tuple[tuple[str, str], ...]  # (model, data.cache) pairs
    baseline_epochs: int  # 0 = the recipe's (20 for recipes/cnn.toml)


FULL = Plan(
    per_class=400,
    repeats=2,
    loader_batch=64,
    step_timing=StepTiming(warmup=3, repeats=5, repeat_s=1.5),
    step_batch=0,
    compile="channels_last",
    overhead_per_class={"seed_cnn": 1000, "resnet18": 0},
    overhead_epochs={"seed_cnn": 8, "resnet18": 3},
    overhead_cases=(
        ("seed_cnn", "none"),
        ("seed_cnn", "device"),
        ("resnet18", "none"),
        ("resnet18", "device"),
    ),
    baseline_epochs=0,
)
QUICK = Plan(
    per_class=16,
    repeats=1,
    loader_batch=64,
    step_timing=StepTiming(warmup=1, repeats=1, repeat_s=0.0),
    step_batch=8,
    compile="none",
    overhead_per_class={"seed_cnn": 0, "resnet18": 0},
    overhead_epochs={"seed_cnn": 2, "resnet18": 2},
    overhead_cases=(("seed_cnn", "none"), ("resnet18", "device")),  # one of each: process starts dominate
    baseline_epochs=1,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, about a minute: checks that it all runs")
    p.add_argument(
        "--gpu", action="store_true", help="the GPU check (benchmarks/gpu.py) instead of the sections"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="JSON results (default: a new file in the temp folder)"
    )
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=None)
    p.add_argument("--work", type=Path, default=None, help="keep images, shards and runs here for reuse")
    p.add_argument(
        "--per-class", type=positive_int, default=None, help="synthetic images per class (4 classes)"
    )
    p.add_argument(
        "--baseline-epochs",
        type=positive_int,
        default=None,
        help="baseline section: epochs (default: the recipe's)",
    )
    p.add_argument(
        "--src",
        type=Path,
        default=None,
        help="class folders of real radiographs to use instead of the synthetic set (read, never written)",
    )
    p.add_argument(
        "--compile",
        choices=("none", "channels_last", "all"),
        default=None,
        help="step cases also timed under torch.compile (default: channels_last; none with --quick)",
    )
    args = p.parse_args(argv)
    if args.gpu and (args.sections or args.per_class or args.compile or args.src):
        raise InputError(
            "--gpu runs its own plan (benchmarks/gpu.py): --sections, --per-class, --src and --compile "
            "do not apply"
        )
    if args.src is not None and not args.src.is_dir():
        raise InputError(f"--src {args.src} is not a folder of class folders")
    return args


def run_sections(args: argparse.Namespace, argv: list[str] | None) -> int:
    from benchmarks.baseline import bench_baseline
    from benchmarks.loader import bench_loader
    from benchmarks.overhead import bench_overhead
    from benchmarks.pack import bench_pack
    from benchmarks.step import bench_step
    from cxrdist.config import DataConfig

    plan = QUICK if args.quick else FULL
    plan = replace(
        plan,
        per_class=args.per_class or plan.per_class,
        compile=args.compile or plan.compile,
        baseline_epochs=args.baseline_epochs or plan.baseline_epochs,
    )
    sections = args.sections or list(SECTIONS)
    device = default_device()
    match_training_process(device)  # the compute references get the training process's settings
    out = (
        args.out
        or Path(tempfile.gettempdir()) / f"cxrdist-benchmarks-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    )
    results: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "plan": asdict(plan),
        "machine": machine_info(device),
    }
    print(describe_machine(results["machine"]))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxrdist-benchmarks-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # A cold compile cache of our own: compile times are what a first run pays, and nothing is shared.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        load_before, start = load_average(), time.perf_counter()
        data = synthetic_dataset(work, plan.per_class, src=args.src)
        results["data"] = {
            "source": str(args.src.resolve()) if args.src else "synthetic",
            "per_class": plan.per_class if args.src is None else None,
            "splits": data.counts,
            "image_size_px": IMAGE_SIZE_PX,
            "prepare_s": time.perf_counter() - start,
            "load_before": load_before,
        }
        print(
            f"data: {sum(data.counts.values())} {'synthetic' if args.src is None else 'real'} images, "
            f"split {data.counts}, ready in "
            f"{results['data']['prepare_s']:.1f} s"
        )

        def overhead_data() -> dict[str, Any]:
            return {
                model: synthetic_dataset(work, n, IMAGE_SIZE_PX) if n else data
                for model, n in plan.overhead_per_class.items()
            }

        cores = os.cpu_count() or 1
        run: dict[str, Callable[[], dict[str, Any]]] = {
            "pack": lambda: bench_pack(data.src, work, cores, plan.repeats),
            "loader": lambda: bench_loader(
                data, device, plan.loader_batch, DataConfig().num_workers, plan.repeats
            ),
            "step": lambda: bench_step(plan.step_batch, plan.step_timing, plan.compile, device),
            "overhead": lambda: bench_overhead(
                overhead_data(), work, plan.overhead_cases, plan.overhead_epochs, plan.step_timing, device
            ),
            "baseline": lambda: bench_baseline(data, work, plan.baseline_epochs, device),
        }
        for name in SECTIONS:
            if name in sections:
                load_before, start = load_average(), time.perf_counter()
                results[name] = run[name]()
                results[name].update(
                    seconds=time.perf_counter() - start, load_before=load_before, load_after=load_average()
                )
    results["seconds"] = time.perf_counter() - started
    write_json(out, results)
    print(f"\nall figures above: one run, {results['seconds']:.0f} s, load average now {load_average()}")
    print(f"results: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gpu:
        from benchmarks.gpu import run_gpu_check

        return run_gpu_check(args.quick, args.out, args.work)
    return run_sections(args, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
