"""Using a trained model: evaluate (1 and 2 ranks), predict, explain, and the demo, via their real CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch import accelerate_launch, run_module

pytestmark = pytest.mark.slow


def test_evaluate_is_identical_on_one_and_two_ranks(trained_run, train_shards, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    res = run_module(
        "cxrdist.evaluate", trained_run, "--shards", train_shards, "--out", one, "--num-workers", "1"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "macro avg" in res.stdout and "weighted avg" in res.stdout and "balanced accuracy" in res.stdout
    res = accelerate_launch(
        2, "cxrdist.evaluate", trained_run, "--shards", train_shards, "--out", two, "--num-workers", "2"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    manifest = json.loads((train_shards / "manifest.json").read_text())
    assert a["num_samples"] == b["num_samples"] == manifest["splits"]["test"]["count"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix"):
        assert a[key] == b[key], key
    for name in manifest["classes"]:
        for field in ("precision", "recall", "specificity", "f1", "support", "roc_auc"):
            assert a["per_class"][name][field] == pytest.approx(b["per_class"][name][field], abs=1e-6), (
                name,
                field,
            )
    assert (tmp_path / "one_confusion.png").is_file()
    # The test split of a run evaluated again gives the training run's own test metrics.
    train_test = json.loads((trained_run / "test_metrics.json").read_text())
    assert a["confusion_matrix"] == train_test["confusion_matrix"]


def test_evaluate_other_split_tta_and_errors(trained_run, train_shards, tmp_path):
    out = tmp_path / "val.json"
    res = run_module(
        "cxrdist.evaluate",
        trained_run / "best",
        "--shards",
        train_shards,
        "--split",
        "val",
        "--tta",
        "--out",
        out,
        "--num-workers",
        "0",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((train_shards / "manifest.json").read_text())
    val = json.loads(out.read_text())
    assert val["num_samples"] == manifest["splits"]["val"]["count"] and val["tta_hflip"] is True
    res = run_module("cxrdist.evaluate", tmp_path / "no-such-run", "--shards", train_shards)
    assert res.returncode == 2 and "no-such-run" in res.stderr and "Traceback" not in res.stderr


def test_evaluate_fails_when_samples_differ_from_the_manifest(trained_run, train_shards, tmp_path):
    """A manifest that claims more test samples than the shards hold must fail, not report quietly."""
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(train_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    test = manifest["splits"]["test"]
    test["count"] += 1  # consistently everywhere, so that only reading the shards can tell
    test["shards"][0]["count"] += 1
    test["class_counts"][manifest["classes"][0]] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    res = run_module("cxrdist.evaluate", trained_run, "--shards", copy, "--out", tmp_path / "x.json")
    assert res.returncode == 1
    assert "manifest" in res.stderr and str(manifest["splits"]["test"]["count"]) in res.stderr
    assert not (tmp_path / "x.json").exists()


def test_predict_on_real_radiographs_and_a_corrupt_file(trained_run, real_sample_dir, tmp_path):
    folder = tmp_path / "inbox"
    (folder / "nested").mkdir(parents=True)
    real = (
        sorted((real_sample_dir / "COVID").glob("*.png"))[:3]
        + sorted((real_sample_dir / "Normal").glob("*.png"))[:2]
    )
    for i, src in enumerate(real):
        (folder / "nested" / f"img{i}.png").write_bytes(src.read_bytes())
    (folder / "broken.png").write_bytes(real[0].read_bytes()[:200])  # truncated
    gray16 = (np.linspace(0, 65535, 300 * 300).reshape(300, 300)).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "sixteen.png")
    Image.fromarray(np.full((200, 200), 90, np.uint8)).convert("RGB").save(folder / "rgb.jpg", quality=90)

    res = run_module("cxrdist.predict", trained_run, folder, "--json", "--batch-size", "3")
    assert res.returncode == 1, "a skipped file must show in the exit status"
    assert "broken.png" in res.stderr
    records = json.loads(res.stdout)
    assert len(records) == 7
    paths = {Path(r["path"]).name for r in records}
    assert paths == {f"img{i}.png" for i in range(5)} | {"sixteen.png", "rgb.jpg"}
    classes = json.loads((trained_run / "best/meta.json").read_text())["classes"]
    for r in records:
        assert r["predicted"] in classes
        assert list(r["probabilities"]) == classes
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)

    res = run_module("cxrdist.predict", trained_run, *real[:2])
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[1] in classes for line in lines)


def test_explain_writes_distinct_overlays_and_a_grid(trained_run, train_shards, synth_src, tmp_path):
    images = (
        sorted((synth_src / "COVID" / "images").glob("*.png"))[:2]
        + sorted((synth_src / "Normal" / "images").glob("*.png"))[:2]
    )
    out = tmp_path / "cam"
    res = run_module(
        "cxrdist.explain", trained_run, *images, "--out", out, "--shards", train_shards, "--per-class", "2"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    overlays = sorted(out.glob("*_gradcam.png"))
    assert len(overlays) == 4
    arrays = [np.asarray(Image.open(p)) for p in overlays]
    assert all(a.ndim == 3 and a.shape[2] == 3 for a in arrays)
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert not np.array_equal(arrays[i], arrays[j])
    summary = json.loads((out / "explain_summary.json").read_text())
    per_class = summary["shards"]["per_class"]
    assert set(per_class) == set(json.loads((trained_run / "best/meta.json").read_text())["classes"])
    for row in per_class.values():
        assert 0.0 <= row["mean_outside_share"] <= 1.0
    grid = Image.open(summary["shards"]["grid"])
    size = json.loads((trained_run / "best/meta.json").read_text())["image_size"]
    assert grid.size == (2 * size, 4 * size)
    assert "outside" in res.stdout


def test_demo_end_to_end_tiny(tmp_path):
    out = tmp_path / "demo"
    res = run_module(
        "cxrdist.demo",
        "--out",
        out,
        "--per-class",
        "24",
        "--size",
        "64",
        "--set",
        "train.epochs=1",
        "--set",
        "train.per_device_batch_size=16",
    )
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    for name in (
        "run/test_metrics.json",
        "run/confusion_test.png",
        "run/curves.png",
        "run/best/model.safetensors",
        "shards/manifest.json",
        "gradcam/gradcam_grid_test.png",
    ):
        assert (out / name).is_file(), name
    assert "macro avg" in res.stdout and "confusion_test.png" in res.stdout
    res = run_module("cxrdist.demo", "--out", out, "--per-class", "24")
    assert res.returncode == 2 and "--force" in res.stderr and "Traceback" not in res.stderr
    (out / "thesis.txt").write_text("mine")
    res = run_module("cxrdist.demo", "--out", out, "--per-class", "24", "--force")
    assert res.returncode == 2 and "thesis.txt" in res.stderr and (out / "thesis.txt").exists()
