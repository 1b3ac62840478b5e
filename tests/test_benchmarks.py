"""The benchmark commands run and report what they measured: `python -m benchmarks --quick` (every section),
`python -m benchmarks --gpu --quick` (the GPU check's whole plan at toy sizes; on a machine without a GPU
its CUDA tests all skip) and the two stand-alone scripts. Timings are not checked: they depend on the
machine and its load; BENCHMARKS.md holds real numbers. Values that do not depend on load are."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from launch import ROOT, quiet_env

pytestmark = pytest.mark.slow


def run(*args: str, timeout: float = 540) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def test_quick_benchmark_writes_every_section(tmp_path):
    out = tmp_path / "results.json"
    res = run("-m", "benchmarks", "--quick", "--out", str(out), "--work", str(tmp_path / "work"))
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
    assert "epoch 2" in results["loader"]["rows"][3]["case"]  # the label says what is timed
    assert all(r["images_per_s"] > 0 for r in pack["rows"] + results["loader"]["rows"])

    steps = results["step"]["rows"]
    cases = {(r["model"], r["precision"], r["channels_last"], r["compile"]) for r in steps}
    for model in ("seed_cnn", "resnet18"):
        for precision in ("no", "bf16"):
            for channels_last in (False, True):
                assert (model, precision, channels_last, False) in cases
    assert all(r["images_per_s"] > 0 for r in steps if not r["compile"]), steps  # eager always runs

    overhead = results["overhead"]["rows"]
    assert {r["model"] for r in overhead} == {"seed_cnn", "resnet18"}
    assert all(r["e2e_images_per_s"] > 0 and r["overhead"] > 0 for r in overhead), overhead

    baseline = results["baseline"]
    for program in ("study_script", "study_script_tuned_env", "cxrdist"):
        assert baseline[program]["wall_s"] > 0
        assert 0 <= baseline[program]["test_accuracy"] <= 1
    assert baseline["speedup"] > 0 and baseline["epochs"] == 1


def test_gpu_check_quick_runs_the_whole_plan(tmp_path):
    out = tmp_path / "gpu" / "gpu-check.json"
    res = run("-m", "benchmarks", "--gpu", "--quick", "--out", str(out), "--work", str(tmp_path / "work"))
    results = json.loads(out.read_text())
    markdown = out.with_suffix(".md").read_text()
    assert markdown in res.stdout  # printed and written: ready to paste
    assert "| model | batch | compute only, img/s |" in markdown

    machine = results["machine"]
    for key in ("device", "torch", "cuda", "cudnn", "cpu_cores", "date_utc"):
        assert key in machine, key
    assert machine["device"] == ("cuda" if torch.cuda.is_available() else "cpu")

    tests = results["tests"]
    assert tests["ok"] and tests["failed"] == 0 and tests["exit_code"] == 0, tests
    assert "tests/test_cuda.py" in tests["command"]
    if not torch.cuda.is_available():  # every CUDA test collected, and skipped
        assert tests["skipped"] >= 9 and tests["passed"] == 0, tests
    # The log is pytest's own output: its summary line says what the JSON counts say.
    summary = (out.parent / "cuda-tests.log").read_text().strip().splitlines()[-1]
    counted = {"passed": tests["passed"], "skipped": tests["skipped"]}
    for outcome, count in counted.items():
        assert (f"{count} {outcome}" in summary) == (count > 0), (summary, tests)

    data = results["data"]
    assert data["images"] == 4 * 8 == sum(data["splits"].values()) and data["image_size_px"] == 128

    rows = {r["model"]: r for r in results["rows"]}
    assert list(rows) == ["resnet18", "seed_cnn"]
    # torch's FLOP counter on ResNet18 at 128 px: about 3.6 GFLOP per image forward + backward.
    assert 3.2 < rows["resnet18"]["gflop_per_image"] < 3.8
    assert rows["seed_cnn"]["gflop_per_image"] < 0.1
    for r in rows.values():
        searched = {s["batch_size"]: s["images_per_s"] for s in r["batch_search"]}
        assert set(searched) == {4, 8} and r["batch_size"] == max(searched, key=searched.get)
        assert r["compute_images_per_s"] == searched[r["batch_size"]] > 0
        for name, cache in (("device cache", "device"), ("streaming", "none")):
            e2e = r[name]
            assert f"data.cache={cache}" in e2e["overrides"]
            assert f"train.per_device_batch_size={r['batch_size']}" in e2e["overrides"]
            # images/s x seconds = the images an epoch trains on: ceil(train / batch) whole batches.
            batch, epoch_images = r["batch_size"], math.ceil(data["splits"]["train"] / r["batch_size"])
            for ips, seconds in zip(e2e["epoch_images_per_s"], e2e["epoch_seconds"], strict=True):
                assert ips * seconds == pytest.approx(epoch_images * batch, rel=1e-6)
            assert len(e2e["epoch_images_per_s"]) == 2  # the steady figure leaves the warm-up epoch out:
            assert e2e["images_per_s"] in e2e["epoch_images_per_s"][1:]  # rules: test_benchmark_rules.py
            assert e2e["share_of_compute"] > 0

    verdicts = results["verdicts"]
    assert len(verdicts) == 4
    assert {(v["model"], v["input"]) for v in verdicts} == {
        (model, name) for model in rows for name in ("device cache", "streaming")
    }
    for v in verdicts:  # which result a share earns: test_benchmark_rules.py, on known numbers
        assert v["result"] in ("PASS", "MISS") and v["target"] in (0.9, 0.7)
        assert f"{v['result']}  {v['model']} {v['input']}:" in res.stdout

    exp = results["experiment"]
    assert exp["recipe"] == "recipes/resnet18_scratch.toml" and exp["train_images"] == data["splits"]["train"]
    assert len(exp["epoch_seconds"]) == exp["epochs"] == 2 and exp["first_epoch_s"] == exp["epoch_seconds"][0]
    assert exp["wall_s"] > exp["training_s"] == pytest.approx(sum(exp["epoch_seconds"]))
    assert exp["result"] in ("PASS", "MISS") and f"**{exp['result']}**" in markdown
    # The diagnoses ran: the profiled step and the loader alone (their failure would be recorded instead).
    assert "profile_error" not in results and results["profile"]["step_ms"] > 0
    assert (out.parent / "profile-resnet18.txt").read_text().count("\n") > 5
    loader = results["loader"]
    assert "loader_error" not in results and all(r > 0 for r in loader["epoch_images_per_s"])
    assert loader["one_core_images_per_s"] > 0


def test_stand_alone_scripts(tmp_path):
    res = run(
        "-m",
        "benchmarks.pack",
        "--per-class",
        "6",
        "--repeats",
        "1",
        "--workers",
        "2",
        "--work",
        str(tmp_path),
    )
    assert "byte-identical across worker counts: yes" in res.stdout and "1 worker (baseline)" in res.stdout
    res = run(
        "-m",
        "benchmarks.loader",
        "--per-class",
        "6",
        "--repeats",
        "1",
        "--workers",
        "1",
        "--work",
        str(tmp_path),
    )
    assert "(a) ImageFolder" in res.stdout and "(d) raw tar reading" in res.stdout
