"""What every command line of shard_tools and cxrdist shares: one-line messages, exit codes, argument types.

A command is ``def main(argv) -> int`` wrapped by `run_main`, which turns the project's errors
(`shard_tools.errors`) into one line on stderr and the exit code of the README's table, an operating-system
error (a full disk) into one line and exit 1, Ctrl-C into 130 and SIGTERM into 143, never into a
traceback. An unexpected exception still shows its traceback: that is a bug to report, not a message to
polish.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence

from rich.console import Console
from rich.markup import escape

from shard_tools.errors import EXIT_FAILED, STARTUP_SIGTERM, CxrdistError, Terminated, exit_code_for


def stdout_console() -> Console:
    """Where a command prints its results (tables, the files it wrote): long paths stay on one line in a
    log instead of being wrapped at rich's assumed 80 columns."""
    return Console(soft_wrap=True)


def stderr_console() -> Console:
    """Where a command prints its problems: as `stdout_console`, and never highlighted (plain text)."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def print_problem(
    message: object, label: str = "error", style: str = "red", console: Console | None = None
) -> None:
    """`label: message` on stderr (or `console`), printed literally: paths and '[train]' are not markup."""
    console = console or stderr_console()
    console.print(
        f"[{style}]{escape(label)}:[/{style}] {escape(str(message))}", highlight=False, soft_wrap=True
    )


# Set by `sigterm_raises`' handler. Its exception can land inside third-party code that swallows it (a
# bare `except:` around an optional import): `raise_if_terminated` at a command's milestones says it again.
_sigterm_seen = threading.Event()


def raise_if_terminated() -> None:
    """Raise `Terminated` if SIGTERM arrived within `sigterm_raises`, even if its exception was swallowed."""
    if _sigterm_seen.is_set() or STARTUP_SIGTERM:
        raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread, so `finally` and `except
    BaseException` clean-up runs as it does for Ctrl-C (a temporary folder is removed, not left behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum, _frame):
        _sigterm_seen.set()
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_main(
    main: Callable[[Sequence[str] | None], int],
    argv: Sequence[str] | None = None,
    *,
    label: str = "error",
    say: Callable[..., None] = print_problem,
) -> int:
    """Run a command's `main(argv)` and return its exit code, mapping the project's errors (see module
    docstring). Use as ``sys.exit(run_main(main))``. `say(message, label, style)` prints the one line
    (`print_problem`'s signature; the message is the error itself for a project error): a command that
    every rank of a job runs passes one that names the rank (`cxrdist.cli.run_on_every_rank`)."""
    try:
        with sigterm_raises():
            raise_if_terminated()  # a SIGTERM during the imports that a library swallowed
            return main(argv)
    except CxrdistError as e:
        say(e, e.label if label == "error" else label)
        return exit_code_for(e)
    except OSError as e:  # a disk that filled up, a folder that vanished: the run failed, say where
        where = f"{e.filename}: " if e.filename else ""
        say(f"{where}{e.strerror or e}; nothing half-written was left behind", label)
        return EXIT_FAILED
    except KeyboardInterrupt as e:
        say("interrupted (Ctrl-C); nothing half-written was left behind", "stopped", "yellow")
        return exit_code_for(e)
    except Terminated as e:
        say("stopped by SIGTERM; nothing half-written was left behind", "stopped", "yellow")
        return exit_code_for(e)


# ----------------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size, a count)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (worker processes, resamples; 0 = off or none)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value
