"""Run cxrdist's real entry points in subprocesses: plainly, or under `accelerate launch` with N ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST_MODEL = "test_resnet"  # timm's tiny ResNet for tests: a real timm model, ~0.4 M parameters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env(**extra: str) -> dict[str, str]:
    """One thread per process (2-core CI), no hub access, no colour codes in captured output."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        NO_COLOR="1",
        TERM="dumb",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_module(module: str, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=quiet_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch_cmd(num_processes: int, module: str, *args: str) -> list[str]:
    """`accelerate launch` with `num_processes` real ranks. On a host without GPUs, --multi_gpu gives
    gloo ranks on CPU; `--cpu --num_processes N` would silently start only one process."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes > 1:
        cmd += ["--multi_gpu", "--num_processes", str(num_processes)]
    else:
        cmd += ["--num_processes", "1"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(free_port()), "-m", module, *map(str, args)]
    return cmd


def accelerate_launch(num_processes: int, module: str, *args: str, timeout: float = 400, **env: str):
    return subprocess.run(
        launch_cmd(num_processes, module, *args),
        cwd=ROOT,
        env=quiet_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def overrides(run_dir: Path, shards: Path, epochs: int, *extra: str, batch: int = 16) -> list[str]:
    """`--set` arguments that shrink any recipe to a test run: its run folder and shards, `epochs`, small
    batches, one loader worker, a small shuffle buffer; then `extra` ("section.key=value", later wins)."""
    sets = [
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        f"train.epochs={epochs}",
        f"train.per_device_batch_size={batch}",
        "data.num_workers=1",
        "data.shuffle_buffer=64",
        *extra,
    ]
    return [arg for s in sets for arg in ("--set", s)]


def fast_overrides(run_dir: Path, shards: Path, epochs: int, *extra: str) -> list[str]:
    """`overrides` for a seconds-long run of recipes/demo.toml with the tiny timm model, in fp32."""
    return overrides(run_dir, shards, epochs, f"model.name={FAST_MODEL}", "train.mixed_precision=no", *extra)
