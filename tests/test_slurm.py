"""accelerate_configs/slurm_multinode.sbatch, run as written on one host: a two-node job of two launchers.

SLURM is not installed here, so two stand-ins go first on PATH: `scontrol show hostnames LIST` prints the
comma-separated LIST one per line (as the real one does for a plain list), and `srun` starts its command
once per node in parallel with that task's SLURM_PROCID / SLURM_NODEID, as `srun --ntasks-per-node=1` does
inside an allocation. Everything else is real: the script's variables, its srun line (the launch function
sent as text, the arguments after it), `accelerate launch` with --num_machines 2, gloo ranks on the CPU.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from launch import ROOT, fast_overrides, free_port, quiet_env

SCRIPT = ROOT / "accelerate_configs" / "slurm_multinode.sbatch"

FAKE_SCONTROL = """#!/bin/bash
# stand-in: `scontrol show hostnames a,b` -> a and b, one per line
[[ "$1 $2" == "show hostnames" ]] || { echo "fake scontrol: unsupported: $*" >&2; exit 1; }
tr ',' '\\n' <<< "$3"
"""

FAKE_SRUN = """#!/bin/bash
# stand-in: srun --opt=value... CMD ARGS: CMD once per node, in parallel, with that task's SLURM ids
while [[ "$1" == --* ]]; do echo "fake srun: option $1" >&2; shift; done
pids=()
for ((task = 0; task < SLURM_NNODES; task++)); do
    echo "fake srun: task $task of $SLURM_NNODES" >&2
    SLURM_PROCID=$task SLURM_NODEID=$task SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def _install(bin_dir: Path, name: str, text: str) -> None:
    path = bin_dir / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """What sbatch gives the batch script of `--nodes=2 --ntasks-per-node=1`, one GPU per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _install(bin_dir, "scontrol", FAKE_SCONTROL)
    _install(bin_dir, "srun", FAKE_SRUN)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = quiet_env()
    ours = ("GPUS_PER_NODE", "HEAD_NODE", "MAIN_PROCESS_PORT", "RDZV_BACKEND", "RECIPE", "RUN_DIR")
    for key in [k for k in env if k.startswith("SLURM_") or k in ours]:
        del env[key]  # a test run inside a real SLURM job must not leak its own ids into the fake one
    env.update(
        PATH=path,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="cxrdist",
        SLURM_NNODES="2",
        SLURM_NTASKS="2",
        SLURM_CPUS_PER_TASK="2",
        SLURM_JOB_NODELIST="127.0.0.1,localhost",  # the head node is the first name
        GPUS_PER_NODE="1",
        MAIN_PROCESS_PORT=str(free_port()),
    )
    env.update(extra)
    return env


def test_sbatch_header_asks_for_one_launcher_per_node():
    header = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", SCRIPT.read_text(), flags=re.M))
    assert header["nodes"] == "2" and header["ntasks-per-node"] == "1"
    # The script's fallback process count per node is the GPU count it asks for.
    default = re.search(
        r"GPUS_PER_NODE=\$\{GPUS_PER_NODE:-\$\{SLURM_GPUS_ON_NODE:-(\d+)\}\}", SCRIPT.read_text()
    )
    assert default and default.group(1) == header["gpus-per-node"]
    assert int(header["cpus-per-task"]) >= 1


@pytest.mark.slow
def test_two_node_job_trains_and_evaluates_exactly(train_shards, tmp_path):
    # Paths with spaces: the recipe overrides pass through sbatch's arguments, srun and bash -c intact.
    shards = tmp_path / "shards dir"
    shards.symlink_to(train_shards, target_is_directory=True)
    run_dir = tmp_path / "run dir"
    overrides = fast_overrides(run_dir, shards, 1)
    assert overrides[:2] == ["--set", f"run.dir={run_dir}"]
    env = slurm_env(tmp_path, RECIPE="recipes/demo.toml", RUN_DIR=str(run_dir))
    res = subprocess.run(
        ["bash", str(SCRIPT), *overrides[2:]],  # run.dir comes from RUN_DIR
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "fake srun: task 0 of 2" in res.stderr and "fake srun: task 1 of 2" in res.stderr
    assert "fake srun: option --cpus-per-task=2" in res.stderr  # not inherited from sbatch since 22.05
    assert "head 127.0.0.1:" in res.stdout  # from scontrol's first host name
    assert "on 2 process(es)" in res.stdout
    config = (run_dir / "config.toml").read_text()
    assert "# world_size: 2" in config
    manifest = json.loads((run_dir / "manifest.json").read_text())
    test = json.loads((run_dir / "test_metrics.json").read_text())
    assert test["num_samples"] == manifest["splits"]["test"]["count"]  # every test image once, not padded
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1]
    assert (run_dir / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_outside_slurm_it_says_how_to_run_it(tmp_path):
    env = slurm_env(tmp_path)
    del env["SLURM_JOB_ID"]
    res = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert "submit this script with sbatch" in res.stderr
    assert "fake srun" not in res.stderr  # stopped before launching anything


@pytest.mark.slow
def test_more_tasks_than_nodes_is_refused(tmp_path):
    env = slurm_env(tmp_path, SLURM_NTASKS="8")
    res = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "one task per node" in res.stderr and "fake srun" not in res.stderr
