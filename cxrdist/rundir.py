"""The run directory: what a run writes into `run.dir`, and the rules that keep one run's results whole.

    run.dir/
      config.toml          resolved recipe, with cxrdist version and git commit (`write_run_header`)
      manifest.json        the shards' manifest it trained on
      metrics.jsonl        one line per epoch
      checkpoints/         `cxrdist.checkpoint`
      best/                model.safetensors + meta.json
      test_metrics.json    plots (*.png), report.html
      audit.json           the shortcut audit (`cxrdist.audit`), audit_examples.png, audit_visible.png
      .cxrdist.lock        the lock of its one writer (`shard_tools.locks`); it also marks a cxrdist run dir

Rules:
- A run directory has one writer for its whole life: the main process holds `.cxrdist.lock` (flock,
  released by the OS when the process dies) from before it looks at the folder until the run ends; a
  second start is refused naming the holder, on every rank.
- A run directory belongs to one run. A new run refuses a folder holding an earlier run's results or
  checkpoints unless the user passes `--overwrite`, which removes exactly the files listed in `RUN_OUTPUTS`
  (a file the user put there is never touched; in gradcam/, only `GRADCAM_OUTPUTS`) and starts clean.
- cxrdist never writes over, or deletes, a file it did not write: a folder that is not a run directory
  (`is_run_dir`) and holds anything is refused (with `--overwrite`, only if none of its names is one a run
  writes), and so is a run directory holding files of the user's, unless `--overwrite`.
- `--resume` continues only on the same data: the manifest it is given must list the same classes in the
  same order, the same image size and the same shards (names, counts, checksums) as `manifest.json`.
  Where the shards live may change (another disk, a bucket).
- A run that fails before it has written any result, or is stopped (SIGTERM, Ctrl-C), leaves no trace: the
  files it wrote, its lock file and the folders it created are removed (`RunDirClaim`), nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrdist.checkpoint import CHECKPOINTS, latest_checkpoint
from cxrdist.distributed import all_ranks_ok
from shard_tools.errors import CxrdistError, InputError
from shard_tools.files import atomic_write_json, atomic_write_text
from shard_tools.locks import Busy, Lock, LockFailed, acquire
from shard_tools.schema import SPLITS, ManifestError, parse_manifest

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
GRADCAM_GRID = "gradcam_grid_test.png"  # in GRADCAM_DIR (`cxrdist.explain.explain_shards`)
GRADCAM_OUTPUTS = (GRADCAM_GRID, EXPLAIN_SUMMARY)  # a run's files in GRADCAM_DIR; the rest is the user's
LOCK_FILE = ".cxrdist.lock"  # one writer per run.dir (`shard_tools.locks`); also marks a cxrdist run dir
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


@dataclass
class RunDirClaim:
    """What this start holds and made in run.dir, so that a start that fails removes exactly that."""

    run_dir: Path
    created: Path | None  # the top-most folder this start created (run.dir or an ancestor), else None
    lock: Lock | None  # run.dir's lock (main process only; released by the OS if the process dies)
    written: list[str] = field(default_factory=list)  # files this start wrote (`write_run_header`)


def earlier_results(run_dir: Path) -> list[str]:
    """Names of an earlier run's results in `run_dir` (see `RESULTS`)."""
    return [name for name in RESULTS if (Path(run_dir) / name).exists()]


def is_run_dir(run_dir: Path) -> bool:
    """Whether cxrdist made this folder a run directory: its lock file, or (runs older than the lock) a
    config.toml that starts with cxrdist's provenance header (`cxrdist.train.config_toml`)."""
    run_dir = Path(run_dir)
    if (run_dir / LOCK_FILE).is_file():
        return True
    try:
        with open(run_dir / CONFIG_FILE, "rb") as f:
            return f.read(64).startswith(b"# cxrdist_version:")
    except OSError:
        return False


def _own_temporary(name: str) -> bool:
    """A hidden temporary of a cxrdist write (`shard_tools.files`), a probe, or a moved-aside folder."""
    if not name.startswith("."):
        return False
    own = name[1:].startswith(tuple(f"{n}." for n in RUN_OUTPUTS))
    return (own and (name.endswith((".tmp", ".old")) or ".tmp-" in name)) or name.startswith(".write-probe-")


def foreign_entries(run_dir: Path) -> list[str]:
    """Names in `run_dir` that cxrdist did not write: everything, in a folder that is not a run directory;
    else what is neither a run output (`RUN_OUTPUTS`), the lock, nor one of their temporaries."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    names = sorted(p.name for p in run_dir.iterdir())
    if not is_run_dir(run_dir):
        return names
    own = set(RUN_OUTPUTS) | {LOCK_FILE}
    return [n for n in names if n not in own and not _own_temporary(n)]


def remove_run_outputs(run_dir: Path) -> list[str]:
    """Remove what an earlier run wrote (`RUN_OUTPUTS`), nothing else; return the names removed. In
    gradcam/, only the files cxrdist writes there go (the folder too, once empty)."""
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if name == GRADCAM_DIR and path.is_dir() and not path.is_symlink():
            for inner in GRADCAM_OUTPUTS:
                (path / inner).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty: a user's own files there stay
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _first_missing(path: Path) -> Path | None:
    """The top-most folder of `path` that does not exist yet (what `mkdir(parents=True)` would create)."""
    path = Path(os.path.abspath(path))
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _claim_problem(run_dir: Path, resume: bool, overwrite: bool, marked: bool) -> str:
    """Why this start may not use `run_dir` (checked while holding its lock), or "". `marked`: it was a
    run directory (`is_run_dir`) before this start created a lock file in it."""
    if resume:
        if latest_checkpoint(run_dir) is None:
            return f"--resume: no checkpoint under {run_dir / CHECKPOINTS}. Start without --resume."
        return ""
    if not marked:
        if not overwrite:
            foreign = [p.name for p in sorted(run_dir.iterdir()) if p.name != LOCK_FILE]
            if foreign:
                return (
                    f"run.dir {run_dir} holds files cxrdist did not write ({', '.join(foreign[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''}). Choose a new or empty run.dir (--set "
                    "run.dir=...), or pass --overwrite to write the run beside them."
                )
        clash = [n for n in RUN_OUTPUTS if (run_dir / n).exists() or (run_dir / n).is_symlink()]
        if clash:  # never overwrite a file cxrdist did not write, even when asked to
            return (
                f"run.dir {run_dir} was not made by cxrdist but holds {', '.join(clash)}, which a run "
                "writes: move it away or choose another run.dir (--set run.dir=...)."
            )
        return ""
    if (taken := earlier_results(run_dir)) and not overwrite:
        return (
            f"run.dir {run_dir} already holds an earlier run ({', '.join(taken)}). Pass --resume to continue "
            "it, --overwrite to replace it (its results are deleted), or set another run.dir "
            "(--set run.dir=...)."
        )
    if not overwrite and (foreign := foreign_entries(run_dir)):
        return (
            f"run.dir {run_dir} holds files cxrdist did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}). Move them away, or pass --overwrite to keep them "
            "beside a new run (it replaces only cxrdist's own files)."
        )
    return ""


def prepare_run_dir(accelerator: Any, run_dir: Path, *, resume: bool, overwrite: bool) -> RunDirClaim:
    """Claim `run_dir` for this start, on every rank together: the main process takes its lock (one
    writer for the run's whole life, see `shard_tools.locks`) and, holding it, checks that this start may
    use the folder; then every rank checks it can write there. On failure, what this start made is gone.

    Raises `RunDirError` (taken, locked by another run, files of the user's, no checkpoint to resume, both
    flags; exit 2) or `RunDirFailed` (not writable; exit 1).
    """
    claim = RunDirClaim(Path(run_dir), None, None)
    try:
        return _claim_run_dir(accelerator, claim, resume, overwrite)
    except BaseException:  # refused, SIGTERM, Ctrl-C: nothing this start made stays behind
        if accelerator.is_main_process:
            release_run_dir(claim, failed=True)
        raise


def _claim_run_dir(accelerator: Any, claim: RunDirClaim, resume: bool, overwrite: bool) -> RunDirClaim:
    run_dir = claim.run_dir
    problem, failed = "", False
    if resume and overwrite:
        problem = "--resume and --overwrite contradict each other: continue the run, or start it afresh"
    elif accelerator.is_main_process:
        try:
            claim.created = _first_missing(run_dir)
            marked = is_run_dir(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            claim.lock = acquire(run_dir / LOCK_FILE, f"run.dir {run_dir}")
            problem = _claim_problem(run_dir, resume, overwrite, marked or not claim.lock.created)
            if not problem and overwrite:
                remove_run_outputs(run_dir)
        except Busy as e:
            problem = str(e)
        except (OSError, LockFailed) as e:
            failed = True
            reason = e.strerror if isinstance(e, OSError) else str(e)
            problem = f"run.dir {run_dir} is not writable ({reason}). Choose another run.dir or free space."
    if not all_ranks_ok(accelerator, not problem):
        message = problem or f"the main process could not use run.dir {run_dir}; see its message"
        raise RunDirFailed(message) if failed else RunDirError(message)
    try:  # every rank: the folder is there (a shared file system) and takes files
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{accelerator.process_index}"
        try:
            probe.write_bytes(b"x" * 1024)
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        problem = f"run.dir {run_dir} is not writable ({e.strerror}). Choose another run.dir or free space."
    if not all_ranks_ok(accelerator, not problem):
        raise RunDirFailed(problem or f"another rank could not write to run.dir {run_dir}; see its message")
    return claim


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, what: str) -> Iterator[None]:
    """Hold run.dir's lock for the block, for a command other than training that writes into a finished run
    (`cxrdist.report`): it is refused while a training writes there. No folder: nothing to lock (the
    command says what is wrong)."""
    if not Path(run_dir).is_dir():
        yield
        return
    lock = acquire(Path(run_dir) / LOCK_FILE, f"run.dir {run_dir} ({what})")
    try:
        yield
    finally:
        lock.release(remove=lock.created)  # a folder without a lock file stays without one


def release_run_dir(claim: RunDirClaim, failed: bool) -> None:
    """Give run.dir's lock back. After a start that `failed` before writing any result, first remove what
    this start made: the files it wrote, its lock file, and the folder it created if nothing else is in it.
    Main process only (other ranks hold nothing)."""
    run_dir = claim.run_dir
    if failed and not earlier_results(run_dir):
        for name in claim.written:
            (run_dir / name).unlink(missing_ok=True)
        if claim.lock is not None and claim.lock.created:
            claim.lock.release(remove=True)
        if claim.created is not None and claim.created.is_dir():
            if claim.lock is None and (run_dir / LOCK_FILE).exists():
                # A stop inside `acquire` can leave the lock file unheld; one another start holds (it
                # won the race to a folder both found missing) stays.
                with contextlib.suppress(Busy, LockFailed):
                    acquire(run_dir / LOCK_FILE, "clean-up").release(remove=True)
            # The folders this start created, from run.dir up to the top-most, while they are empty.
            folder = Path(os.path.abspath(run_dir))
            while True:
                with contextlib.suppress(OSError):
                    folder.rmdir()
                if folder == claim.created or folder.parent == folder:
                    break
                folder = folder.parent
    if claim.lock is not None:
        claim.lock.release()


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
        trained = parse_manifest(path.read_bytes(), str(path))
    except (OSError, ManifestError) as e:  # missing, `{}`, `[]`, a split missing: all unusable alike
        reason = e.strerror if isinstance(e, OSError) else str(e)
        raise RunDirError(
            f"--resume: cannot use {path} ({reason}); it records the data this run trained on. Restore it "
            "from the shards the run used (their manifest.json), or start a new run."
        ) from None
    differences = manifest_differences(trained, given)
    if differences:
        raise RunDirError(
            f"--resume: the shards at {source} are not the data this run trained on ({path}): "
            f"{'; '.join(differences)}. Resume with the original shards (copies elsewhere are fine), or "
            "start a new run."
        )


def write_run_header(claim: RunDirClaim, config_toml: str, manifest: dict[str, Any]) -> None:
    """config.toml and the manifest the run trains on, recorded in `claim`. Main process only."""
    claim.written += [CONFIG_FILE, MANIFEST_FILE]
    atomic_write_text(claim.run_dir / CONFIG_FILE, config_toml)
    atomic_write_json(claim.run_dir / MANIFEST_FILE, manifest)


def read_metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl as a list of per-epoch rows ([] before the first epoch).

    A last line that is not a whole row (an older cxrdist appended in place, and a full disk could cut the
    append short) is left out: its epoch is redone on resume. Any other bad line is a `RunDirError`."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise ValueError("not an epoch row")
        except ValueError as e:
            if i == len(lines) - 1:
                break  # a torn tail
            raise RunDirError(f"{path}: line {i + 1} is not a metrics row ({e}); edited by hand?") from None
        rows.append(row)
    return rows


def append_metrics_row(run_dir: Path, rows: list[dict], row: dict) -> None:
    """Add `row` to metrics.jsonl, which holds `rows` so far. The whole file is rewritten under a temporary
    name and renamed into place (a few kB): a full disk or a kill mid-write leaves the previous whole file,
    never a torn line. Main process only."""
    atomic_write_text(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in [*rows, row]))
