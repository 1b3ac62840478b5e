"""Every performance figure of cxrdist, measured in one run on one machine: tables on stdout, JSON on disk.

    python -m benchmarks [--quick] [--out FILE.json] [--sections pack loader step overhead baseline]
                         [--work DIR] [--per-class N] [--compile none|channels_last|all]

Sections, each with ratios against a baseline measured in the same run:

  pack      `shard_tools.pack` images/s, 299 -> 128 px: 1 worker (the baseline) vs all cores.
  loader    input pipeline images/s over the same images: the study's ImageFolder + DataLoader with CPU
            transforms (the baseline), cxrdist streaming, cxrdist device cache, raw tar reading (the upper
            bound for anything that reads shards). The cases of `benchmarks/loader.py`.
  step      training-step images/s on batches already in memory (warm-up excluded, median of repeats),
            seed_cnn and resnet18 at 128 px with their recipes' batch size, optimizer and loss: fp32 vs
            bf16 autocast, channels_last off / on, torch.compile off / on (compile time reported apart).
  overhead  `python -m cxrdist.train` with the recipe's defaults: the steady-state epoch time it writes
            to metrics.jsonl (training steps only, not validation) over the pure-compute time of the same
            model, batch, precision and memory format on in-memory batches, measured right after it.
            seed_cnn and resnet18, streaming from the shards and from the device cache.
  baseline  the study's plain PyTorch script (`benchmarks/baseline_study.py`) vs `python -m
            cxrdist.train recipes/cnn.toml` with all its defaults: the same images, split, epochs and batch
            size; wall time of each whole process (evaluation included) and test accuracy.

Data: synthetic 299 px radiographs (`shard_tools.synth`, like the database), packed at 128 px with the
default 70/15/15 split. The loader cases read the train split; the baseline script reads the original
PNGs of the train and test splits through ImageFolder (symlinked into class folders). Everything lives in a
temporary folder (or --work, kept for the next run); the JSON goes to --out (default: a new file in the
system's temp folder, printed at the end), so nothing lands in the repository. Other processes slow
every figure: the load average is recorded before and after each section; take results from a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# As `cxrdist.train` does (see there), so that the pure-compute references wait for OpenMP threads the
# way the training runs do. A user's setting wins, and then also reaches the plain baseline script.
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402 - after the environment it reads at load

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE_PX = 128  # the study's resolution
RECIPES = {"seed_cnn": "recipes/cnn.toml", "resnet18": "recipes/resnet18_scratch.toml"}
SECTIONS = ("pack", "loader", "step", "overhead", "baseline")


@dataclass(frozen=True)
class Plan:
    """How much of everything to measure. FULL takes about 10 minutes on 2 cores, QUICK under a minute."""

    per_class: int  # synthetic images per class (4 classes), 299 px
    repeats: int  # pack and loader cases: best of this many
    step_warmup: int  # untimed steps before timing (the first one also compiles)
    step_repeats: int  # timed repeats; the median is reported
    step_repeat_s: float  # each timed repeat runs enough steps to last about this long
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
    step_warmup=3,
    step_repeats=5,
    step_repeat_s=1.5,
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
    step_warmup=1,
    step_repeats=1,
    step_repeat_s=0.0,
    step_batch=8,
    compile="none",
    overhead_per_class={"seed_cnn": 0, "resnet18": 0},
    overhead_epochs={"seed_cnn": 2, "resnet18": 2},
    overhead_cases=(("seed_cnn", "none"), ("resnet18", "device")),  # one of each: process starts dominate
    baseline_epochs=1,
)


class BenchError(RuntimeError):
    """A benchmark could not run; the message says which and why."""


# ------------------------------------------------------------------------------------------ reporting


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU, cores, memory, GPU, library versions and the date: what a reader needs to compare numbers."""
    import accelerate
    import numpy
    import PIL
    import timm
    import torchvision
    import webdataset

    from cxrdist.artifacts import provenance

    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    memory_gb = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory_gb = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}),
        "memory_gb": memory_gb,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
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
        "glibc_keeps_freed_blocks": device.type == "cpu",  # cxrdist.train.keep_freed_memory, here too
        **provenance(),
    }
    return info


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in text:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    sys.stdout.flush()


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


# ----------------------------------------------------------------------------------------------- data


def prepare_data(work: Path, per_class: int) -> dict[str, Any]:
    """299 px synthetic images, their 128 px shards (70/15/15) and ImageFolder views of train and test.

    Reuses what an earlier run left in `work` when it was made with the same `per_class`.
    """
    from shard_tools.pack import pack
    from shard_tools.synth import generate

    stamp = work / "plan.json"
    if not stamp.exists() or json.loads(stamp.read_text()).get("per_class") != per_class:
        for name in ("src", "shards", "folders"):
            shutil.rmtree(work / name, ignore_errors=True)
        stamp.unlink(missing_ok=True)
    src, shards = work / "src", work / "shards"
    if not src.exists():
        generate(src, per_class=per_class, size=299, seed=0)
    start = time.perf_counter()
    if not (shards / "manifest.json").exists():
        pack(src, shards, size=IMAGE_SIZE_PX, seed=0, progress=False, command=[])
    pack_s = time.perf_counter() - start
    folders = {split: link_split(shards, src, split, work / "folders" / split) for split in ("train", "test")}
    stamp.write_text(json.dumps({"per_class": per_class}))
    manifest = json.loads((shards / "manifest.json").read_text())
    counts = {s: manifest["splits"][s]["count"] for s in manifest["splits"]}
    return {"src": src, "shards": shards, "folders": folders, "counts": counts, "pack_s": pack_s}


def link_split(shards: Path, src: Path, split: str, out: Path) -> Path:
    """`out/<Class>/<file>`: symlinks to the original images of one packed split (read from the shards'
    provenance records), so that the baseline script trains and tests on exactly cxrdist's split."""
    if out.exists():
        return out
    manifest = json.loads((shards / "manifest.json").read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shards / shard["file"]) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                record = json.loads(tar.extractfile(member).read())
                target = (
                    tmp / record["class"] / f"{member.name[: -len('.json')]}{Path(record['path']).suffix}"
                )
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to((src / record["path"]).resolve())
    tmp.rename(out)
    return out


# The two process settings `cxrdist.train` makes for itself on a CPU (OpenMP threads sleep while they
# wait; glibc keeps freed large blocks), as environment variables for a program that does not.
TUNED_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "MALLOC_MMAP_THRESHOLD_": str(256 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}


def child_env(tuned: bool | None = None) -> dict[str, str]:
    """Environment of a process we time: ours, minus colour codes and hub access. Thread counts are left
    to the programs' own defaults: those are what the benchmark is about. `tuned` False: without the
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
    res = subprocess.run(
        cmd, cwd=ROOT, env=child_env(tuned), capture_output=True, text=True, timeout=timeout_s
    )
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise BenchError(f"{what} failed (exit {res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return res, wall


# ----------------------------------------------------------------------------------------------- pack


def bench_pack(data: dict[str, Any], work: Path, plan: Plan) -> dict[str, Any]:
    from benchmarks.pack import shard_hashes, time_pack

    n = sum(data["counts"].values())
    cores = os.cpu_count() or 1
    one = many = math.inf
    for _ in range(plan.repeats):  # interleaved, best of each: load from elsewhere hits both alike
        t, m1 = time_pack(data["src"], work / "pack-1", IMAGE_SIZE_PX, 1)
        one = min(one, t)
        t, m2 = time_pack(data["src"], work / "pack-n", IMAGE_SIZE_PX, cores)
        many = min(many, t)
    for name in ("pack-1", "pack-n"):
        shutil.rmtree(work / name, ignore_errors=True)
    rows = [
        {"case": "1 worker (baseline)", "workers": 1, "seconds": one, "images_per_s": n / one},
        {"case": f"{cores} workers (all cores)", "workers": cores, "seconds": many, "images_per_s": n / many},
    ]
    for r in rows:
        r["vs_baseline"] = r["images_per_s"] / rows[0]["images_per_s"]
    print_table(
        f"pack: {n} images 299 -> {IMAGE_SIZE_PX} px, best of {plan.repeats}",
        ["case", "images/s", "vs 1 worker"],
        [[r["case"], r["images_per_s"], f"{r['vs_baseline']:.2f}x"] for r in rows],
    )
    return {"images": n, "rows": rows, "byte_identical": shard_hashes(m1) == shard_hashes(m2)}


# --------------------------------------------------------------------------------------------- loader


def bench_loader(data: dict[str, Any], device: torch.device, plan: Plan) -> dict[str, Any]:
    """The cases of benchmarks/loader.py, on the train split's images."""
    from benchmarks.loader import clocked, consume, device_preparers, raw_tar, study_pipeline
    from cxrdist.config import load_config
    from cxrdist.data import DeviceCache, read_manifest, steps_per_epoch, train_batches

    cfg = load_config(ROOT / RECIPES["seed_cnn"])
    workers, batch = cfg.data.num_workers, 64
    manifest = read_manifest(str(data["shards"]))
    count = manifest.count("train")
    steps = steps_per_epoch(count, batch)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as benchmarks/loader.py: the workers hold the other cores
    try:
        cases: list[tuple[str, str, Callable[[], tuple[int, float]]]] = [
            (
                "a",
                "ImageFolder + CPU transforms (the study)",
                clocked(study_pipeline(data["folders"]["train"], batch, workers, IMAGE_SIZE_PX)),
            ),
        ]
        preparers = device_preparers(device)
        epoch_counter = [0]
        for suffix, prep in preparers.items():

            def streaming(prep=prep) -> int:
                epoch_counter[0] += 1
                batches = train_batches(
                    manifest,
                    batch_size=batch,
                    steps=steps,
                    epoch=epoch_counter[0],
                    seed=0,
                    rank=0,
                    world_size=1,
                    num_workers=workers,
                    shuffle_buffer=cfg.data.shuffle_buffer,
                    pin_memory=device.type == "cuda",
                )
                return consume(batches, prep, device)

            what = "uint8 -> float on the device" if not suffix else "+ rotation/flip/normalise on the device"
            cases.append((f"b{suffix}", f"cxrdist streaming, {what}", clocked(streaming)))
        start = time.perf_counter()
        cache = DeviceCache.load(manifest, "train", device, 1 << 40, workers)
        fill_s = time.perf_counter() - start
        for suffix, prep in preparers.items():

            def cached(prep=prep) -> tuple[int, float]:
                start = time.perf_counter()
                batches = cache.train_batches(
                    batch_size=batch, steps=steps, epoch=2, seed=0, rank=0, world_size=1
                )
                return consume(batches, prep, device), time.perf_counter() - start

            what = "uint8 -> float" if not suffix else "+ rotation/flip/normalise"
            cases.append((f"c{suffix}", f"cxrdist device cache, {what}", cached))
        cases.append(
            (
                "d",
                "raw tar reading, no decoding (upper bound)",
                clocked(raw_tar(manifest.shard_urls("train"))),
            )
        )
        rows = []
        for tag, name, case in cases:
            best = math.inf
            for _ in range(plan.repeats):
                n, seconds = case()
                best = min(best, seconds)
            rows.append({"case": f"({tag}) {name}", "images_per_s": n / best})
    finally:
        torch.set_num_threads(threads)
    for r in rows:
        r["vs_baseline"] = r["images_per_s"] / rows[0]["images_per_s"]
    print_table(
        f"loader: {count} images, {IMAGE_SIZE_PX} px, batch {batch}, {workers} workers, device {device}, "
        f"best of {plan.repeats}; cache filled in {fill_s:.2f} s",
        ["case", "images/s", "vs (a)"],
        [[r["case"], r["images_per_s"], f"{r['vs_baseline']:.1f}x"] for r in rows],
    )
    return {"images": count, "batch_size": batch, "workers": workers, "cache_fill_s": fill_s, "rows": rows}


# ----------------------------------------------------------------------------------------------- step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_step(
    model_name: str, batch_size: int, precision: str, channels_last: bool, compiled: bool, plan: Plan
) -> dict[str, Any]:
    """Images/s of the recipe's forward + loss + backward + optimizer step on one in-memory batch.

    Input: float32 (B, 3, 128, 128) already normalised (what `cxrdist.augment` hands the model), in the
    memory format the model uses. Warm-up steps are not timed (the first one compiles, and its time is
    returned apart); each timed repeat runs enough steps to last `plan.step_repeat_s`; the median repeat
    is reported. Failures (e.g. torch.compile without a working compiler) are returned as text.
    """
    from cxrdist.config import load_config
    from cxrdist.models import create_model
    from cxrdist.train import build_optimizer, loss_fn

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(ROOT / RECIPES[model_name])
    out: dict[str, Any] = {
        "model": model_name,
        "batch_size": batch_size,
        "precision": precision,
        "channels_last": channels_last,
        "compile": compiled,
    }
    try:
        torch.manual_seed(0)
        model = create_model(cfg.model, num_classes=4)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(device=device, memory_format=fmt).train()
        optimizer = build_optimizer(model, cfg.optim)
        forward = torch.compile(model) if compiled else model
        x = torch.randn(batch_size, cfg.model.in_chans, IMAGE_SIZE_PX, IMAGE_SIZE_PX, device=device)
        x = x.contiguous(memory_format=fmt)
        y = torch.randint(0, 4, (batch_size,), device=device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

        def step() -> float:
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = forward(x)
            loss = loss_fn(logits, y, cfg.train, None)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            return time.perf_counter() - start

        out["first_step_s"] = step()
        last = out["first_step_s"]
        for _ in range(plan.step_warmup - 1):
            last = step()
        steps = max(1, math.ceil(plan.step_repeat_s / max(last, 1e-6)))
        rates = [batch_size * steps / sum(step() for _ in range(steps)) for _ in range(plan.step_repeats)]
        out.update(images_per_s=statistics.median(rates), repeats=rates, steps_per_repeat=steps)
    except Exception as e:  # noqa: BLE001 - recorded, not hidden: the table shows it
        out["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    finally:
        if compiled:
            torch._dynamo.reset()
    return out


def bench_step(plan: Plan) -> dict[str, Any]:
    from cxrdist.config import load_config

    rows = []
    for model_name, recipe in RECIPES.items():
        batch = plan.step_batch or load_config(ROOT / recipe).train.per_device_batch_size
        for channels_last in (False, True):
            for precision in ("no", "bf16"):
                rows.append(time_training_step(model_name, batch, precision, channels_last, False, plan))
                if plan.compile == "all" or (plan.compile == "channels_last" and channels_last):
                    rows.append(time_training_step(model_name, batch, precision, channels_last, True, plan))
    for r in rows:  # the baseline: the same model in fp32, NCHW, eager (PyTorch's defaults)
        base = next(
            b
            for b in rows
            if b["model"] == r["model"]
            and (b["precision"], b["channels_last"], b["compile"]) == ("no", False, False)
        )
        r["vs_baseline"] = ratio(r.get("images_per_s"), base.get("images_per_s"))
    table = []
    for r in rows:
        result = r.get("images_per_s") if "error" not in r else "failed: " + r["error"].splitlines()[0][:60]
        speedup = f"{r['vs_baseline']:.2f}x" if r["vs_baseline"] else "-"
        compile_s = r.get("first_step_s") if r["compile"] else None
        table.append(
            [
                f"{r['model']} b{r['batch_size']}",
                "bf16" if r["precision"] == "bf16" else "fp32",
                "on" if r["channels_last"] else "off",
                "on" if r["compile"] else "off",
                result,
                speedup,
                compile_s,
            ]
        )
    print_table(
        f"training step: in-memory batches, {IMAGE_SIZE_PX} px, median of {plan.step_repeats}, "
        f"{torch.get_num_threads()} threads",
        ["model", "precision", "channels_last", "compile", "images/s", "vs fp32 NCHW eager", "compile s"],
        table,
    )
    return {"rows": rows, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------- overhead


def train_run(recipe: str, run_dir: Path, shards: Path, sets: list[str]) -> dict[str, Any]:
    """`python -m cxrdist.train RECIPE` with `--set`s; its metrics rows, test accuracy and wall time."""
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [f"run.dir={run_dir}", f"data.shards={shards}", *sets]
    cmd = [sys.executable, "-m", "cxrdist.train", recipe, *(a for s in args for a in ("--set", s))]
    _res, wall = run_timed(cmd, f"cxrdist.train {recipe}", tuned=False)  # its own defaults, nothing more
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    test = json.loads((run_dir / "test_metrics.json").read_text())
    return {"wall_s": wall, "rows": rows, "test_accuracy": test["accuracy"]}


def resolved_training(recipe: str) -> dict[str, Any]:
    """What `cxrdist.train` will use for this recipe on this machine with no overrides."""
    from cxrdist.config import load_config
    from cxrdist.train import resolve_mixed_precision

    cfg = load_config(ROOT / recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "batch_size": cfg.train.per_device_batch_size,
        "precision": resolve_mixed_precision(cfg.train.mixed_precision, device),
        "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile,
        "num_workers": cfg.data.num_workers,
    }


def overhead_shards(data: dict[str, Any], work: Path, per_class: int) -> tuple[Path, int]:
    """(shard folder, train images) for the overhead runs: a larger set drawn straight at 128 px (cheap:
    nothing to resize), so that an epoch lasts seconds and per-epoch costs weigh as they would on the
    real database; or the main set."""
    if not per_class:
        return data["shards"], data["counts"]["train"]
    from shard_tools.pack import pack
    from shard_tools.synth import generate

    src, shards = work / f"src128-{per_class}", work / f"shards128-{per_class}"
    if not (shards / "manifest.json").exists():
        shutil.rmtree(src, ignore_errors=True)
        generate(src, per_class=per_class, size=IMAGE_SIZE_PX, seed=1)
        pack(src, shards, size=IMAGE_SIZE_PX, seed=0, progress=False, command=[])
        shutil.rmtree(src)
    return shards, json.loads((shards / "manifest.json").read_text())["splits"]["train"]["count"]


def bench_overhead(data: dict[str, Any], work: Path, plan: Plan) -> dict[str, Any]:
    """e2e / compute per case. Compute is timed right before and right after the training run, and the
    two are pooled, so that a slow drift of the machine's speed hits both sides alike. Also reported:
    the best steady epoch over the best compute repeat, which load from other processes (it only ever
    slows things down) disturbs least."""
    rows = []
    for model_name, cache in plan.overhead_cases:
        shards, train_images = overhead_shards(data, work, plan.overhead_per_class[model_name])
        recipe = RECIPES[model_name]
        settings = resolved_training(recipe)
        epochs = plan.overhead_epochs[model_name]
        step_case = (
            model_name,
            settings["batch_size"],
            settings["precision"],
            settings["channels_last"],
            settings["compile"],
            plan,
        )
        load_before = load_average()
        before = time_training_step(*step_case)
        run = train_run(
            recipe,
            work / "runs" / f"{model_name}-{cache}",
            shards,
            [f"train.epochs={epochs}", f"data.cache={cache}"],
        )
        after = time_training_step(*step_case)
        steady = [r["images_per_s"] for r in (run["rows"][1:] or run["rows"])]  # epoch 1: one-time warm-up
        repeats = before.get("repeats", []) + after.get("repeats", [])
        compute = statistics.median(repeats) if repeats else None
        rows.append(
            {
                "model": model_name,
                "input": "streaming" if cache == "none" else "device cache",
                **settings,
                "train_images": train_images,
                "epochs": epochs,
                "epoch_seconds": [r["epoch_seconds"] for r in run["rows"]],
                "e2e_images_per_s": statistics.median(steady),
                "e2e_best_images_per_s": max(steady),
                "compute_images_per_s": compute,
                "compute_best_images_per_s": max(repeats) if repeats else None,
                "compute_repeats": repeats,
                "compute_error": before.get("error") or after.get("error"),
                "overhead": ratio(compute, statistics.median(steady)),
                "overhead_best": ratio(max(repeats) if repeats else None, max(steady)),
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


# ------------------------------------------------------------------------------------------- baseline


def bench_baseline(data: dict[str, Any], work: Path, plan: Plan) -> dict[str, Any]:
    """The study's script as a user would run it (the baseline), the same script given the two process
    settings cxrdist makes for itself (`TUNED_ENV`: how much of the gap they alone close), and
    `python -m cxrdist.train` on the recipe with all its defaults."""
    from cxrdist.config import load_config

    recipe = RECIPES["seed_cnn"]
    cfg = load_config(ROOT / recipe)
    epochs = plan.baseline_epochs or cfg.train.epochs
    batch = cfg.train.per_device_batch_size
    workers = min(os.cpu_count() or 1, 8)
    load_before = load_average()
    scripts = {}
    for name, tuned in (("study_script", False), ("study_script_tuned_env", True)):
        out_json = work / f"{name}.json"
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "baseline_study.py"),
            str(data["folders"]["train"]),
            str(data["folders"]["test"]),
            f"--epochs={epochs}",
            f"--batch-size={batch}",
            f"--workers={workers}",
            f"--json={out_json}",
        ]
        _res, wall = run_timed(cmd, "benchmarks/baseline_study.py", tuned=tuned)
        study = json.loads(out_json.read_text())
        scripts[name] = {
            "wall_s": wall,
            "test_accuracy": study["test_accuracy"],
            "workers": workers,
            "train_images_per_s": study["train_images_per_s"],
            "env": TUNED_ENV if tuned else {},
        }
    ours = train_run(recipe, work / "runs" / "baseline-cxrdist", data["shards"], [f"train.epochs={epochs}"])
    base = scripts["study_script"]["wall_s"]
    result = {
        "recipe": recipe,
        "epochs": epochs,
        "batch_size": batch,
        "train_images": data["counts"]["train"],
        "test_images": data["counts"]["test"],
        **scripts,
        "cxrdist": {
            "wall_s": ours["wall_s"],
            "test_accuracy": ours["test_accuracy"],
            "train_images_per_s": statistics.median(r["images_per_s"] for r in ours["rows"]),
            **resolved_training(recipe),
        },
        "pack_s": data["pack_s"],
        "speedup": base / ours["wall_s"],
        "speedup_vs_tuned_env": scripts["study_script_tuned_env"]["wall_s"] / ours["wall_s"],
        "speedup_including_pack": base / (ours["wall_s"] + data["pack_s"]) if data["pack_s"] else None,
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
    if data["pack_s"]:
        print(
            f"  packing these images once took {data['pack_s']:.1f} s; speed-up over the plain script "
            f"counting it: {result['speedup_including_pack']:.2f}x"
        )
    return result


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, under a minute: checks that it all runs")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON results (default: a new file in the temp folder)"
    )
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--work", type=Path, default=None, help="keep images, shards and runs here for reuse")
    p.add_argument("--per-class", type=int, default=None, help="synthetic images per class (4 classes)")
    p.add_argument(
        "--compile",
        choices=("none", "channels_last", "all"),
        default=None,
        help="step cases also timed under torch.compile (default: channels_last; none with --quick)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.per_class or args.compile:
        plan = Plan(
            **{
                **asdict(plan),
                "per_class": args.per_class or plan.per_class,
                "compile": args.compile or plan.compile,
            }
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        from cxrdist.train import keep_freed_memory

        keep_freed_memory()  # as cxrdist.train does: the compute references get the same allocator
    out = args.out or Path(tempfile.gettempdir()) / (
        f"cxrdist-benchmarks-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    )
    results: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "plan": asdict(plan),
        "machine": machine_info(device),
    }
    m = results["machine"]
    print(
        f"{m['date_utc']}  {m['cpu']}, {m['cpu_cores']} cores, {m['memory_gb']} GB; device {m['device']}"
        f"{' (' + m['gpu'] + ')' if m['gpu'] else ''}; torch {m['torch']}, torchvision {m['torchvision']}, "
        f"timm {m['timm']}, accelerate {m['accelerate']}; load average {load_average()}"
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxrdist-benchmarks-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # A cold compile cache of our own: compile times are what a first run pays, and nothing is shared.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        load_before = load_average()
        start = time.perf_counter()
        data = prepare_data(work, plan.per_class)
        results["data"] = {
            "per_class": plan.per_class,
            "splits": data["counts"],
            "image_size_px": IMAGE_SIZE_PX,
            "prepare_s": time.perf_counter() - start,
            "load_before": load_before,
        }
        print(
            f"data: {sum(data['counts'].values())} synthetic images, split {data['counts']}, ready in "
            f"{results['data']['prepare_s']:.1f} s"
        )
        sections: dict[str, Callable[[], dict[str, Any]]] = {
            "pack": lambda: bench_pack(data, work, plan),
            "loader": lambda: bench_loader(data, device, plan),
            "step": lambda: bench_step(plan),
            "overhead": lambda: bench_overhead(data, work, plan),
            "baseline": lambda: bench_baseline(data, work, plan),
        }
        for name in SECTIONS:
            if name not in args.sections:
                continue
            load_before, start = load_average(), time.perf_counter()
            results[name] = sections[name]()
            results[name].update(
                seconds=time.perf_counter() - start, load_before=load_before, load_after=load_average()
            )
    results["seconds"] = time.perf_counter() - started
    from cxrdist.artifacts import atomic_write_json

    atomic_write_json(out, results)
    print(f"\nall figures above: one run, {results['seconds']:.0f} s, load average now {load_average()}")
    print(f"results: {out}")
    return 0
