"""The benchmarks' rules on numbers known in advance (fast, in process): which share of compute passes,
which epochs count as steady, and that every script runs as a module without a sys.path hack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import common, gpu

BENCHMARKS = Path(common.__file__).resolve().parent


def test_verdicts_pass_at_the_target_and_miss_below_it_or_without_a_figure():
    rows = [
        {"model": "a", "device cache": {"share_of_compute": 0.90}, "streaming": {"share_of_compute": 0.69}},
        {"model": "b", "device cache": {"share_of_compute": 0.8999}, "streaming": {"share_of_compute": None}},
    ]
    results = {(v["model"], v["input"]): v["result"] for v in gpu.verdicts(rows)}
    assert results == {
        ("a", "device cache"): "PASS",  # exactly at the 90% target
        ("a", "streaming"): "MISS",  # 69% < 70%
        ("b", "device cache"): "MISS",
        ("b", "streaming"): "MISS",  # nothing measured is not a pass
    }


def test_measure_divides_each_input_by_the_best_compute_only_batch(monkeypatch):
    """share_of_compute = end-to-end images/s over compute-only images/s at the batch that was fastest."""
    compute = {"rows": [{"batch_size": 4, "images_per_s": 50.0}, {"batch_size": 8, "images_per_s": 200.0}]}
    compute["best"] = compute["rows"][1]
    e2e = {"device": 180.0, "none": 100.0}
    monkeypatch.setattr(gpu, "MODELS", ("m",))
    monkeypatch.setattr(gpu, "compute_only", lambda model, setup: compute)
    monkeypatch.setattr(gpu, "flops_per_image", lambda model, device: 1e9)
    monkeypatch.setattr(
        gpu,
        "end_to_end",
        lambda model, batch, cache, setup: {
            "input": "device cache" if cache == "device" else "streaming",
            "images_per_s": e2e[cache],
            "batch": batch,
        },
    )
    (row,) = gpu.measure(SimpleNamespace(device="cpu", precision="no"), peak=None)
    assert row["batch_size"] == 8 and row["device cache"]["batch"] == 8  # end to end at the best batch
    assert row["device cache"]["share_of_compute"] == pytest.approx(0.9)
    assert row["streaming"]["share_of_compute"] == pytest.approx(0.5)
    assert row["tflops"] == pytest.approx(0.2)  # 200 images/s x 1 GFLOP


def test_steady_images_per_s_leaves_the_warm_up_epoch_out():
    rows = [{"images_per_s": 10.0}, {"images_per_s": 40.0}, {"images_per_s": 50.0}]
    assert common.steady_images_per_s(rows) == [40.0, 50.0]
    assert common.steady_images_per_s(rows[:1]) == [10.0]  # a single epoch is all there is


def test_no_script_edits_sys_path():
    """`python -m benchmarks.<name>` finds the package by itself; baseline_study, run as a file like the
    study's script, imports only the installed cxrdist and shard_tools, never `benchmarks`."""
    for script in BENCHMARKS.glob("*.py"):
        assert "sys.path" not in script.read_text(), script.name
    assert "from benchmarks" not in (BENCHMARKS / "baseline_study.py").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["-m", "benchmarks.gray_stem", "--help"],
        ["-m", "benchmarks.recipes_smoke", "--help"],
        [str(BENCHMARKS / "baseline_study.py"), "--help"],
    ],
)
def test_scripts_start_as_documented(command):
    res = subprocess.run(
        [sys.executable, *command], cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr[-2000:]


SETTINGS_ONLY = """
import sys
import torch
import benchmarks.common
benchmarks.common.match_training_process(torch.device("cpu"))
print("cxrdist.runtime" in sys.modules, "cxrdist.train" in sys.modules)
"""


@pytest.mark.slow
def test_benchmarks_take_the_process_settings_without_importing_train():
    """benchmarks.common applies cxrdist.runtime's settings; cxrdist.train (the training entry point, which
    sets an environment variable at import) stays out of the process."""
    res = subprocess.run(
        [sys.executable, "-c", SETTINGS_ONLY],
        cwd=BENCHMARKS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["True", "False"]
