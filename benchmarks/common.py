"""What every benchmark shares: where things are, the machine record, timing, tables, timed processes and
the synthetic data they measure on.

Data contract of `synthetic_dataset`: class folders ``SRC/<Class>/images/<Class>-<i>.png`` (uint8 gray,
`source_px` square, from `shard_tools.synth`) and their shards, packed at `IMAGE_SIZE_PX` with
`shard_tools.pack`'s default 70/15/15 split, both reused from `work` when an earlier run made the same set.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import USER_OMP_WAIT_POLICY
from shard_tools.errors import CxrdistError

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE_PX = 128  # the study's training resolution: every shard set here is packed at it
SOURCE_SIZE_PX = 299  # the database's PNGs
# The two models every training figure is about, and the recipe each is measured with.
RECIPES = {"seed_cnn": "recipes/cnn.toml", "resnet18": "recipes/resnet18_scratch.toml"}


class BenchError(CxrdistError):
    """A benchmark could not run or gave a wrong result; the message says which and why. Exit 1."""


# ------------------------------------------------------------------------------------------- machine


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU, cores, memory, GPU, library versions and the date: what a reader needs to compare numbers."""
    import accelerate
    import numpy
    import PIL
    import timm
    import torchvision
    import webdataset

    from cxrdist.artifacts import provenance

    memory_gb = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory_gb = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_bf16": sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16"}),
        "memory_gb": memory_gb,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_memory_gb": round(props.total_memory / 2**30, 1) if props else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "cuda": torch.version.cuda,  # the CUDA torch was built with (None: a CPU-only build)
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "webdataset": getattr(webdataset, "__version__", "?"),
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        **provenance(),
    }


def describe_machine(m: dict[str, Any]) -> str:
    """One line for the top of a benchmark's output."""
    gpu = (
        f" ({m['gpu']}, {m['gpu_memory_gb']} GB, compute capability {m['gpu_capability']})"
        if m["gpu"]
        else ""
    )
    return (
        f"{m['date_utc']}  {m['cpu']}, {m['cpu_cores']} cores, {m['memory_gb']} GB; "
        f"device {m['device']}{gpu}; "
        f"torch {m['torch']} (CUDA {m['cuda']}, cuDNN {m['cudnn']}), torchvision {m['torchvision']}, "
        f"timm {m['timm']}, accelerate {m['accelerate']}; load average {load_average()}"
    )


def match_training_process(device: torch.device) -> None:
    """Give this process the settings `cxrdist.train` gives itself on `device`, so that a compute-only
    reference measured here runs as the training step does: on CUDA TF32 and cuDNN autotuning, on a CPU
    glibc keeping freed blocks (`cxrdist.runtime.configure_device`, the one place for them)."""
    from cxrdist.runtime import configure_device

    configure_device(device)


# -------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA calls return before the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Case = Callable[[], tuple[int, float]]  # one run -> (items processed, seconds measured)


def clocked(run: Callable[[], int]) -> Case:
    """A case timing the whole of `run`, which returns how many items it processed."""

    def case() -> tuple[int, float]:
        start = time.perf_counter()
        n = run()
        return n, time.perf_counter() - start

    return case


def best_rates(cases: Sequence[Case], repeats: int) -> list[float]:
    """Items/s of each case, the best of `repeats` runs. Runs are interleaved (case 1, 2, ..., 1, 2, ...)
    so that load from other processes, which only ever slows a run down, hits every case alike."""
    best = [0.0] * len(cases)
    for _ in range(repeats):
        for i, case in enumerate(cases):
            n, seconds = case()
            best[i] = max(best[i], n / seconds)
    return best


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


# -------------------------------------------------------------------------------------------- tables


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """An aligned plain-text table on stdout: first column left, the others right."""
    text = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(f"\n{title}")
    print(line(header))
    for r in text:
        print(line(r))
    sys.stdout.flush()


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """The same table as GitHub markdown, ready to paste into BENCHMARKS.md."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: dict[str, Any]) -> None:
    from shard_tools.files import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


# ---------------------------------------------------------------------------------- timed processes

# The two process settings `cxrdist.train` makes for itself on a CPU (OpenMP threads sleep while they
# wait; glibc keeps freed large blocks), as environment variables for a program that does not.
TUNED_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "MALLOC_MMAP_THRESHOLD_": str(256 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}


def child_env(tuned: bool | None = None) -> dict[str, str]:
    """Environment of a process we time: ours, minus colour codes and hub access. Thread counts are left
    to the programs' own defaults: those are what the benchmarks are about. `tuned` False: without the
    OpenMP setting this process made for itself; True: with `TUNED_ENV`; None: as it is."""
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if tuned is False and USER_OMP_WAIT_POLICY is None:
        env.pop("OMP_WAIT_POLICY", None)
    if tuned:
        env.update(TUNED_ENV)
    return env


def run_timed(
    cmd: list[str], what: str, timeout_s: float = 1800, tuned: bool | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` from the repository root; (result, wall seconds). Raises BenchError when it fails."""
    start = time.perf_counter()
    try:
        res = subprocess.run(
            cmd, cwd=ROOT, env=child_env(tuned), capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{what} did not finish within {timeout_s:.0f} s: {' '.join(cmd)}") from e
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise BenchError(f"{what} failed (exit {res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return res, wall


def train_run(
    recipe: str, run_dir: Path, shards: Path, sets: Sequence[str], timeout_s: float = 1800
) -> dict[str, Any]:
    """`python -m cxrdist.train RECIPE` with `--set`s and nothing else of ours (its own process settings):
    its metrics.jsonl rows, test metrics and wall time."""
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [f"run.dir={run_dir}", f"data.shards={shards}", *sets]
    cmd = [sys.executable, "-m", "cxrdist.train", recipe, *(a for s in args for a in ("--set", s))]
    res, wall = run_timed(cmd, f"cxrdist.train {recipe}", timeout_s=timeout_s, tuned=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    test = json.loads((run_dir / "test_metrics.json").read_text())
    return {
        "wall_s": wall,
        "rows": rows,
        "test": test,
        "test_accuracy": test["accuracy"],
        "stdout": res.stdout,
    }


def steady_images_per_s(rows: list[dict[str, Any]]) -> list[float]:
    """Training images/s of each epoch after the first (warm-up: autotuning, first allocations), or of
    the only epoch."""
    return [r["images_per_s"] for r in (rows[1:] or rows)]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Dataset:
    """One set of images, as class folders and as shards packed at `IMAGE_SIZE_PX`."""

    src: Path  # class folders the shards were packed from
    shards: Path  # manifest.json + {split}-NNNNNN.tar
    counts: dict[str, int]  # images per split
    generate_s: float  # seconds spent drawing the images in this run (0: reused or given)
    pack_s: float  # seconds spent packing them in this run (0: reused)


def synthetic_source(
    work: Path, per_class: int, source_px: int, seed: int, workers: int | None
) -> tuple[Path, float]:
    """`work/synth-.../src`: `per_class` synthetic radiographs per class at `source_px`, and the seconds
    drawing them took (0 when an earlier run left the same set there)."""
    from shard_tools.synth import generate

    src = work / f"synth-{per_class}x{source_px}px-seed{seed}" / "src"
    if src.is_dir():
        return src, 0.0
    start = time.perf_counter()
    generate(src, per_class=per_class, size=source_px, seed=seed, workers=workers)
    return src, time.perf_counter() - start


def synthetic_dataset(
    work: Path,
    per_class: int,
    source_px: int = SOURCE_SIZE_PX,
    *,
    seed: int = 0,
    workers: int | None = None,
    src: Path | None = None,
) -> Dataset:
    """Images (synthetic, or the class folders `src`) and their shards at `IMAGE_SIZE_PX`, 70/15/15.

    Drawing straight at `source_px` = `IMAGE_SIZE_PX` makes packing cheap (nothing to resize); 299 px is
    what the database holds. `workers` (default: all cores) draw and pack; the output does not depend on it.
    """
    from shard_tools.pack import pack

    generate_s = 0.0
    if src is None:
        src, generate_s = synthetic_source(work, per_class, source_px, seed, workers)
        shards = src.parent / f"shards-{IMAGE_SIZE_PX}px"
    else:  # someone else's folder (the shared real samples): read it, write nothing beside it
        src = src.resolve()
        shards = work / f"given-{src.parent.name}-{src.name}" / f"shards-{IMAGE_SIZE_PX}px"
    pack_s = 0.0
    if not (shards / "manifest.json").exists():
        start = time.perf_counter()
        pack(src, shards, size=IMAGE_SIZE_PX, seed=0, workers=workers, progress=False, force=True, command=[])
        pack_s = time.perf_counter() - start
    manifest = json.loads((shards / "manifest.json").read_text())
    counts = {s: manifest["splits"][s]["count"] for s in manifest["splits"]}
    return Dataset(src=src, shards=shards, counts=counts, generate_s=generate_s, pack_s=pack_s)


def image_folder(data: Dataset, split: str) -> Path:
    """`<Class>/<file>` symlinks to the original images of one packed split (read from the shards'
    provenance records), so that torchvision's ImageFolder reads exactly cxrdist's split."""
    out = data.shards.parent / "folders" / split
    if out.exists():
        return out
    manifest = json.loads((data.shards / "manifest.json").read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(data.shards / shard["file"]) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                record = json.loads(tar.extractfile(member).read())
                name = f"{member.name[: -len('.json')]}{Path(record['path']).suffix}"
                target = tmp / record["class"] / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to((data.src / record["path"]).resolve())
    tmp.rename(out)
    return out
