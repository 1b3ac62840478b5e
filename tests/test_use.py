"""Using a trained model: evaluate (1 and 2 ranks), predict, explain, and the demo, via their real CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrdist.explain import GRID_TILE_PX

from launch import accelerate_launch, run_module

pytestmark = pytest.mark.slow


def test_evaluate_is_identical_on_one_two_and_three_ranks(trained_run, train_shards, tmp_path):
    """Every number, intervals and operating points included, is the same whatever the world size."""
    results = {}
    for ranks in (1, 2, 3):
        out = tmp_path / f"r{ranks}.json"
        args = ("cxrdist.evaluate", trained_run, "--shards", train_shards, "--out", out, "--num-workers", "1")
        res = run_module(*args) if ranks == 1 else accelerate_launch(ranks, *args)
        assert res.returncode == 0, res.stderr[-3000:]
        results[ranks] = json.loads(out.read_text())
    res_text = res.stdout
    assert "macro avg" in res_text and "balanced accuracy" in res_text and "95% intervals" in res_text
    a = results[1]
    manifest = json.loads((train_shards / "manifest.json").read_text())
    assert a["num_samples"] == manifest["splits"]["test"]["count"]
    for b in (results[2], results[3]):
        for key in ("num_samples", "accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix"):
            assert a[key] == b[key], key
        assert _close(a["per_class"], b["per_class"]) and _close(a["intervals"], b["intervals"])
        assert _close(a["operating_points"], b["operating_points"]) and _close(
            a["calibration"], b["calibration"]
        )
    for stem in ("r1_confusion", "r1_roc", "r1_reliability"):
        assert (tmp_path / f"{stem}.png").is_file()
    # Intervals hold their point estimates; the same numbers as the training run's own test evaluation.
    assert a["intervals"]["accuracy"][0] <= a["accuracy"] <= a["intervals"]["accuracy"][1]
    for name in manifest["classes"]:
        lo, hi = a["intervals"]["per_class"][name]["recall"]
        assert lo <= a["per_class"][name]["recall"] <= hi
    train_test = json.loads((trained_run / "test_metrics.json").read_text())
    assert a["confusion_matrix"] == train_test["confusion_matrix"]
    assert _close(a["intervals"], train_test["intervals"])


def _close(a, b, tol=1e-6) -> bool:
    """Nested JSON values equal, floats within `tol` (per-sample scores may differ in the last bits)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return abs(a - b) <= tol
    return a == b


def test_temperature_keeps_every_prediction_and_is_applied_by_default(trained_run, train_shards, tmp_path):
    meta = json.loads((trained_run / "best" / "meta.json").read_text())
    temperature = meta["calibration"]["temperature"]
    assert meta["calibration"]["fitted_on"] == "val" and temperature > 0
    with_t, without = tmp_path / "t.json", tmp_path / "raw.json"
    for out, extra in ((with_t, ()), (without, ("--no-temperature",))):
        res = run_module("cxrdist.evaluate", trained_run, "--shards", train_shards, "--out", out, *extra)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = json.loads(with_t.read_text()), json.loads(without.read_text())
    assert a["probabilities"]["temperature"] == temperature and b["probabilities"]["temperature"] is None
    assert a["accuracy"] == b["accuracy"] and a["confusion_matrix"] == b["confusion_matrix"]
    assert a["calibration"]["after"]["ece"] == pytest.approx(
        json.loads((trained_run / "test_metrics.json").read_text())["calibration"]["after"]["ece"]
    )
    assert b["calibration"]["after"] is None


def test_temperature_fitted_on_val_lowers_test_ece_of_an_over_confident_model(trained_run, train_shards):
    """The deliberately over-confident model (logits x 4) is calibrated back by a temperature fitted on
    the validation split: lower ECE and NLL on the test split, the same predictions."""
    import torch

    from cxrdist.artifacts import load_trained_model
    from cxrdist.calibration import expected_calibration_error, fit_temperature
    from cxrdist.data import read_manifest
    from cxrdist.evaluate import EvalSettings, evaluate_split, probabilities, split_metrics

    model, meta = load_trained_model(trained_run, torch.device("cpu"))
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.mul_(4.0)
        head.bias.mul_(4.0)
    manifest = read_manifest(str(train_shards))
    settings = EvalSettings(device=torch.device("cpu"), batch_size=64, num_workers=0, in_chans=meta.in_chans)
    val = evaluate_split(model, manifest, "val", settings)
    test = evaluate_split(model, manifest, "test", settings)
    t = fit_temperature(val.logits, val.labels)
    assert t > 1.5  # it sees the over-confidence
    raw, scaled = probabilities(test), probabilities(test, t)
    assert expected_calibration_error(scaled, test.labels) < expected_calibration_error(raw, test.labels)
    before, after = split_metrics(test, meta.classes, raw), split_metrics(test, meta.classes, scaled)
    assert after["loss"] < before["loss"]
    assert after["confusion_matrix"] == before["confusion_matrix"] and after["accuracy"] == before["accuracy"]


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
    assert val["num_samples"] == manifest["splits"]["val"]["count"] and val["probabilities"]["tta_hflip"]
    plain = val["without_tta"]  # both, so the user sees whether TTA helps
    assert set(plain) >= {"accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc", "intervals"}
    assert "without TTA" in res.stdout
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


def _predict_json(*args) -> list[dict]:
    res = run_module("cxrdist.predict", *map(str, args), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_predict_decides_with_a_threshold_and_averages_the_mirror_image(
    trained_run, real_sample_dir, tmp_path
):
    images = sorted((real_sample_dir / "COVID").glob("*.png"))[:3]
    classes = json.loads((trained_run / "best/meta.json").read_text())["classes"]
    plain = _predict_json(trained_run, *images)
    t = sorted(r["probabilities"]["COVID"] for r in plain)[1]  # a threshold between the images
    decided = _predict_json(trained_run, *images, "--positive", "COVID", "--threshold", t)
    for r, d in zip(plain, decided):
        assert d["probabilities"] == r["probabilities"]
        call = "positive" if r["probabilities"]["COVID"] >= t else "negative"
        assert d["decision"] == {
            "class": "COVID",
            "threshold": t,
            "probability": r["probabilities"]["COVID"],
            "call": call,
        }
    assert {d["decision"]["call"] for d in decided} == {"positive", "negative"}
    res = run_module("cxrdist.predict", trained_run, images[0], "--positive", "COVID", "--threshold", "0.5")
    assert res.returncode == 0 and ("COVID positive" in res.stdout or "COVID negative" in res.stdout)

    # TTA: the mean of the image's probabilities and its mirror image's.
    mirrored = tmp_path / "mirrored.png"
    Image.open(images[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    tta = _predict_json(trained_run, images[0], "--tta")[0]["probabilities"]
    flip = _predict_json(trained_run, mirrored)[0]["probabilities"]
    for c in classes:
        assert tta[c] == pytest.approx((plain[0]["probabilities"][c] + flip[c]) / 2, abs=2e-6)
    raw = _predict_json(trained_run, images[0], "--no-temperature")[0]["probabilities"]
    assert max(raw, key=raw.get) == plain[0]["predicted"] and raw != plain[0]["probabilities"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--batch-size", "-1"], "--batch-size"),
        (["--batch-size", "0"], "--batch-size"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--device", "tpu"], "--device"),
        (["--positive", "COVID"], "go together"),
        (["--positive", "Nope", "--threshold", "0.5"], "'Nope' is not one of the model's classes"),
        (["--positive", "COVID", "--threshold", "1.5"], "[0, 1]"),
    ],
)
def test_predict_bad_options_exit_2_with_one_line(trained_run, real_sample_dir, args, fragment):
    image = sorted((real_sample_dir / "COVID").glob("*.png"))[0]
    res = run_module("cxrdist.predict", trained_run, image, *args)
    assert res.returncode == 2, (args, res.returncode, res.stderr[-2000:])
    assert fragment in res.stderr and "Traceback" not in res.stderr and res.stdout == ""


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--num-workers", "-1"], "--num-workers"),
        (["--out", "/proc/x.json"], "/proc/x.json cannot be written"),
        (["--bootstrap", "-5"], "--bootstrap"),
    ],
)
def test_evaluate_bad_options_exit_2_before_evaluating(trained_run, train_shards, args, fragment):
    res = run_module("cxrdist.evaluate", trained_run, "--shards", train_shards, *args)
    assert res.returncode == 2 and fragment in res.stderr, (args, res.stderr[-2000:])
    assert "Traceback" not in res.stderr and "macro avg" not in res.stdout  # nothing was evaluated


def test_predict_with_the_onnx_export_needs_no_torch(trained_run, real_sample_dir, tmp_path):
    """Export the run, then predict with the .onnx file in a process where importing torch fails: the
    probabilities equal PyTorch's (temperature included) within 1e-4."""
    import subprocess
    import sys

    from launch import ROOT, quiet_env

    model = tmp_path / "model.onnx"
    res = run_module("cxrdist.export", trained_run, "--out", model)
    assert res.returncode == 0, res.stderr[-3000:]
    images = sorted((real_sample_dir / "Normal").glob("*.png"))[:4]
    script = (
        "import sys; sys.modules['torch'] = None  # any import of torch now fails\n"
        "from cxrdist.predict import main\nsys.exit(main(sys.argv[1:]))"
    )
    res = subprocess.run(
        [sys.executable, "-c", script, str(model), *map(str, images), "--json"],
        cwd=ROOT,
        env=quiet_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    onnx_records, torch_records = json.loads(res.stdout), _predict_json(trained_run, *images)
    for a, b in zip(onnx_records, torch_records, strict=True):
        assert a["predicted"] == b["predicted"]
        for c, p in a["probabilities"].items():
            assert p == pytest.approx(b["probabilities"][c], abs=1e-4)


def test_evaluate_per_subgroup(trained_run, train_shards, tmp_path):
    """A CSV maps images to subgroups (say, two hospitals): each gets its metrics with intervals, and
    the subgroups partition the split."""
    from cxrdist.data import read_manifest, sample_paths

    paths = sorted(sample_paths(read_manifest(str(train_shards)), "test").values())
    csv = tmp_path / "sites.csv"
    rows = [f"{Path(p).name},{'site-A' if i % 3 else 'site-B'}" for i, p in enumerate(paths)]
    csv.write_text("file,subgroup\n" + "\n".join(rows) + "\n")
    out = tmp_path / "sub.json"
    res = run_module(
        "cxrdist.evaluate", trained_run, "--shards", train_shards, "--out", out, "--subgroups", csv
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads(out.read_text())
    groups = metrics["subgroups"]
    assert set(groups) == {"site-A", "site-B"}
    assert groups["site-B"]["num_samples"] == len(paths[::3])
    assert sum(g["num_samples"] for g in groups.values()) == metrics["num_samples"]
    for g in groups.values():
        assert g["intervals"]["accuracy"][0] <= g["accuracy"] <= g["intervals"]["accuracy"][1]
    assert "subgroup site-A" in res.stdout


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
    tile = GRID_TILE_PX  # every image drawn at this size, its captions under it (explain.grid_image)
    assert 2 * tile < grid.width < 2 * tile + 40 and 4 * tile + 4 * 38 < grid.height < 4 * tile + 4 * 60
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
        "run/roc_test.png",
        "run/reliability_test.png",
        "run/report.html",
        "run/best/model.safetensors",
        "shards/manifest.json",
        "run/gradcam/gradcam_grid_test.png",
    ):
        assert (out / name).is_file(), name
    assert "macro avg" in res.stdout and "confusion_test.png" in res.stdout
    assert res.stdout.count("macro avg") == 1  # the test table, once
    # Every path the demo lists exists; then the report, and last the audit's verdict (issue 18).
    listed = [line.split()[-1] for line in res.stdout.splitlines() if "demo" in line and ".png" in line]
    assert listed and all(Path(p).is_file() for p in listed), listed
    *_, report_line, verdict_line = res.stdout.strip().splitlines()
    assert report_line.endswith("run/report.html")
    audit = json.loads((out / "run" / "audit.json").read_text())
    assert verdict_line == audit["verdict"]["line"]
    assert audit["mask_source"] == "shards"  # the demo's synthetic set carries its lung masks
    res = run_module("cxrdist.demo", "--out", out, "--per-class", "24")
    assert res.returncode == 2 and "--force" in res.stderr and "Traceback" not in res.stderr
    (out / "thesis.txt").write_text("mine")
    res = run_module("cxrdist.demo", "--out", out, "--per-class", "24", "--force")
    assert res.returncode == 2 and "thesis.txt" in res.stderr and (out / "thesis.txt").exists()
