"""`python -m benchmarks --quick`: every section runs and lands in the JSON. Timings are not checked:
they depend on the machine and its load; BENCHMARKS.md holds real numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch import ROOT, quiet_env

pytestmark = pytest.mark.slow


def test_quick_benchmark_writes_every_section(tmp_path):
    out = tmp_path / "results.json"
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT,
        env=quiet_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"results: {out}" in res.stdout
    results = json.loads(out.read_text())

    machine = results["machine"]
    for key in ("date_utc", "cpu", "cpu_cores", "torch", "torchvision", "timm", "accelerate", "git_commit"):
        assert machine[key], key
    for section in ("pack", "loader", "step", "overhead", "baseline"):
        assert len(results[section]["load_before"]) == 3, section  # the load is recorded with every section

    pack = results["pack"]
    assert pack["rows"][0]["workers"] == 1 and pack["byte_identical"]
    loader = [r["case"][:4] for r in results["loader"]["rows"]]
    assert loader == ["(a) ", "(b) ", "(b+)", "(c) ", "(c+)", "(d) "], loader
    assert all(r["images_per_s"] > 0 for r in pack["rows"] + results["loader"]["rows"])

    steps = results["step"]["rows"]
    cases = {(r["model"], r["precision"], r["channels_last"], r["compile"]) for r in steps}
    for model in ("seed_cnn", "resnet18"):
        for precision in ("no", "bf16"):
            for channels_last in (False, True):
                assert (model, precision, channels_last, False) in cases
    assert all(r.get("images_per_s", 0) > 0 or r.get("error") for r in steps)
    assert all(r["images_per_s"] > 0 for r in steps if not r["compile"]), steps  # eager always runs

    overhead = results["overhead"]["rows"]
    assert {r["model"] for r in overhead} == {"seed_cnn", "resnet18"}
    assert all(r["e2e_images_per_s"] > 0 and r["overhead"] > 0 for r in overhead), overhead

    baseline = results["baseline"]
    for program in ("study_script", "study_script_tuned_env", "cxrdist"):
        assert baseline[program]["wall_s"] > 0
        assert 0 <= baseline[program]["test_accuracy"] <= 1
    assert baseline["speedup"] > 0 and baseline["epochs"] == 1
