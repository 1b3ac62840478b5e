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


# ----------------------------------------------------------------- 22.10: loaded metadata is checked

CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
SIZE = 32


def fake_onnx(path: Path, **changes) -> Path:
    """A tiny cxrdist-shaped ONNX classifier (uint8 (N, 1, 8, 8) -> (N, 4) probabilities) whose metadata
    is what `cxrdist.export` writes, with `changes` applied (JSON values)."""
    import json

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cxrdist.onnx_model import FORMAT

    s = 8
    x = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 1, s, s])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(s * s, 4)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["xf"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 20)]
    )
    model.ir_version = 10
    meta = {
        "cxrdist_format": FORMAT,
        "classes": CLASSES,
        "image_size": s,
        "model_name": "test_resnet",
        "in_chans": 3,
        "input_dtype": "uint8",
        "temperature": None,
    }
    meta.update(changes)
    helper.set_model_props(model, {k: json.dumps(v) for k, v in meta.items()})
    onnx.save(model, str(path))
    return path


def test_a_well_formed_onnx_file_loads(tmp_path: Path) -> None:
    from cxrdist.onnx_model import load_onnx

    clf = load_onnx(fake_onnx(tmp_path / "m.onnx"))
    assert clf.classes == tuple(CLASSES) and clf.image_size == 8


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"classes": CLASSES[:3]}, "names 3 classes .* but the weights have 4 outputs"),
        ({"classes": ["A", "A", "B", "C"]}, "names a class twice"),
        ({"classes": "COVID"}, "classes must be a non-empty list"),
        ({"image_size": "abc"}, "image_size must be a whole number of pixels in 1..8192, got 'abc'"),
        ({"image_size": 100000}, "image_size must be a whole number .* got 100000"),
        ({"image_size": 16}, "image_size 16 but the graph's input has shape"),
        ({"temperature": "hot"}, "temperature must be a positive number"),
        ({"temperature": -1}, "temperature must be a positive number"),
    ],
)
def test_tampered_onnx_metadata_is_refused(tmp_path: Path, changes: dict, message: str) -> None:
    from cxrdist.onnx_model import load_onnx
    from shard_tools.errors import InputError

    with pytest.raises(InputError, match=message):
        load_onnx(fake_onnx(tmp_path / "m.onnx", **changes))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """best/ of a 4-class test_resnet at 32 px, as training writes it."""
    import torch

    from cxrdist.artifacts import export_model, model_meta
    from cxrdist.config import ModelConfig
    from cxrdist.models import create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig(name="test_resnet", in_chans=3), len(CLASSES))
    meta = model_meta("test_resnet", 3, tuple(CLASSES), SIZE, {"epoch": 1})
    export_model(model.state_dict(), meta, tmp_path / "run" / "best")
    return tmp_path / "run" / "best"


def tamper(model_dir: Path, **changes) -> None:
    import json

    meta = json.loads((model_dir / "meta.json").read_text())
    meta.update(changes)
    (model_dir / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"classes": CLASSES[:3]}, "names 3 classes .* but the weights have 4 outputs"),
        ({"classes": [*CLASSES, "Other"]}, "names 5 classes .* but the weights have 4 outputs"),
        ({"image_size": "abc"}, "image_size must be a whole number of pixels in 1..8192, got 'abc'"),
        ({"image_size": 100000}, "image_size must be a whole number .* got 100000"),
        ({"image_size": 64.5}, "image_size must be a whole number"),
        ({"model": {"name": "test_resnet", "in_chans": 2}}, "in_chans must be 1 or 3"),
        ({"normalization": {"mean": [0.5], "std": [0.2]}}, "normalization needs 3 means and stds"),
        ({"normalization": {"mean": [0.5] * 3, "std": [0.0] * 3}}, "positive stds"),
    ],
)
def test_tampered_meta_json_is_refused(model_dir: Path, changes: dict, message: str) -> None:
    import torch

    from cxrdist.artifacts import load_trained_model
    from shard_tools.errors import InputError

    tamper(model_dir, **changes)
    with pytest.raises(InputError, match=message):
        load_trained_model(model_dir, torch.device("cpu"))


def test_predict_with_tampered_meta_is_one_line_exit_2(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The issue's case: a huge image_size reached the resize before anything checked it."""
    import numpy as np
    from PIL import Image

    from cxrdist import predict
    from shard_tools.cli import run_main

    image = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(image)
    tamper(model_dir, image_size=100000)
    assert run_main(predict.main, [str(model_dir), str(image)]) == 2
    err = capsys.readouterr().err
    assert "image_size" in one_line(err) and "meta.json" in err


# ----------------------------------------------- 21.8 / 22.11: no unasked overwrites, no repeats


def gray_png(path: Path, value: int = 128) -> Path:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40), value, np.uint8)).save(path)
    return path


def test_predict_file_and_its_folder_predicts_it_once(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    from cxrdist import predict
    from shard_tools.cli import run_main

    folder = tmp_path / "xrays"
    a, b = gray_png(folder / "a.png", 100), gray_png(folder / "b.png", 200)
    (folder / "link.png").symlink_to(a)
    assert run_main(predict.main, [str(model_dir), str(a), str(folder), "--json"]) == 0
    paths = [r["path"] for r in json.loads(capsys.readouterr().out)]
    assert paths == [str(a), str(b)]


def test_evaluate_refuses_an_existing_out_and_its_plots_without_force(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from cxrdist import evaluate
    from shard_tools.cli import run_main

    notes = tmp_path / "notes.json"
    notes.write_text("my notes")
    args = [str(model_dir), "--shards", str(tmp_path / "no-shards"), "--out", str(notes)]
    assert run_main(evaluate.main, args) == 2
    assert "notes.json already exists" in one_line(capsys.readouterr().err)
    assert notes.read_text() == "my notes"
    notes.unlink()
    (tmp_path / "notes_roc.png").write_text("my picture")
    assert run_main(evaluate.main, args) == 2
    assert "notes_roc.png already exists" in one_line(capsys.readouterr().err)
    # With --force the check passes (the run then fails on the missing shards, not on the file).
    assert run_main(evaluate.main, [*args, "--force"]) == 2
    assert "already exists" not in capsys.readouterr().err


def test_explain_refuses_to_replace_trainings_grid_without_force(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from cxrdist import explain
    from shard_tools.cli import run_main

    out = tmp_path / "run" / "gradcam"
    out.mkdir()
    (out / "gradcam_grid_test.png").write_bytes(b"training's grid")
    args = [str(model_dir), "--shards", str(tmp_path / "shards"), "--out", str(out)]
    assert run_main(explain.main, args) == 2
    assert "gradcam_grid_test.png already exists" in one_line(capsys.readouterr().err)
    assert (out / "gradcam_grid_test.png").read_bytes() == b"training's grid"


def test_explain_images_twice_needs_force_and_keeps_other_files(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from cxrdist import explain
    from shard_tools.cli import run_main

    image = gray_png(tmp_path / "x.png")
    out = tmp_path / "cam"
    assert run_main(explain.main, [str(model_dir), str(image), "--out", str(out)]) == 0
    (out / "mine.txt").write_text("keep")
    before = (out / "x_gradcam.png").read_bytes()
    capsys.readouterr()
    assert run_main(explain.main, [str(model_dir), str(image), "--out", str(out)]) == 2
    assert "already exists (and 1 more" in one_line(capsys.readouterr().err)
    assert (out / "x_gradcam.png").read_bytes() == before
    assert run_main(explain.main, [str(model_dir), str(image), "--out", str(out), "--force"]) == 0
    assert (out / "mine.txt").read_text() == "keep"


def test_explain_refuses_two_images_that_would_share_an_overlay(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from cxrdist import explain
    from shard_tools.cli import run_main

    a, b = gray_png(tmp_path / "a" / "x.png"), gray_png(tmp_path / "b" / "x.png")
    assert run_main(explain.main, [str(model_dir), str(a), str(b), "--out", str(tmp_path / "o")]) == 2
    assert "would both be drawn to" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "o" / "x_gradcam.png").exists()


# --------------------------------------------------- 21.4: one model, one set of numbers


def test_evaluate_precision_defaults_to_the_models() -> None:
    from cxrdist.artifacts import ModelMeta, model_meta
    from cxrdist.evaluate import eval_precision

    def meta(precision: str) -> ModelMeta:
        data = model_meta("test_resnet", 3, tuple(CLASSES), SIZE, {}, mixed_precision=precision)
        return ModelMeta.from_dict(data, "meta.json")

    assert eval_precision("auto", meta("bf16"), cuda=False)[0] == "bf16"
    assert eval_precision("auto", meta("no"), cuda=True)[0] == "no"
    assert eval_precision("auto", meta("fp16"), cuda=True)[0] == "fp16"
    used, why = eval_precision("auto", meta("fp16"), cuda=False)
    assert used == "no" and "needs a CUDA GPU" in why
    used, why = eval_precision("no", meta("bf16"), cuda=False)
    assert used == "no" and "training tested the model in bf16" in why


def test_evaluate_mixed_precision_has_help() -> None:
    import contextlib
    import io

    from cxrdist.evaluate import parse_args

    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(text.getvalue().split())
    assert "--mixed-precision {auto,no,bf16,fp16}" in help_text
    assert "auto (default) = the one the model was trained" in help_text


def test_meta_json_refuses_an_unknown_precision(model_dir: Path) -> None:
    import torch

    from cxrdist.artifacts import load_trained_model
    from shard_tools.errors import InputError

    tamper(model_dir, mixed_precision="fp8")
    with pytest.raises(InputError, match="mixed_precision must be one of no, bf16, fp16"):
        load_trained_model(model_dir, torch.device("cpu"))


@pytest.mark.slow
def test_evaluate_repeats_trainings_test_numbers_of_a_bf16_run(train_shards: Path, tmp_path: Path) -> None:
    """The issue's case: training tested in bf16, evaluate defaulted to fp32 and gave other numbers."""
    import json

    from launch import fast_overrides, run_module

    run_dir = tmp_path / "run"
    sets = fast_overrides(run_dir, train_shards, 2, "train.mixed_precision=bf16", "eval.gradcam_per_class=0")
    res = run_module("cxrdist.train", "recipes/demo.toml", *sets)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run_dir / "best" / "meta.json").read_text())["mixed_precision"] == "bf16"
    out = tmp_path / "eval.json"
    shards = ("--shards", train_shards, "--num-workers", "1")
    res = run_module("cxrdist.evaluate", run_dir, *shards, "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "precision: bf16 autocast (as training validated and tested the model" in res.stdout
    trained, evaluated = (json.loads(p.read_text()) for p in (run_dir / "test_metrics.json", out))
    assert trained["precision"] == {"mixed_precision": "bf16"}
    assert evaluated["precision"] == {"mixed_precision": "bf16", "model_tested_in": "bf16"}
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "loss", "confusion_matrix"):
        assert evaluated[key] == trained[key], key
    assert evaluated["macro"] == trained["macro"]
    assert evaluated["calibration"]["before"]["ece"] == trained["calibration"]["before"]["ece"]
    # What evaluate did before: fp32 on a bf16-tested model gives other numbers (so the test can fail).
    fp32 = tmp_path / "fp32.json"
    res = run_module("cxrdist.evaluate", run_dir, *shards, "--out", fp32, "--mixed-precision", "no")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training tested the model in bf16 autocast" in res.stdout
    assert json.loads(fp32.read_text())["loss"] != trained["loss"]


def test_predict_decision_agrees_with_the_probability_it_reports() -> None:
    """A threshold copied from an earlier output (6 decimals) calls that image positive."""
    import numpy as np

    from cxrdist.predict import describe

    probs = np.array([0.12345599, 0.87654401])  # reported as 0.123456
    record = describe(Path("x.png"), probs, ("COVID", "Normal"), "COVID", 0.123456)
    assert record["decision"]["probability"] == 0.123456
    assert record["decision"]["call"] == "positive"


# ------------------------------------------------------------------- 21.10: a clean checkout


@pytest.mark.slow
def test_the_readmes_steps_leave_no_untracked_files() -> None:
    """Every path the README's commands write in the checkout is ignored by git."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = [
        "shards/cxr/manifest.json",  # pack
        "covid19-radiography-database.zip",  # kaggle datasets download
        "COVID-19_Radiography_Dataset/COVID/images/COVID-1.png",  # an extracted copy
        "weights/resnet18.safetensors",  # "Pretrained weights offline"
        "resnet18.onnx",  # export
        "runs/resnet18_pretrained/best/meta.json",  # train
        "demo_out/run/report.html",  # demo
    ]
    res = subprocess.run(
        ["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True
    )
    assert sorted(res.stdout.split()) == sorted(written), res.stdout


# --------------------------------------------------------------- 21.9: the README walks the path


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_readme_real_use_shows_own_shards_missing_classes_and_the_launcher() -> None:
    real_use = readme_section("Real use")
    assert "--set data.shards=" in real_use
    assert "--classes" in real_use
    train_lines = [line for line in real_use.splitlines() if "-m cxrdist.train" in line]
    assert train_lines and not any(line.startswith("accelerate launch") for line in train_lines)
    assert 'L="python -m cxrdist.launch' in real_use
    assert "--out runs/resnet18_pretrained/gradcam" not in real_use  # training's grid lives there


def test_readme_demo_notes_say_what_is_true() -> None:
    demo = readme_section("What the demo shows")
    assert "without\nnative bf16)" not in demo and "without native bf16)" not in demo
    assert "bf16 autocast" in demo
    assert "vary slightly from run to run and machine to machine" in demo
    development = readme_section("Development")
    assert "-rs" in development and "real sample not found" in development


@pytest.mark.slow
def test_slurm_job_ends_with_the_trainings_exit_code(tmp_path: Path) -> None:
    """The SLURM script launches through cxrdist.launch: a recipe typo ends the job with 2 and one line."""
    import subprocess

    from test_slurm import SCRIPT, slurm_env

    env = slurm_env(tmp_path, RECIPE="recipes/cnn.toml", RUN_DIR=str(tmp_path / "run"))
    res = subprocess.run(
        ["bash", str(SCRIPT), "--set", "train.epoch=3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "CalledProcessError" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.count("unknown key 'train.epoch'") == 1, res.stderr[-3000:]
