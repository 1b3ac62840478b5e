"""Training's command line ends like every other command (`shard_tools.cli.run_main`), told rank by rank
(`cxrdist.cli.run_on_every_rank`): one line, the README's exit code, never a traceback. In process: the
launched cases are in test_reliability_train.py."""

from __future__ import annotations

import errno

import pytest

import cxrdist.cli
import cxrdist.train
from cxrdist.cli import run_on_every_rank
from cxrdist.config import ConfigError
from cxrdist.distributed import Preempted


def as_rank(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cxrdist.cli, "SILENT_RANK_EXIT_DELAY_S", 0, raising=False)  # no wait for rank 0


def raising(error: BaseException):
    def main(_argv):
        raise error

    return main


@pytest.mark.parametrize("rank", [0, 1])
def test_a_bad_recipe_is_said_once_by_rank_0(monkeypatch, capsys, rank):
    as_rank(monkeypatch, rank)
    assert run_on_every_rank(raising(ConfigError("recipe.toml: [train] epochs: expected an integer"))) == 2
    err = capsys.readouterr().err
    expected = (
        "[rank 0] config error: recipe.toml: [train] epochs: expected an integer\n" if rank == 0 else ""
    )
    assert err == expected


@pytest.mark.parametrize("rank", [0, 1])
def test_a_checkpointed_stop_is_said_once_with_the_signal_exit_code(monkeypatch, capsys, rank):
    as_rank(monkeypatch, rank)
    assert run_on_every_rank(raising(Preempted("SIGTERM", None))) == 143
    err = capsys.readouterr().err
    assert ("preempted: stopped by SIGTERM" in err) == (rank == 0), err


def test_a_lost_rank_is_one_line_naming_the_rank_and_exit_1(monkeypatch, capsys):
    as_rank(monkeypatch, 1)
    code = run_on_every_rank(raising(RuntimeError("[../gloo/transport.cc:42] Connection reset by peer")))
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("[rank 1] error: lost contact with another rank"), err
    assert "--resume" in err and len(err.splitlines()) == 1


def test_any_other_runtime_error_is_a_bug_and_keeps_its_traceback(monkeypatch):
    as_rank(monkeypatch, 0)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_on_every_rank(raising(RuntimeError("shape mismatch")))


def test_a_second_ctrl_c_says_there_is_no_checkpoint(monkeypatch, capsys):
    as_rank(monkeypatch, 1)
    assert run_on_every_rank(raising(KeyboardInterrupt())) == 130
    assert (
        capsys.readouterr().err == "[rank 1] stopped: interrupted by a second Ctrl-C, without a checkpoint\n"
    )


def test_train_main_turns_an_os_error_into_one_line_and_exit_1(monkeypatch, capsys):
    """Training's main shares the handler: a full disk it did not foresee is one line, not a traceback."""

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cxrdist.train, "train", full_disk)
    assert cxrdist.train.main(["recipes/demo.toml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: runs/x/metrics.jsonl: No space left on device"), err


def test_train_main_reports_a_bad_override_with_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert cxrdist.train.main(["recipes/demo.toml", "--set", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and "train.epoch" in err and "Traceback" not in err, err
