"""Reliability of real training runs: a rank killed, preemption (SIGTERM, Ctrl-C), a crash while a
checkpoint is written, tampered checkpoints and shards, corrupt samples, an unwritable run directory.

Every run here is a real process (two gloo ranks through `accelerate launch` where the fault involves
ranks) training the study's seed CNN on the 112 px synthetic shards. The two-rank runs use 4-image
batches, so that an epoch lasts long enough (42 steps) to be interrupted in its middle.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from test_reliability_io import malicious_torch_file, rewrite_shard, shard_keys

from launch import ROOT, accelerate_launch, launch_cmd, overrides, quiet_env, run_module

pytestmark = pytest.mark.slow

RECIPE = "recipes/cnn_augmented.toml"  # augmentation: a resumed run must replay its randomness too
EPOCHS = 2
TIMEOUT_S = 20  # dist.timeout_s for the two-rank runs


def sets(run_dir: Path, shards: Path, epochs: int = EPOCHS, *extra: str, batch: int = 16) -> list[str]:
    """`launch.overrides` in fp32, with a short collective timeout for the two-rank runs."""
    fixed = ("train.mixed_precision=no", f"dist.timeout_s={TIMEOUT_S}")
    return overrides(run_dir, shards, epochs, *fixed, *extra, batch=batch)


class Running:
    """A training process started in its own session (so it can be signalled as a terminal would),
    with stdout and stderr in files (a full pipe would stall it while the test polls)."""

    def __init__(self, cmd: list[str], logs: Path, **popen: object):
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / "stdout.txt", logs / "stderr.txt"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=quiet_env(), stdout=out, stderr=err, start_new_session=True, **popen
            )

    def wait_for(self, path: Path, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) early:\n{self.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"{path} did not appear"
            time.sleep(0.02)

    def ranks(self) -> dict[int, psutil.Process]:
        """The rank processes: the launcher's children that have a RANK (loader workers are theirs)."""
        found = {}
        for child in psutil.Process(self.proc.pid).children():
            try:
                env = child.environ()
            except psutil.Error:
                continue
            if "RANK" in env:
                found[int(env["RANK"])] = child
        return found

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the launcher and everything it started (ranks run in sessions of their own)."""
        if self.proc.poll() is not None:
            return
        tree = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.kill()
        for child in tree:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()


@pytest.fixture()
def start(tmp_path: Path):
    """`start(cmd)` runs a training process; whatever a failed test leaves running is killed."""
    jobs: list[Running] = []

    def start(cmd: list[str]) -> Running:
        jobs.append(Running(cmd, tmp_path / f"logs{len(jobs)}"))
        return jobs[-1]

    yield start
    for job in jobs:
        job.kill()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)


def metric_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def straight(cnn_shards: Path, tmp_path_factory) -> Path:
    """The uninterrupted two-rank run every interrupted-then-resumed run must reproduce bit for bit."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    res = accelerate_launch(2, "cxrdist.train", RECIPE, *sets(run_dir, cnn_shards, batch=4))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on 2 process(es)" in res.stdout
    return run_dir


# ------------------------------------------------------------------------------- ranks and signals

# Runs cxrdist.train (as `accelerate launch SCRIPT PAUSE MODE RECIPE ...`), pausing after micro-step
# PAUSE_STEP of epoch 2: the paused rank writes PAUSE.rank<N>, then waits. MODE "kill": rank 1 waits until it
# is killed (rank 0 trains on into the next gradient all-reduce). MODE "signal": every rank waits until its
# own stop flag is set. The fault then lands mid-epoch for certain; a fixed sleep after epoch 1's checkpoint
# does not (an epoch of the seed CNN takes about 0.3 s on an idle machine, several on a loaded one).
PAUSE_STEP = 4
PAUSED_TRAINING = f"""
import sys, time
from pathlib import Path
import cxrdist.train
from cxrdist.distributed import exit_process
from cxrdist.train import main
pause, mode, real_step = sys.argv[1], sys.argv[2], cxrdist.train.train_step
def train_step(run, state, batch, epoch, i, watch):
    loss = real_step(run, state, batch, epoch, i, watch)
    rank = run.accelerator.process_index
    if (epoch, i) == (2, {PAUSE_STEP}) and (mode == "signal" or rank == 1):
        Path(f"{{pause}}.rank{{rank}}").touch()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (mode == "signal" and run.stop.signal_name):
            time.sleep(0.01)
    return loss
cxrdist.train.train_step = train_step
exit_process(main(sys.argv[3:]))  # as `python -m cxrdist.train` ends
"""


def paused_launch(tmp_path: Path, mode: str, *args: str) -> tuple[list[str], Path]:
    """`launch_cmd(2, "cxrdist.train", *args)` through PAUSED_TRAINING, and the pause marker's prefix."""
    script, pause = tmp_path / "paused_train.py", tmp_path / "pause"
    script.write_text(PAUSED_TRAINING)
    cmd = launch_cmd(2, "cxrdist.train", *args)
    at = cmd.index("cxrdist.train")
    cmd[at - 1 : at + 1] = [str(script), str(pause), mode]  # a script, not `-m module`
    return cmd, pause


def test_killed_rank_fails_the_job_fast_and_resume_reproduces_the_run(cnn_shards, straight, start, tmp_path):
    """SIGKILL one of two ranks mid-epoch: the survivor exits non-zero on its own, well within
    dist.timeout_s, saying what happened; --resume from the last checkpoint then ends bit-identical to
    a run that was never interrupted."""
    run_dir = tmp_path / "run"
    cmd, pause = paused_launch(tmp_path, "kill", RECIPE, *sets(run_dir, cnn_shards, batch=4))
    job = start(cmd)
    job.wait_for(Path(f"{pause}.rank1"))  # rank 1 is mid-epoch 2, waiting
    ranks = job.ranks()
    assert sorted(ranks) == [0, 1]
    survivor = ranks[0].pid
    killed_at = time.monotonic()
    ranks[1].kill()
    assert job.wait(timeout=TIMEOUT_S + 60) != 0
    assert time.monotonic() - killed_at < TIMEOUT_S + 10, "the survivor outlived dist.timeout_s"
    err = job.stderr
    # The survivor's own message. (The launcher's report of its exit code races with torchrun's
    # teardown, which SIGTERMs the survivor as soon as the killed rank is reaped: -15 or 1.)
    assert re.search(rf"exitcode\s*:\s*(1|-15) \(pid: {survivor}\)", err), err[-3000:]
    assert "lost contact with another rank" in err and "--resume" in err, err[-3000:]
    assert "[rank0]: Traceback" not in err, err[-3000:]
    assert checkpoints(run_dir) == ["epoch-0001"]

    res = accelerate_launch(2, "cxrdist.train", RECIPE, *sets(run_dir, cnn_shards, batch=4), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "epoch-0001" in res.stdout
    assert metric_epochs(run_dir) == [1, 2]
    assert_same_weights(straight / "checkpoints/epoch-0002", run_dir / "checkpoints/epoch-0002")


def test_sigterm_saves_on_every_rank_and_resume_reproduces_the_run(cnn_shards, straight, start, tmp_path):
    """SIGTERM to the launcher (SLURM's scancel, a spot instance's notice): every rank finishes its
    step, one checkpoint is saved, the ranks exit 143; --resume ends bit-identical to the straight run.
    torchrun signals each rank's process group, so this also proves the loader workers survive it."""
    run_dir = tmp_path / "run"
    cmd, pause = paused_launch(tmp_path, "signal", RECIPE, *sets(run_dir, cnn_shards, batch=4))
    job = start(cmd)
    for rank in (0, 1):  # both mid-epoch 2, waiting for the signal
        job.wait_for(Path(f"{pause}.rank{rank}"))
    ranks = job.ranks()
    assert sorted(ranks) == [0, 1]
    job.proc.send_signal(signal.SIGTERM)
    job.wait(timeout=60)
    err = " ".join(job.stderr.split())
    saved = checkpoints(run_dir)[-1]
    assert saved != "epoch-0001", err[-3000:]
    assert f"preempted: stopped by SIGTERM; checkpoint saved to {run_dir / 'checkpoints' / saved}" in err
    assert "DataLoader worker" not in err, err[-3000:]
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err[-3000:]
    state = json.loads((run_dir / "checkpoints" / saved / "train_state.json").read_text())
    # Mid-epoch ("epoch-0001-plus-0000NN"), at the first stop check after the pause.
    assert state["epochs_done"] == 1 and state["step_in_epoch"] > PAUSE_STEP, state

    res = accelerate_launch(2, "cxrdist.train", RECIPE, *sets(run_dir, cnn_shards, batch=4), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / saved}" in " ".join(res.stdout.split())
    assert metric_epochs(run_dir) == [1, 2]
    assert_same_weights(straight / "checkpoints/epoch-0002", run_dir / "checkpoints/epoch-0002")


def test_ctrl_c_saves_and_resume_completes(cnn_shards, start, tmp_path):
    """Ctrl-C in a terminal: SIGINT to the whole foreground process group, the training process and
    its loader worker alike. Exit 130 with a checkpoint; --resume completes the run."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "cxrdist.train", RECIPE, *sets(run_dir, cnn_shards, 2)]
    job = start(cmd)
    job.wait_for(run_dir / "checkpoints" / "epoch-0001")
    time.sleep(0.2)
    os.killpg(job.proc.pid, signal.SIGINT)
    assert job.wait(timeout=60) == 130, job.stderr[-3000:]
    err = " ".join(job.stderr.split())
    assert "preempted: stopped by SIGINT" in err and "Traceback" not in err, err[-3000:]
    assert len(checkpoints(run_dir)) == 2
    res = run_module("cxrdist.train", RECIPE, *sets(run_dir, cnn_shards, 2), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert metric_epochs(run_dir) == [1, 2] and (run_dir / "test_metrics.json").is_file()


# --------------------------------------------------------------------------------------- checkpoints

# Runs cxrdist.train, but dies (os._exit: no cleanup, like SIGKILL or a power cut) as soon as torch.save
# writes into a second checkpoint directory: after model.safetensors, before optimizer.bin.
CRASH_IN_SECOND_CHECKPOINT = """
import os, sys, torch
real_save, dirs = torch.save, []
def save(obj, f, *args, **kwargs):
    folder = os.path.dirname(os.path.abspath(str(f)))
    if folder not in dirs:
        dirs.append(folder)
    if len(dirs) == 2:
        os._exit(137)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from cxrdist.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(cnn_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [RECIPE, *sets(run_dir, cnn_shards, 2, "run.keep_checkpoints=1")]
    res = subprocess.run(
        [sys.executable, "-c", CRASH_IN_SECOND_CHECKPOINT, *args],
        cwd=ROOT,
        env=quiet_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 137, res.stderr[-3000:]
    ckpt = run_dir / "checkpoints"
    partial = [p for p in ckpt.iterdir() if p.name != "epoch-0001"]
    assert len(partial) == 1 and partial[0].name.startswith("."), partial  # a temporary name
    assert (partial[0] / "model.safetensors").is_file() and not (partial[0] / "optimizer.bin").exists()
    previous = ckpt / "epoch-0001"  # complete: keep_checkpoints=1 did not remove it early
    assert json.loads((previous / "train_state.json").read_text())["epochs_done"] == 1
    assert load_file(str(previous / "model.safetensors"))
    assert (previous / "optimizer.bin").is_file()

    res = run_module("cxrdist.train", *args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "epoch-0001" in res.stdout and metric_epochs(run_dir) == [1, 2]
    assert checkpoints(run_dir) == ["epoch-0002"]  # the half-written one is gone too


# Training in which rank 1 finds its disk full when it writes its part of the second checkpoint.
DISK_FULL_ON_RANK_1 = """
import errno, os, sys, torch
sys.path.insert(0, os.getcwd())  # this checkout's cxrdist, as `-m` would use
real_save, dirs = torch.save, []
def save(obj, f, *args, **kwargs):
    folder = os.path.dirname(os.path.abspath(str(f)))
    if folder not in dirs:
        dirs.append(folder)
    if len(dirs) == 2 and os.environ["RANK"] == "1":
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from cxrdist.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_failed_checkpoint_save_on_one_rank_stops_all_ranks_and_keeps_the_previous(cnn_shards, tmp_path):
    """ENOSPC on rank 1 only, mid-training: both ranks stop together at once (none waits at a barrier
    until dist.timeout_s), saying which checkpoint failed; the previous checkpoint is untouched."""
    run_dir, script = tmp_path / "run", tmp_path / "disk_full_on_rank_1.py"
    script.write_text(DISK_FULL_ON_RANK_1)
    cmd = launch_cmd(2, "cxrdist.train", RECIPE, *sets(run_dir, cnn_shards, 2))
    at = cmd.index("cxrdist.train")
    cmd[at - 1 : at + 1] = [str(script)]  # the script instead of `-m cxrdist.train`
    start = time.monotonic()
    res = subprocess.run(cmd, cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode != 0 and time.monotonic() - start < TIMEOUT_S + 30
    err = " ".join(res.stderr.split())
    for rank in (0, 1):
        assert f"[rank {rank}] error: cannot write checkpoint {run_dir / 'checkpoints' / 'epoch-0002'}" in err
    assert "No space left on device" in err and "previous checkpoint" in err, err[-3000:]
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err[-3000:]
    assert [c for c in checkpoints(run_dir) if not c.startswith(".")] == ["epoch-0001"]
    assert json.loads((run_dir / "checkpoints/epoch-0001/train_state.json").read_text())["epochs_done"] == 1


def test_tampered_pickle_in_a_checkpoint_never_runs(cnn_shards, straight, tmp_path):
    """optimizer.bin and the RNG pickles replaced by pickles that would create a file when unpickled:
    --resume refuses the checkpoint with a clear error, and the file is never created."""
    run_dir = Path(shutil.copytree(straight, tmp_path / "run"))
    marker = tmp_path / "pwned"
    ckpt = run_dir / "checkpoints" / f"epoch-{EPOCHS:04d}"
    tampered = sorted(p.name for p in ckpt.glob("*") if p.suffix in (".bin", ".pkl"))
    assert "optimizer.bin" in tampered
    for name in tampered:
        malicious_torch_file(ckpt / name, marker)
    res = run_module("cxrdist.train", RECIPE, *sets(run_dir, cnn_shards, EPOCHS + 1, batch=4), "--resume")
    assert res.returncode == 2
    err = " ".join(res.stderr.split())
    assert f"cannot resume from {ckpt}" in err and "Traceback" not in err, err[-3000:]
    assert not marker.exists(), "unpickling the checkpoint ran code"


# -------------------------------------------------------------------------------------- run directory


def _limit_file_size(max_bytes: int):
    def preexec() -> None:  # in the child, before exec: inherited by the ranks and their workers
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return preexec


def test_run_dir_under_a_file_fails_before_training(cnn_shards, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    run_dir = tmp_path / "file" / "run"
    res = run_module("cxrdist.train", RECIPE, *sets(run_dir, cnn_shards, 1))
    assert res.returncode == 1
    err = " ".join(res.stderr.split())
    assert f"run.dir {run_dir} is not writable" in err and "Traceback" not in err, err[-3000:]
    assert "seed_cnn on" not in res.stdout  # stopped before the model was built


def test_unwritable_run_dir_stops_both_ranks_before_training(cnn_shards, tmp_path):
    """Files limited to 512 bytes (a stand-in for a full disk: tests run as root, so permissions do not
    stop writes): both ranks find out at start, agree, and exit together."""
    run_dir = tmp_path / "run"
    res = subprocess.run(
        launch_cmd(2, "cxrdist.train", RECIPE, *sets(run_dir, cnn_shards, 1)),
        cwd=ROOT,
        env=quiet_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_file_size(512),
    )
    assert res.returncode != 0
    err = " ".join(res.stderr.split())
    for rank in (0, 1):
        assert f"[rank {rank}] error: run.dir {run_dir} is not writable (File too large)" in err, err[-3000:]
    assert "[rank0]: Traceback" not in res.stderr and "seed_cnn on" not in res.stdout


def test_run_dir_too_small_for_a_checkpoint_fails_before_training(cnn_shards, tmp_path):
    """Room for small files but not for a checkpoint (20 kB per file; the seed CNN's optimizer state
    alone is 43 kB): a clear error before the first step, and never a partial best/."""
    run_dir = tmp_path / "run"
    res = subprocess.run(
        # num_workers=0: the per-file limit would also stop torch's shared-memory batches
        [sys.executable, "-m", "cxrdist.train", RECIPE, *sets(run_dir, cnn_shards, 1, "data.num_workers=0")],
        cwd=ROOT,
        env=quiet_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_file_size(20_000),
    )
    assert res.returncode == 1
    err = " ".join(res.stderr.split())
    assert "Traceback" not in err and f"run.dir {run_dir}" in err, err[-3000:]
    assert "epoch 1/1" not in res.stdout  # found out before training, not at the first save
    assert not (run_dir / "best").exists()
    assert not run_dir.exists()  # the start failed before any result: no folder left behind


# ----------------------------------------------------------------------------------- damaged shards


@pytest.fixture()
def bad_sample_shards(cnn_shards: Path, tmp_path: Path) -> tuple[Path, set[str]]:
    """A copy of the shards where one sample per train shard has a .png that is not an image; the
    manifest's checksums are updated, so only decoding can notice. Returns (folder, bad keys)."""
    out = Path(shutil.copytree(cnn_shards, tmp_path / "shards"))
    bad = set()
    for shard in sorted(out.glob("train-*.tar")):
        key = shard_keys(shard)[3]
        rewrite_shard(shard, replace={f"{key}.png": b"GIF89a: not a PNG at all"})
        bad.add(key)
    return out, bad


def test_undecodable_sample_stops_training_naming_it(bad_sample_shards, tmp_path):
    shards, bad = bad_sample_shards
    run_dir = tmp_path / "run"
    res = run_module("cxrdist.train", RECIPE, *sets(run_dir, shards, 1))
    assert res.returncode == 1
    err = " ".join(res.stderr.split())
    found = re.search(r"sample '([\w-]+)' in shard (\S+) cannot be decoded", err)
    assert found and found.group(1) in bad and Path(found.group(2)).parent == shards, err[-3000:]
    assert "data.max_bad_samples=0" in err and "Traceback" not in err, err[-3000:]
    assert not (run_dir / "checkpoints").exists() or checkpoints(run_dir) == []


@pytest.mark.parametrize("cache", ["none", "device"])
def test_undecodable_samples_are_skipped_and_logged_up_to_the_limit(bad_sample_shards, tmp_path, cache):
    shards, bad = bad_sample_shards
    run_dir = tmp_path / "run"
    extra = (f"data.cache={cache}", f"data.max_bad_samples={len(bad)}")
    res = run_module("cxrdist.train", RECIPE, *sets(run_dir, shards, 1, *extra))
    assert res.returncode == 0, res.stderr[-3000:]
    err = " ".join(res.stderr.split())
    skipped = re.findall(r"skipping undecodable sample ([\w-]+) in shard (\S+?):", err)
    assert skipped and {key for key, _ in skipped} <= bad, res.stderr[-3000:]
    if cache == "device":  # the cache reads every sample once: all of them are reported
        assert {key for key, _ in skipped} == bad
    assert all(Path(url).parent == shards for _, url in skipped)
    test_count = json.loads((shards / "manifest.json").read_text())["splits"]["test"]["count"]
    assert json.loads((run_dir / "test_metrics.json").read_text())["num_samples"] == test_count


def test_checksums_stop_training_on_modified_or_truncated_shards(cnn_shards, tmp_path):
    shards = Path(shutil.copytree(cnn_shards, tmp_path / "shards"))
    modified, truncated = shards / "train-000001.tar", shards / "val-000000.tar"
    content = bytearray(modified.read_bytes())
    content[len(content) // 2] ^= 0x01
    modified.write_bytes(bytes(content))
    truncated.write_bytes(truncated.read_bytes()[:20_000])
    run_dir = tmp_path / "run"
    res = run_module("cxrdist.train", RECIPE, *sets(run_dir, shards, 1, "data.verify_checksums=true"))
    assert res.returncode == 1
    err = " ".join(res.stderr.split())
    assert "do not match their manifest" in err and "Traceback" not in err, err[-3000:]
    assert "train-000001.tar: sha256" in err and "val-000000.tar: 20000 bytes" in err, err[-3000:]
    assert "seed_cnn on" not in res.stdout  # checked before any shard is used
