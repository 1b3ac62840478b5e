"""A newcomer's path (issue 21) and loaded metadata (issue 22, item 10): the launcher fails cleanly with the
command's own exit code, one model gives one set of numbers, nothing is overwritten or repeated unasked, and
a tampered model is refused with one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from launch import free_port, quiet_env

ROOT = Path(__file__).resolve().parents[1]


def cxr_launch(num_processes: int, module: str, *args: str, timeout: float = 300, **env: str):
    """`python -m cxrdist.launch` (the README's launcher) with `num_processes` gloo ranks on the CPU."""
    import subprocess

    cmd = [sys.executable, "-m", "cxrdist.launch"]
    if num_processes > 1:
        cmd += ["--multi_gpu"]
    cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", module, *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=quiet_env(**env), capture_output=True, text=True, timeout=timeout
    )


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------------------- 21.1: the launcher


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_launch_passes_a_recipe_typo_through_as_one_line_and_exit_2(ranks: int) -> None:
    res = cxr_launch(ranks, "cxrdist.train", "recipes/cnn.toml", "--set", "train.epoch=3")
    assert res.returncode == 2, res.stderr
    assert "unknown key 'train.epoch'" in one_line(res.stderr)


@pytest.mark.slow
def test_launch_offline_pretrained_says_the_exact_set_syntax(train_shards: Path, tmp_path: Path) -> None:
    res = cxr_launch(
        1,
        "cxrdist.train",
        "recipes/resnet18_pretrained.toml",
        *("--set", f"run.dir={tmp_path / 'run'}", "--set", f"data.shards={train_shards}"),
        HF_HUB_CACHE=str(tmp_path / "hf"),
        TORCH_HOME=str(tmp_path / "torch"),
    )
    assert res.returncode == 2, res.stderr
    line = one_line(res.stderr)
    assert "--set model.pretrained_file=weights/resnet18" in line, line


@pytest.mark.slow
def test_launch_reports_a_rank_killed_by_a_signal_as_128_plus_n(tmp_path: Path) -> None:
    script = tmp_path / "die.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    import subprocess

    cmd = [sys.executable, "-m", "cxrdist.launch", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    res = subprocess.run(cmd, cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 128 + 9, res.stderr
    assert "SIGKILL" in one_line(res.stderr)


def test_child_exit_codes_as_a_shell_reports_them() -> None:
    from cxrdist.launch import child_exit_code

    assert [child_exit_code(c) for c in (0, 1, 2, 130, 143, -9, -15)] == [0, 1, 2, 130, 143, 137, 143]


def test_offline_message_shows_the_set_syntax(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from cxrdist.config import ModelConfig
    from cxrdist.models import ModelError, create_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"--set model\.pretrained_file=weights/resnet18\.safetensors"):
        create_model(ModelConfig(name="resnet18", pretrained=True), 4)
