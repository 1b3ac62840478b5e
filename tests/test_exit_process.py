"""`cxrdist.distributed.exit_process`, how `python -m cxrdist.train` ends on every rank: what `sys.exit`
does before the interpreter's teardown (join threads, atexit handlers, flushed output), then the exit code,
without the teardown that can kill a gloo worker thread mid-release (SIGABRT on Python < 3.14)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch import ROOT, quiet_env

pytestmark = pytest.mark.slow

ENDS = """
import atexit, sys, threading, time
from cxrdist.distributed import exit_process
def late():
    time.sleep(0.3)
    print("thread done", flush=True)
threading.Thread(target=late).start()
atexit.register(lambda: print("atexit ran"))
sys.stdout.write("unflushed")
exit_process(3)
"""


def test_exit_process_joins_threads_runs_atexit_flushes_and_keeps_the_code():
    res = subprocess.run(
        [sys.executable, "-c", ENDS], cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 3, res.stderr
    assert res.stdout.startswith("unflushed") and "thread done" in res.stdout, res.stdout
    assert res.stdout.rstrip().endswith("atexit ran"), res.stdout  # after the thread, as sys.exit
