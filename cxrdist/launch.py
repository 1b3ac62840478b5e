"""`accelerate launch`, with the launched command's exit code passed through and no launcher traceback.

    python -m cxrdist.launch [accelerate launch options] -m cxrdist.train RECIPE [--set ...]
    python -m cxrdist.launch --config_file accelerate_configs/multi_gpu.yaml -m cxrdist.evaluate RUN ...

It takes exactly `accelerate launch`'s options (it is Accelerate's own parser and launcher) and differs in
what happens when the command fails. `accelerate launch` turns every failure into exit 1 and adds its own
traceback (`subprocess.CalledProcessError` with one process, torch's `ChildFailedError` report with
several) after the command's one line; `--quiet` drops the traceback but still exits 1. A script or a
SLURM job then cannot tell a typo in a recipe (2: fix it, do not resubmit) from a preemption (143: resubmit
with --resume). Here the command's line is the only output, and the exit code is the command's (README,
"Exit codes"): with several ranks, that of the first rank that failed; a rank killed by signal N (the OOM
killer's SIGKILL) gives 128 + N and one line saying so, since the rank itself could print nothing.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Sequence

from shard_tools.cli import print_problem
from shard_tools.errors import EXIT_FAILED, EXIT_OK


def child_exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it: 0..255 as is, killed by signal N (-N) as 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _report_signal(returncode: int, who: str) -> None:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        print_problem(f"{who} was killed by {name} (out of memory?, or stopped from outside)")


def main(argv: Sequence[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    # torchrun logs each worker it stops and each that failed; we say what matters in one line (or the
    # rank did), so those log lines would only repeat it with a pid and a timestamp.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    # Accelerate's --quiet exits 1 whatever the command returned: keep the code, we print no traceback.
    args.quiet = False
    try:
        launch_command(args)
    except subprocess.CalledProcessError as e:  # one process: its stderr was already passed through
        _report_signal(e.returncode, "the launched process")
        return child_exit_code(e.returncode)
    except ChildFailedError as e:  # torchrun: each rank printed its own line
        rank, failure = e.get_first_failure()
        _report_signal(failure.exitcode, f"rank {rank} (pid {failure.pid})")
        return child_exit_code(failure.exitcode)
    except SystemExit as e:  # Accelerate's own: Ctrl-C (130), SIGTERM (128 + 15), a bad launcher option
        if isinstance(e.code, str):
            print_problem(e.code)
            return EXIT_FAILED
        return EXIT_OK if e.code is None else e.code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
