"""The GPU check: in one command, the CUDA paths tested and the training pipeline measured against pure
compute on one GPU, with a table ready for BENCHMARKS.md.

On a GPU machine that holds a copy of this working tree (the device machine has no network):

    bash benchmarks/gpu_check.sh             # checks the environment, then `python -m benchmarks --gpu`

`gpu_check.sh` says how to bring the few packages the machine's image lacks (`fetch-wheels`, run where
PyPI is reachable). Where everything is installed, `python -m benchmarks --gpu [--out FILE.json]` alone.
`python -m benchmarks --gpu --quick` runs the same plan at toy sizes, on the CPU where there is no GPU
(there `pytest -m cuda` skips every test); CI runs it (tests/test_benchmarks.py).

The plan, in order (4.6 minutes on one H200 with 16 cores on 2026-12-04; it must stay under 8):

 1. the device, torch, CUDA and cuDNN versions;
 2. `python -m pytest -m cuda` on the test files holding CUDA tests (tests/test_cuda.py): mixed precision,
    channels_last, augmentation, device cache, pinned transfers, exact evaluation, resume and
    torch.compile on CUDA; with pytest-xdist, 8 at a time (`test_workers`). Any failure fails the
    command (after the measurements, which still run);
 3. data: 21,168 synthetic radiographs (the database holds 21,165; the generator draws the four classes
    equally), drawn at 128 px and packed at 128 px, 70/15/15, with every core;
 4. compute only (`benchmarks.step`): ResNet18 and the study's CNN, bf16 autocast and channels_last, the
    recipe's optimizer and loss, on one batch already on the device; the batch that gives the most
    images/s among `batch_sizes` is the one everything below uses (on a CPU fp32: bf16 convolutions
    there can be emulated, ten times slower);
 5. end to end: `python -m cxrdist.train` with that batch, precision and channels_last, from the device cache
    (data.cache=device) and streaming from the shards with one decoding worker per core
    (data.cache=none, data.num_workers=cores); images/s from metrics.jsonl, epochs 2..N (epoch 1 warms
    up: autotuning, first allocations), each as a share of compute only;
 6. the FLOP floor: FLOPs per image of forward + backward (torch's FLOP counter), achieved TFLOP/s and
    their share of the device's dense bf16 peak (`BF16_PEAK_TFLOPS`, "unknown" for other devices);
 7. the study's ResNet18 experiment: `resnet18_scratch` with the recipe's own settings, 10 epochs over the
    whole set: its first epoch, its steady epochs and the whole process's wall time (target <= 60 s);
 8. why, where a target is missed: a torch.profiler summary of ResNet18's step from the device cache
    (augmentation included; top operators by device time in profile-resnet18.txt, and how much of the
    step the GPU was busy), and the streaming loader alone (the most images/s decoding feeds).

Targets, printed PASS or MISS (a MISS is a finding, not a failure): end to end from the device cache at
least 90% of compute only, streaming at least 70%. Output: one JSON (--out, else $OUT/gpu-check.json when
$OUT is set, else a new file in the temp folder; rewritten after every stage, so a timeout keeps what was
measured) and beside it the markdown table (.md, also printed), the CUDA tests' log (cuda-tests.log) and
the profile (profile-resnet18.txt). Any error, CUDA's included, exits non-zero; a failed diagnosis (step
8) is recorded in the JSON instead.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    IMAGE_SIZE_PX,
    RECIPES,
    ROOT,
    BenchError,
    Dataset,
    child_env,
    default_device,
    describe_machine,
    machine_info,
    markdown_table,
    match_training_process,
    median,
    ratio,
    steady_images_per_s,
    sync,
    synthetic_dataset,
    train_run,
    write_json,
)
from benchmarks.step import StepCase, StepTiming, _Step, flops_per_image, time_training_step

MODELS = ("resnet18", "seed_cnn")  # keys of RECIPES
TARGETS = {"device cache": 0.90, "streaming": 0.70}  # end to end / compute only, at least
EXPERIMENT_RECIPE = "recipes/resnet18_scratch.toml"  # the study's ResNet18 experiment
EXPERIMENT_TARGET_S = 60.0  # its whole process on one H200, at most

# Dense (no sparsity) bf16 tensor-core peaks from the vendor's datasheets, TFLOP/s, matched in this
# order as substrings of torch.cuda.get_device_name(). On one H200 here an 8192^3 bf16 matrix product
# reached about 790 (device/KINDS.md): the peak is a ceiling, not a target.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


@dataclass(frozen=True)
class GpuPlan:
    per_class: int  # synthetic images per class (4 classes), drawn at 128 px
    batch_sizes: tuple[int, ...]  # compute-only candidates; the fastest is used end to end
    timing: StepTiming
    epochs: int  # per end-to-end run; epoch 1 is warm-up
    experiment_epochs: int  # the resnet18_scratch experiment with its own settings, end to end
    profile_steps: int  # training steps under torch.profiler
    tests_timeout_s: float
    run_timeout_s: float  # per `python -m cxrdist.train`


FULL = GpuPlan(
    per_class=5292,
    batch_sizes=(256, 512, 1024),
    timing=StepTiming(warmup=5, repeats=3, repeat_s=1.0),
    epochs=5,
    experiment_epochs=10,
    profile_steps=20,
    tests_timeout_s=180,
    run_timeout_s=240,
)
QUICK = GpuPlan(
    per_class=8,
    batch_sizes=(4, 8),
    timing=StepTiming(warmup=1, repeats=1, repeat_s=0.0),
    epochs=2,
    experiment_epochs=2,
    profile_steps=2,
    tests_timeout_s=120,
    run_timeout_s=180,
)


def bf16_peak_tflops(gpu_name: str | None) -> float | None:
    for key, tflops in BF16_PEAK_TFLOPS:
        if gpu_name and key in gpu_name:
            return tflops
    return None


# --------------------------------------------------------------------------------------------- tests


def cuda_test_files() -> list[Path]:
    """The test files that mark tests `cuda`: only they are imported, so a missing package that only
    other tests need cannot stop the check."""
    return sorted(p for p in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())


def test_workers() -> int:
    """pytest-xdist workers for the CUDA tests: on a GPU, one per two cores up to 8 when xdist is there
    (most tests are `python -m cxrdist.train` processes that leave the GPU idle while they start, so they
    share it well and the device minutes go to the measurements), else 0 (in this process)."""
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("xdist") is None:
        return 0
    return min(8, (os.cpu_count() or 1) // 2)


def run_cuda_tests(timeout_s: float, log: Path) -> dict[str, Any]:
    """`python -m pytest -m cuda` on `cuda_test_files()`; its counts, exit code and log. No test
    collected counts as a failure: the check would prove nothing."""
    files = cuda_test_files()
    workers = test_workers()
    parallel = ["-n", str(workers)] if workers > 1 else []
    pytest = ["-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *parallel]
    cmd = [sys.executable, *pytest, *map(str, files)]
    start = time.perf_counter()
    # A session of its own, so that a timeout also ends the training processes the tests started.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0] + f"\ntimed out after {timeout_s:.0f} s"
        code = -1
    seconds = time.perf_counter() - start
    log.write_text(output)
    counts = {
        word: int(m.group(1)) if (m := re.search(rf"(\d+) {word}", output)) else 0
        for word in ("passed", "failed", "skipped", "error")
    }
    summary = next((line for line in reversed(output.splitlines()) if line.strip()), "")
    return {
        "command": " ".join(["python", *pytest, *(str(f.relative_to(ROOT)) for f in files)]),
        "exit_code": code,
        "ok": code == 0,
        **counts,
        "summary": summary,
        "seconds": seconds,
        "log": str(log),
    }


# ------------------------------------------------------------------------------------------ measures


@dataclass(frozen=True)
class Setup:
    """Everything the measurements share."""

    plan: GpuPlan
    device: torch.device
    precision: str  # autocast for every case: "bf16" on CUDA; "no" on a CPU, where bf16 can be emulated
    workers: int  # streaming loader workers: one per core
    data: Dataset
    work: Path


def compute_only(model: str, setup: Setup) -> dict[str, Any]:
    """Every candidate batch (one that does not fit the device is recorded as such) and the fastest."""
    rows = []
    for batch in setup.plan.batch_sizes:
        case = StepCase(model, batch, setup.precision, channels_last=True, compile=False)
        try:
            rows.append(time_training_step(case, setup.plan.timing, setup.device))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({**asdict(case), "images_per_s": None, "error": "out of device memory"})
    fitting = [r for r in rows if r["images_per_s"]]
    if not fitting:
        raise BenchError(f"{model}: no batch of {setup.plan.batch_sizes} fits the device")
    return {"rows": rows, "best": max(fitting, key=lambda r: r["images_per_s"])}


def end_to_end(model: str, batch: int, cache: str, setup: Setup) -> dict[str, Any]:
    """`python -m cxrdist.train` on the model's recipe with the compute-only settings and `data.cache`."""
    sets = [
        f"train.epochs={setup.plan.epochs}",
        f"train.per_device_batch_size={batch}",
        f"train.mixed_precision={setup.precision}",
        "train.channels_last=true",
        "train.compile=false",
        f"data.cache={cache}",
        f"data.num_workers={setup.workers}",
        # The end-of-run extras take wall time, not training images/s: off, so the check stays short.
        "eval.bootstrap_resamples=0",
        "eval.gradcam_per_class=0",
    ]
    run_dir = setup.work / "runs" / f"{model}-{cache}"
    run = train_run(RECIPES[model], run_dir, setup.data.shards, sets, setup.plan.run_timeout_s)
    steady = steady_images_per_s(run["rows"])
    return {
        "input": "device cache" if cache == "device" else "streaming",
        "num_workers": setup.workers,
        "overrides": sets,
        "epoch_images_per_s": [r["images_per_s"] for r in run["rows"]],
        "epoch_seconds": [r["epoch_seconds"] for r in run["rows"]],
        "images_per_s": median(steady),
        "wall_s": run["wall_s"],
    }


def experiment(setup: Setup) -> dict[str, Any]:
    """The study's ResNet18 experiment (`EXPERIMENT_RECIPE`, its own settings, `experiment_epochs`
    epochs) over the whole set: its first epoch (what a user's first epoch costs: autotuning included),
    its steady epochs and the whole process's wall time (start, cache fill, validation, test, plots)."""
    from cxrdist.config import load_config

    cfg = load_config(ROOT / EXPERIMENT_RECIPE)
    epochs = setup.plan.experiment_epochs
    sets = [f"train.epochs={epochs}"]
    batch = min(cfg.train.per_device_batch_size, setup.data.counts["train"])
    if batch < cfg.train.per_device_batch_size:  # --quick's toy split is smaller than one batch
        sets.append(f"train.per_device_batch_size={batch}")
    run_dir = setup.work / "runs" / "experiment"
    run = train_run(EXPERIMENT_RECIPE, run_dir, setup.data.shards, sets, setup.plan.run_timeout_s)
    seconds = [r["epoch_seconds"] for r in run["rows"]]
    return {
        "recipe": EXPERIMENT_RECIPE,
        "epochs": epochs,
        "batch_size": batch,
        "overrides": sets,
        "data_cache": cfg.data.cache,
        "num_workers": cfg.data.num_workers,
        "train_images": setup.data.counts["train"],
        "epoch_seconds": seconds,
        "first_epoch_s": seconds[0],
        "first_epoch_images_per_s": run["rows"][0]["images_per_s"],
        "steady_images_per_s": median(steady_images_per_s(run["rows"])),
        "training_s": sum(seconds),
        "wall_s": run["wall_s"],
        "target_s": EXPERIMENT_TARGET_S,
        "result": "PASS" if run["wall_s"] <= EXPERIMENT_TARGET_S else "MISS",
        "test_accuracy": run["test_accuracy"],
    }


def profile_device_cache_step(model: str, batch: int, setup: Setup, out: Path) -> dict[str, Any]:
    """What the GPU does in an end-to-end step from the device cache: `profile_steps` steps of batches
    from `DeviceCache`, `train_transform` (augmentation on the device) and the compute-only step, under
    torch.profiler. Writes the top operators by device time to `out`; returns the step's wall time, the
    device's busy time in it (kernels and copies) and their ratio (below 1: the GPU waits on the host)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from cxrdist.augment import train_transform
    from cxrdist.config import load_config
    from cxrdist.data import DeviceCache, read_manifest
    from cxrdist.models import input_channels

    cfg = load_config(ROOT / RECIPES[model])
    step = _Step(StepCase(model, batch, setup.precision, channels_last=True, compile=False), setup.device)
    cache = DeviceCache.load(
        read_manifest(str(setup.data.shards)), "train", setup.device, 1 << 40, num_workers=setup.workers
    )
    generator = torch.Generator(device=setup.device).manual_seed(0)
    in_chans = input_channels(cfg.model)
    n = setup.plan.profile_steps

    def steps(epoch: int) -> None:
        position = {"batch_size": batch, "steps": n, "epoch": epoch, "seed": 0, "rank": 0, "world_size": 1}
        for images, labels in cache.train_batches(**position):
            step.x = train_transform(images, cfg.augment, generator, in_chans, channels_last=True)
            step.y = labels
            step()

    steps(0)  # warm-up: autotuning, allocations
    sync(setup.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        steps(1)
        sync(setup.device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    sort = "self_cuda_time_total" if setup.device.type == "cuda" else "self_cpu_time_total"
    out.write_text(
        f"{model}, batch {batch}, {setup.precision}, channels_last, {n} steps from the device cache with "
        f"augmentation on the device: {wall / n * 1e3:.2f} ms a step\n\n"
        + events.table(sort_by=sort, row_limit=30)
    )
    device_us = sum(
        getattr(e, "self_device_time_total", 0) for e in events if e.device_type == DeviceType.CUDA
    )
    return {
        "model": model,
        "batch_size": batch,
        "steps": n,
        "step_ms": wall / n * 1e3,
        "device_busy_ms": device_us / 1e3 / n,
        "device_busy_share": device_us / 1e6 / wall if setup.device.type == "cuda" else None,
        "table": str(out),
    }


def loader_only(batch: int, setup: Setup) -> dict[str, Any]:
    """The streaming loader alone (`data.cache=none`, one decoding worker per core, pinned batches), two
    epochs, each timed from its start (worker start-up included, as in training): the most images/s
    streaming can feed a GPU on this machine. Beside it, the same loader in this process (no worker) over
    two batches: one core's decoding rate, which tells worker start-up from decoding in an epoch."""
    from cxrdist.config import DataConfig
    from cxrdist.data import read_manifest, steps_per_epoch, train_batches

    manifest = read_manifest(str(setup.data.shards))

    def images_per_s(epoch: int, steps: int, workers: int) -> float:
        start = time.perf_counter()
        for images, _ in train_batches(
            manifest, batch_size=batch, steps=steps, epoch=epoch, seed=0, rank=0, world_size=1,
            num_workers=workers, shuffle_buffer=DataConfig().shuffle_buffer,
        ):  # fmt: skip
            images.to(setup.device, non_blocking=True)
        sync(setup.device)
        return steps * batch / (time.perf_counter() - start)

    n = steps_per_epoch(manifest.count("train"), batch)
    return {
        "batch_size": batch,
        "num_workers": setup.workers,
        "epoch_images_per_s": [images_per_s(epoch, n, setup.workers) for epoch in (1, 2)],
        "one_core_images_per_s": images_per_s(3, min(n, 2), 0),
    }


def measure(setup: Setup, peak: float | None) -> list[dict[str, Any]]:
    """Compute only, the FLOP floor and both end-to-end inputs, per model."""
    rows = []
    for model in MODELS:
        compute = compute_only(model, setup)
        best = compute["best"]
        flops = flops_per_image(model, setup.device)
        tflops = best["images_per_s"] * flops / 1e12
        row: dict[str, Any] = {
            "model": model,
            "batch_size": best["batch_size"],
            "precision": setup.precision,
            "channels_last": True,
            "compute_images_per_s": best["images_per_s"],
            "batch_search": [
                {"batch_size": r["batch_size"], "images_per_s": r["images_per_s"]} for r in compute["rows"]
            ],
            "gflop_per_image": flops / 1e9,
            "tflops": tflops,
            "share_of_bf16_peak": ratio(tflops, peak),
        }
        for cache in ("device", "none"):
            e2e = end_to_end(model, best["batch_size"], cache, setup)
            row[e2e["input"]] = {**e2e, "share_of_compute": ratio(e2e["images_per_s"], best["images_per_s"])}
        rows.append(row)
        cache, stream = row["device cache"], row["streaming"]
        print(
            f"{model}: batch {row['batch_size']}, compute only {row['compute_images_per_s']:,.1f} images/s "
            f"({tflops:.2f} TFLOP/s); device cache {cache['images_per_s']:,.1f} "
            f"({_pct(cache['share_of_compute'])}); streaming {stream['images_per_s']:,.1f} "
            f"({_pct(stream['share_of_compute'])})",
            flush=True,
        )
    return rows


def verdicts(rows: list[dict]) -> list[dict[str, Any]]:
    return [
        {
            "model": r["model"],
            "input": name,
            "share_of_compute": r[name]["share_of_compute"],
            "target": target,
            "result": "PASS" if (r[name]["share_of_compute"] or 0) >= target else "MISS",
        }
        for r in rows
        for name, target in TARGETS.items()
    ]


# ---------------------------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def markdown(results: dict[str, Any]) -> str:
    """The section for BENCHMARKS.md."""
    m, data, tests, exp = results["machine"], results["data"], results["tests"], results["experiment"]
    device = m["gpu"] or f"CPU ({m['cpu']})"
    lines = [
        f"### GPU check: {device}, {m['cpu_cores']} CPU cores",
        "",
        f"`python -m benchmarks --gpu{' --quick' if results['quick'] else ''}`, {m['date_utc']}: torch "
        f"{m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, Python {m['python']}; "
        f"commit {m['git_commit']}.",
        "",
        f"Data: {data['images']:,} synthetic radiographs drawn at {IMAGE_SIZE_PX} px ("
        + " / ".join(f"{split} {data['splits'].get(split, 0):,}" for split in ("train", "val", "test"))
        + f"), drawn in {data['generate_s']:.1f} s and packed in {data['pack_s']:.1f} s "
        f"with {data['workers']} workers.",
        f"CUDA tests (`{tests['command']}`): {tests['summary']}.",
        "",
    ]
    header = [
        "model",
        "batch",
        "compute only, img/s",
        "TFLOP/s (share of bf16 peak)",
        "device cache e2e, img/s",
        "share",
        f"streaming e2e ({results['rows'][0]['streaming']['num_workers']} workers), img/s",
        "share",
    ]
    table = []
    for r in results["rows"]:
        cache, stream = r["device cache"], r["streaming"]
        table.append(
            [
                r["model"],
                r["batch_size"],
                r["compute_images_per_s"],
                f"{r['tflops']:.1f} ({_pct(r['share_of_bf16_peak'])})",
                cache["images_per_s"],
                f"{_pct(cache['share_of_compute'])}",
                stream["images_per_s"],
                f"{_pct(stream['share_of_compute'])}",
            ]
        )
    lines.append(markdown_table(header, table))
    for v in results["verdicts"]:
        lines.append(
            f"- {v['model']}, {v['input']}: {_pct(v['share_of_compute'])} of compute only "
            f"(target >= {v['target']:.0%}): **{v['result']}**"
        )
    search = "; ".join(
        f"{r['model']} "
        + ", ".join(f"b{s['batch_size']} {s['images_per_s'] or 0:,.0f}" for s in r["batch_search"])
        for r in results["rows"]
    )
    lines += [
        "",
        f"Compute only is forward + backward + optimizer step (the recipe's loss and optimizer) on one batch "
        f"already on the device, {'bf16 autocast' if results['precision'] == 'bf16' else 'fp32'}, "
        f"channels_last; batch search (img/s): {search}. End to end is "
        f"`python -m cxrdist.train` with the same settings, median images/s of epochs "
        f"2-{results['plan']['epochs']} "
        f"from metrics.jsonl (training steps only). FLOPs per image (forward + backward, torch's counter): "
        + ", ".join(f"{r['model']} {r['gflop_per_image']:.2f} GFLOP" for r in results["rows"])
        + f"; bf16 peak used: {results['bf16_peak_tflops'] or 'unknown'} TFLOP/s.",
        "",
        f"The study's ResNet18 experiment, `{exp['recipe']}` with its own settings (batch "
        f"{exp['batch_size']}, data.cache = {exp['data_cache']}, {exp['num_workers']} workers), "
        f"{exp['epochs']} epochs over {exp['train_images']:,} train images: first epoch "
        f"{exp['first_epoch_s']:.1f} s ({exp['first_epoch_images_per_s']:,.0f} img/s, autotuning "
        f"included), then {exp['steady_images_per_s']:,.0f} img/s; training {exp['training_s']:.1f} s, "
        f"the whole process (start, cache fill, validation, test, plots, report) {exp['wall_s']:.1f} s "
        f"(target <= {exp['target_s']:.0f} s: **{exp['result']}**).",
        "",
    ]
    if prof := results.get("profile"):
        lines += [
            f"Profile (torch.profiler, {prof['model']} batch {prof['batch_size']}, {prof['steps']} steps "
            f"from the device cache with augmentation on the device): {prof['step_ms']:.2f} ms a step, of "
            f"which the device was busy {prof['device_busy_ms']:.2f} ms ({_pct(prof['device_busy_share'])}); "
            f"top operators in `{Path(prof['table']).name}`.",
            "",
        ]
    if loader := results.get("loader"):
        lines += [
            f"Streaming loader alone ({loader['num_workers']} workers, batch {loader['batch_size']}, epochs "
            f"timed from their start): "
            + ", ".join(f"{r:,.0f}" for r in loader["epoch_images_per_s"])
            + f" img/s; in this process (one core, no worker): {loader['one_core_images_per_s']:,.0f} img/s.",
            "",
        ]
    lines += [
        f"The whole check: {results['seconds']:.0f} s ("
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in results["stage_s"].items())
        + ").",
    ]
    return "\n".join(lines) + "\n"


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu-check.json"
    return Path(tempfile.gettempdir()) / f"cxrdist-gpu-check-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"


def run_gpu_check(quick: bool, out: Path | None, work: Path | None) -> int:
    """The whole check (module docstring); 0 when every CUDA test passed and everything ran."""
    plan = QUICK if quick else FULL
    device = default_device()
    match_training_process(device)
    out = out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = machine_info(device)
    print(describe_machine(machine), flush=True)
    peak = bf16_peak_tflops(machine["gpu"])
    precision = "bf16" if device.type == "cuda" else "no"
    results: dict[str, Any] = {
        "command": "python -m benchmarks --gpu" + (" --quick" if quick else ""),
        "quick": quick,
        "plan": asdict(plan),
        "machine": machine,
        "bf16_peak_tflops": peak,
        "precision": precision,
    }
    started = time.perf_counter()
    stage_s: dict[str, float] = results.setdefault("stage_s", {})  # where the minutes go

    def stage(
        name: str, fn: Callable[[], Any], key: str | None = None, record: Callable = lambda v: v
    ) -> Any:
        """Run one stage, keep `record(its value)` as results[key or name] and save the JSON so far."""
        start = time.perf_counter()
        value = fn()
        results[key or name] = record(value)
        stage_s[name] = time.perf_counter() - start
        results["seconds"] = time.perf_counter() - started
        write_json(out, results)  # what was measured so far survives a timeout that kills this process
        return value

    def diagnosis(name: str, fn: Callable[[], Any]) -> None:
        """A stage that explains the figures rather than being one: its failure is recorded, not fatal."""
        try:
            stage(name, fn)
        except Exception as e:  # noqa: BLE001 - recorded in the JSON and printed, not hidden
            results[name] = None
            results[f"{name}_error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
            print(f"{name}: failed: {results[f'{name}_error']}", flush=True)

    try:
        print(f"CUDA tests: {' '.join(p.name for p in cuda_test_files())} ...", flush=True)
        tests = stage("tests", lambda: run_cuda_tests(plan.tests_timeout_s, out.with_name("cuda-tests.log")))
        print(f"CUDA tests: {tests['summary']} ({tests['seconds']:.0f} s)", flush=True)
        with tempfile.TemporaryDirectory(prefix="cxrdist-gpu-check-") as tmp:
            work = work or Path(tmp)
            workers = os.cpu_count() or 1
            data = stage(
                "data",
                lambda: synthetic_dataset(work, plan.per_class, IMAGE_SIZE_PX, workers=workers),
                record=lambda d: {
                    "images": sum(d.counts.values()),
                    "splits": d.counts,
                    "image_size_px": IMAGE_SIZE_PX,
                    "generate_s": d.generate_s,
                    "pack_s": d.pack_s,
                    "workers": workers,
                },
            )
            print(
                f"data: {results['data']['images']:,} images, split {data.counts}; drawn in "
                f"{data.generate_s:.1f} s, packed in {data.pack_s:.1f} s ({workers} workers)",
                flush=True,
            )
            setup = Setup(plan, device, precision, workers, data, work)
            rows = stage("measure", lambda: measure(setup, peak), key="rows")
            exp = stage("experiment", lambda: experiment(setup))
            print(
                f"experiment: {exp['epochs']} epochs, first {exp['first_epoch_s']:.1f} s, training "
                f"{exp['training_s']:.1f} s, whole process {exp['wall_s']:.1f} s: {exp['result']}",
                flush=True,
            )
            resnet = next(r for r in rows if r["model"] == "resnet18")
            diagnosis(
                "profile",
                lambda: profile_device_cache_step(
                    "resnet18", resnet["batch_size"], setup, out.with_name("profile-resnet18.txt")
                ),
            )
            diagnosis("loader", lambda: loader_only(resnet["batch_size"], setup))
        results["verdicts"] = verdicts(results["rows"])
    finally:
        results["seconds"] = time.perf_counter() - started
        write_json(out, results)  # what was measured survives a failure
    text = markdown(results)
    out.with_suffix(".md").write_text(text)
    print("\n" + text)
    for v in results["verdicts"]:
        print(
            f"{v['result']}  {v['model']} {v['input']}: {_pct(v['share_of_compute'])} of compute only "
            f"(target {v['target']:.0%})"
        )
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stage_s.items())
    print(f"\nGPU check: {results['seconds']:.0f} s ({stages}); results: {out} and {out.with_suffix('.md')}")
    if not results["tests"]["ok"]:
        raise BenchError(
            f"CUDA tests failed ({results['tests']['summary']}); their output: {results['tests']['log']}"
        )
    return 0
