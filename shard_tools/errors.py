"""The errors every command of shard_tools and cxrdist raises on purpose, and the exit codes they map to.

Exit codes (README, "Exit codes"), the same for every command:

    0    done
    1    the run failed (a shard went bad mid-read, a disk filled up, a rank died)
    2    bad input or usage: a recipe, an option, a manifest, a file the user gave; change it and retry
    130  interrupted by Ctrl-C (SIGINT)
    143  stopped by SIGTERM (scancel, a spot-instance notice, kill)

Every project error derives from `CxrdistError`; errors about what the user gave derive from `InputError`.
The class decides the exit code (`exit_code_for`), so the same error exits alike from every command. The
message is the whole story: one line that names the file or key and says what to do.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class CxrdistError(Exception):
    """Base of every error the project raises on purpose. Exit code 1: the run failed."""

    exit_code = EXIT_FAILED
    label = "error"  # how the one line on stderr starts: "error: ..."


class InputError(CxrdistError):
    """The input, an option or a file the user gave is wrong; changing it fixes the run. Exit code 2."""

    exit_code = EXIT_USAGE


class PackError(InputError):
    """`shard_tools.pack`: the input or the options cannot give a valid dataset; the message says what to
    change (exit 2). Raised by every stage of pack (`inputs`, `decode`, `write`), so it lives here."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by `shard_tools.cli.sigterm_raises` (a BaseException, like
    KeyboardInterrupt, so that `except Exception` clean-up code does not swallow it)."""


def exit_code_for(error: BaseException) -> int:
    """The exit code of the README's table for an error that ended a command."""
    if isinstance(error, CxrdistError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(error, Terminated):
        return EXIT_SIGTERM
    return EXIT_FAILED


STARTUP_SIGTERM: list[int] = []  # set by `one_line_stops_at_startup`'s handler


def one_line_stops_at_startup() -> None:
    """For `python -m shard_tools.X` and `python -m cxrdist.X`, from the package's import on (its
    `__init__`): Ctrl-C or SIGTERM that lands while the command's modules still import (torch takes
    seconds) ends it with one line and 130 or 143, not a KeyboardInterrupt traceback or a silent death.
    Once `main` runs, `shard_tools.cli.run_main` handles both, and training its own stop flag."""

    def on_sigterm(signum, _frame):
        if hasattr(sys.modules.get("__main__"), "main"):  # imports done; `main` ran or runs its own handler
            signal.signal(signum, signal.SIG_DFL)  # e.g. in atexit after main returned: end as before
            os.kill(os.getpid(), signum)
            return
        STARTUP_SIGTERM.append(signum)  # in case an import swallows the exception: `run_main` raises it again
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)
    previous = sys.excepthook

    def hook(kind, error, tb) -> None:
        if not issubclass(kind, (KeyboardInterrupt, Terminated)):
            previous(kind, error, tb)
            return
        name = "Ctrl-C" if issubclass(kind, KeyboardInterrupt) else "SIGTERM"
        sys.stderr.write(f"stopped: stopped by {name} while starting; nothing was written\n")
        sys.stderr.flush()
        os._exit(exit_code_for(error))  # the code of the README's table, not Python's re-raised signal

    sys.excepthook = hook
