"""The run directory: what a run writes into `run.dir`, and the rules that keep one run's results whole.

    run.dir/
      config.toml          resolved recipe, with cxrdist version and git commit (`write_run_header`)
      manifest.json        the shards' manifest it trained on
      metrics.jsonl        one line per epoch
      checkpoints/         `cxrdist.checkpoint`
      best/                model.safetensors + meta.json
      test_metrics.json    plots (*.png), report.html
      audit.json           the shortcut audit (`cxrdist.audit`), audit_examples.png, audit_visible.png

Rules:
- A run directory belongs to one run. A new run refuses a folder holding an earlier run's results or
  checkpoints unless the user passes `--overwrite`, which removes exactly the files listed in `RUN_OUTPUTS`
  (a file the user put there is never touched) and starts clean.
- `--resume` continues only on the same data: the manifest it is given must list the same classes in the
  same order, the same image size and the same shards (names, counts, checksums) as `manifest.json`.
  Where the shards live may change (another disk, a bucket).
- A run that fails before it has written any result leaves no trace: the folder it created is removed.
"""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrdist.checkpoint import CHECKPOINTS, latest_checkpoint
from cxrdist.distributed import all_ranks_ok
from shard_tools.errors import CxrdistError, InputError
from shard_tools.files import atomic_write_json, atomic_write_text
from shard_tools.schema import SPLITS

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.toml"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
TEST_METRICS_FILE = "test_metrics.json"
BEST_DIR = "best"
REPORT_FILE = "report.html"
BEST_META = f"{BEST_DIR}/meta.json"
CONFUSION_PNG = "confusion_test.png"
CURVES_PNG = "curves.png"
ROC_PNG = "roc_test.png"
RELIABILITY_PNG = "reliability_test.png"
GRADCAM_DIR = "gradcam"
EXPLAIN_SUMMARY = "explain_summary.json"  # in GRADCAM_DIR
AUDIT_FILE = "audit.json"  # the shortcut audit (cxrdist.audit), and its pictures beside it:
AUDIT_EXAMPLES_PNG = "audit_examples.png"  # one test image under each occlusion
AUDIT_VISIBLE_PNG = "audit_visible.png"  # the part of the image the model can see at all
# Results of a finished or running run: their presence means the folder is taken.
RESULTS = (BEST_DIR, METRICS_FILE, TEST_METRICS_FILE, CHECKPOINTS)
# Everything cxrdist.train writes into run.dir; `--overwrite` removes these and nothing else.
RUN_OUTPUTS = (
    CONFIG_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    TEST_METRICS_FILE,
    BEST_DIR,
    CHECKPOINTS,
    REPORT_FILE,
    CONFUSION_PNG,
    CURVES_PNG,
    ROC_PNG,
    RELIABILITY_PNG,
    GRADCAM_DIR,
    AUDIT_FILE,
    AUDIT_EXAMPLES_PNG,
    AUDIT_VISIBLE_PNG,
    "cxrdist",  # Accelerate's tracker logs (run.log_with), named after the project
)


class RunDirError(InputError):
    """run.dir cannot be used for this start; the message says why and what to do. Exit 2."""


class RunDirFailed(CxrdistError):
    """run.dir cannot be written (permissions, space). Exit 1."""


def earlier_results(run_dir: Path) -> list[str]:
    """Names of an earlier run's results in `run_dir` (see `RESULTS`)."""
    return [name for name in RESULTS if (Path(run_dir) / name).exists()]


def remove_run_outputs(run_dir: Path) -> list[str]:
    """Remove what an earlier run wrote (`RUN_OUTPUTS`), nothing else; return the names removed."""
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def prepare_run_dir(accelerator: Any, run_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """Check, on every rank together, that this start may use `run_dir`; create it. Returns whether it
    existed before (so that a failed start can remove a folder it created: `discard_unused`).

    Raises `RunDirError` (taken, no checkpoint to resume, both flags) or `RunDirFailed` (not writable).
    """
    run_dir = Path(run_dir)
    existed = run_dir.exists()
    problem, failed = "", False
    if resume and overwrite:
        problem = "--resume and --overwrite contradict each other: continue the run, or start it afresh"
    elif resume and latest_checkpoint(run_dir) is None:
        problem = f"--resume: no checkpoint under {run_dir / CHECKPOINTS}. Start without --resume."
    elif not resume and (taken := earlier_results(run_dir)) and not overwrite:
        problem = (
            f"run.dir {run_dir} already holds an earlier run ({', '.join(taken)}). Pass --resume to continue "
            "it, --overwrite to replace it (its results are deleted), or set another run.dir "
            "(--set run.dir=...)."
        )
    if not problem:
        try:
            if overwrite and accelerator.is_main_process:
                remove_run_outputs(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-probe-{accelerator.process_index}"
            probe.write_bytes(b"x" * 1024)
            probe.unlink()
        except OSError as e:
            failed = True
            problem = (
                f"run.dir {run_dir} is not writable ({e.strerror}). Choose another run.dir or free space."
            )
    if not all_ranks_ok(accelerator, not problem):
        message = problem or f"another rank could not use run.dir {run_dir}; see its message"
        raise RunDirFailed(message) if failed or not problem else RunDirError(message)
    # A rank that saw no folder saw it before any rank made it: then this start created it.
    return all_ranks_ok(accelerator, existed)


def discard_unused(run_dir: Path, existed: bool) -> None:
    """After a start that failed before writing any result: remove the run header and, if this start
    created the folder and nothing else is in it, the folder. Main process only."""
    run_dir = Path(run_dir)
    if earlier_results(run_dir):
        return
    for name in (CONFIG_FILE, MANIFEST_FILE):
        (run_dir / name).unlink(missing_ok=True)
    if not existed and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def check_space(accelerator: Any, run_dir: Path, model: torch.nn.Module, keep_checkpoints: int) -> None:
    """Fail before the first step, on every rank together, when run.dir cannot take this run's files.

    A checkpoint holds the weights and the optimizer state (up to twice the weights, for Adam); the run
    keeps `keep_checkpoints` of them, writes one more before deleting the oldest, and exports best/. The
    largest single file is the optimizer state, which a per-file limit (`ulimit -f`) must also allow.
    """
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    largest_file = 2 * weights + (64 << 10)  # optimizer.bin, plus its pickle framing
    needed = (keep_checkpoints + 1) * 3 * weights + weights + (16 << 20)  # + logs, plots, RNG states
    problem = ""
    free = shutil.disk_usage(run_dir).free
    file_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if free < needed:
        problem = (
            f"run.dir {run_dir} has {free / 2**20:.1f} MiB free; this run's checkpoints need about "
            f"{needed / 2**20:.1f} MiB. Free space, lower run.keep_checkpoints or choose another run.dir."
        )
    elif file_limit != resource.RLIM_INFINITY and file_limit < largest_file:
        problem = (
            f"run.dir {run_dir}: files are limited to {file_limit} bytes (ulimit -f) but a checkpoint "
            f"file of this model needs about {largest_file} bytes. Raise the limit."
        )
    if not all_ranks_ok(accelerator, not problem):
        raise RunDirFailed(problem or f"another rank has no room in run.dir {run_dir}; see its message")


def _shard_list(manifest: dict[str, Any], split: str) -> list[tuple[str, int, str]]:
    return [(s["file"], s["count"], s["sha256"]) for s in manifest["splits"][split]["shards"]]


def manifest_differences(trained: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """How the data a run trained on (`trained`) differs from `given`, as short phrases; [] if it is the
    same dataset. Only content counts (classes, order, size, shards), not where the shards live."""
    found = []
    if list(trained["classes"]) != list(given["classes"]):
        found.append(
            f"classes {list(trained['classes'])} vs {list(given['classes'])} (label ids would change)"
        )
    if trained["image_size"] != given["image_size"]:
        found.append(f"image_size {trained['image_size']} vs {given['image_size']}")
    for split in SPLITS:
        a, b = _shard_list(trained, split), _shard_list(given, split)
        if a == b:
            continue
        count_a, count_b = sum(n for _, n, _ in a), sum(n for _, n, _ in b)
        if (len(a), count_a) != (len(b), count_b):
            found.append(f"{split}: {len(a)} shards of {count_a} images vs {len(b)} shards of {count_b}")
        else:
            changed = [fa for (fa, _, sa), (fb, _, sb) in zip(a, b) if (fa, sa) != (fb, sb)]
            found.append(f"{split}: other shard checksums ({', '.join(changed[:3])})")
    return found


def check_same_data(run_dir: Path, given: dict[str, Any], source: str) -> None:
    """Refuse to resume on data other than what `run_dir` trained on (see the module docstring)."""
    path = Path(run_dir) / MANIFEST_FILE
    try:
        trained = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(
            f"--resume: cannot read {path} ({e}); it records the data this run trained on"
        ) from None
    differences = manifest_differences(trained, given)
    if differences:
        raise RunDirError(
            f"--resume: the shards at {source} are not the data this run trained on ({path}): "
            f"{'; '.join(differences)}. Resume with the original shards (copies elsewhere are fine), or "
            "start a new run."
        )


def write_run_header(run_dir: Path, config_toml: str, manifest: dict[str, Any]) -> None:
    """config.toml and the manifest the run trains on. Main process only."""
    atomic_write_text(Path(run_dir) / CONFIG_FILE, config_toml)
    atomic_write_json(Path(run_dir) / MANIFEST_FILE, manifest)


def read_metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl as a list of per-epoch rows ([] before the first epoch)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
