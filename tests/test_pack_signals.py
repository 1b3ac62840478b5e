"""Signals and dying workers in shard_tools' process pool (`shard_tools.pool`), with real processes.

A SIGTERM to pack's whole process group (as `timeout`, `scancel` and systemd send it) once left the parent
stuck in `multiprocessing.Pool.terminate` on a queue lock a dead worker held; a worker killed by the
out-of-memory killer left pack waiting forever for its result; and the SIGTERM handler inherited by
verify's and synth's pool workers printed a traceback on every clean run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shard_tools.pool import WorkerDied, ordered_map, process_pool
from shard_tools.synth import generate

pytestmark = pytest.mark.slow


def _staging(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("sig") / "src", per_class=150, size=256, workers=2)


@pytest.mark.parametrize("delay_s", [0.0, 0.02, 0.05, 0.1, 0.2, 0.3])
def test_group_sigterm_during_pack_exits_143_and_cleans_up(src: Path, tmp_path: Path, delay_s: float):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shard_tools.pack", str(src), str(out), "--size", "64", "--workers", "2"]
    cmd += ["--min-shards", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while not _staging(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # the staging folder exists once the pool is about to start
    assert proc.poll() is None, "pack ended before it could be signalled"
    time.sleep(delay_s)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group: the parent and every worker
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("pack hung after a SIGTERM to its process group")
    err = stderr.decode()
    if out.exists():  # it finished (and restored the default SIGTERM action) before the signal landed
        pytest.skip("pack finished before the signal")
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not _staging(out) and not out.exists()


KILL_ONE_WORKER = """
import os, signal, sys
import shard_tools.decode as decode_stage
import shard_tools.pack as pack
from shard_tools.cli import run_main

decode = decode_stage.decode_image

def dies_on_one_file(job):
    if job[2].endswith("COVID-7.png"):
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    return decode(job)

decode_stage.decode_image = dies_on_one_file  # where pack's decode stage looks it up
sys.exit(run_main(pack.main, sys.argv[1:]))
"""


def test_worker_killed_mid_pack_ends_in_one_line(src: Path, tmp_path: Path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", KILL_ONE_WORKER, str(src), str(out), "--size", "32", "--workers", "2"]
    try:
        r = subprocess.run(cmd + ["--no-progress"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("pack waited forever for the task of a killed worker")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "killed by SIGKILL" in r.stderr
    assert not _staging(out) and not out.exists()


def test_verify_and_synth_print_no_traceback_on_a_clean_run(tmp_path: Path):
    run = [sys.executable, "-m"]
    for _ in range(3):  # the traceback came on most runs, not all
        synth = subprocess.run(
            run + ["shard_tools.synth", str(tmp_path / "s"), "--per-class", "40", "--size", "64", "--force"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert synth.returncode == 0 and "Traceback" not in synth.stderr, synth.stderr
    pack = subprocess.run(
        run
        + ["shard_tools.pack", str(tmp_path / "s"), str(tmp_path / "sh"), "--size", "32"]
        + ["--min-shards", "4", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pack.returncode == 0, pack.stderr
    for _ in range(3):
        verify = subprocess.run(
            run + ["shard_tools.verify", str(tmp_path / "sh"), "--workers", "2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert verify.returncode == 0 and "Traceback" not in verify.stderr, verify.stderr
        assert verify.stderr == ""


def _square(x: int) -> int:
    return x * x


def _fails_on_7(x: int) -> int:
    if x == 7:
        raise ValueError("seven")
    return x


def _dies_on_13(x: int) -> int:
    if x == 13:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_pool_keeps_order_reraises_and_names_a_dead_worker():
    jobs = list(range(100))
    with process_pool(3) as pool:
        assert list(ordered_map(pool, _square, jobs, chunksize=4)) == [x * x for x in jobs]
    with process_pool(2) as pool, pytest.raises(ValueError, match="seven"):
        list(ordered_map(pool, _fails_on_7, jobs))
    with process_pool(2) as pool, pytest.raises(WorkerDied, match="killed by SIGKILL"):
        list(ordered_map(pool, _dies_on_13, jobs))
    assert mp.active_children() == []  # every worker reaped, whichever way the block ended
