"""`cxrdist.export` and `cxrdist.onnx_model`: the ONNX file gives PyTorch's probabilities on real radiographs.

Models are built directly (no training) and saved with `export_model` as a run's best/ would be. Their
BatchNorm statistics are randomised and their head scaled so that the probabilities are far from uniform:
an export that dropped the normalisation, the temperature or a BatchNorm would show. The reference is what
`cxrdist.predict` computes: `load_trained_model`, `eval_transform`, the model, softmax.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import cxrdist
from cxrdist import export as export_module
from cxrdist.artifacts import export_model, load_trained_model, model_meta
from cxrdist.augment import eval_transform, normalize_stats
from cxrdist.config import ModelConfig
from cxrdist.export import export_onnx, main
from cxrdist.models import create_model
from cxrdist.onnx_model import FORMAT, load_onnx
from shard_tools.cli import run_main
from shard_tools.errors import CxrdistError, InputError
from shard_tools.images import load_gray
from shard_tools.schema import CLASSES

from launch import ROOT, quiet_env

# Every test exports at least one model (torch.export: seconds each): not for the fast lane.
pytestmark = pytest.mark.slow

TOLERANCE = 1e-4  # the bound on |onnxruntime - PyTorch| per probability


def real_images(sample_dir: Path, size: int, per_class: int = 3) -> np.ndarray:
    """uint8 (N, 1, size, size): the first `per_class` COVID and Normal files, as predict loads them."""
    files = [f for c in ("COVID", "Normal") for f in sorted((sample_dir / c).glob("*.png"))[:per_class]]
    return np.stack([load_gray(f, size) for f in files])[:, None]


def _make_confident(model: nn.Module, images: np.ndarray, in_chans: int, seed: int) -> None:
    """Random BatchNorm statistics, and a head scaled to logits of std 3 on `images` (probabilities far
    from 1/K, as a trained model's are)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
    head = model.classifier[-1] if hasattr(model, "classifier") else model.get_classifier()
    model.eval()
    with torch.no_grad():
        logits = model(eval_transform(torch.from_numpy(images), in_chans))
        head.weight.mul_(3 / logits.std())
        head.bias.mul_(3 / logits.std())


def save_run(
    run: Path, name: str, in_chans: int, images: np.ndarray, temperature: float | None = None
) -> Path:
    """A run directory whose best/ holds a `name` model, its meta.json written by the code training uses
    (`cxrdist.artifacts.model_meta`), with the temperature where `ModelMeta` reads it."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=name, in_chans=in_chans), len(CLASSES))
    _make_confident(model, images, in_chans, seed=1)
    training = {"epoch": 3, "ema": False, "best_metric": "balanced_accuracy", "val_metrics": {}}
    meta = model_meta(name, in_chans, CLASSES, images.shape[-1], training)
    if temperature is not None:
        meta["calibration"] = {"temperature": temperature}
    export_model(model.state_dict(), meta, run / "best")
    return run


def torch_probs(run: Path, images: np.ndarray, temperature: float | None) -> np.ndarray:
    """What cxrdist.predict computes: the saved model on eval_transform'd uint8 images, then softmax."""
    model, meta = load_trained_model(run, torch.device("cpu"))
    with torch.no_grad():
        logits = model(eval_transform(torch.from_numpy(images), meta.in_chans))
    if temperature is not None:
        logits = logits / temperature
    return logits.softmax(1).numpy()


def assert_matches(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape and got.dtype == np.float32
    assert expected.max() > 0.5  # a confident model: a dropped step would move these a lot
    diff = float(np.abs(got - expected).max())
    assert diff <= TOLERANCE, diff
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    return diff


@pytest.fixture(scope="module")
def cnn(real_sample_dir, tmp_path_factory):
    """seed_cnn, 3 channels, 128 px (the study's), exported with the defaults; and its real images."""
    images = real_images(real_sample_dir, 128)
    run = save_run(tmp_path_factory.mktemp("cnn") / "run", "seed_cnn", 3, images)
    out = run.parent / "cnn.onnx"
    result = export_onnx(run, out)
    return run, out, images, result


@pytest.fixture(scope="module")
def calibrated(real_sample_dir, tmp_path_factory):
    """timm's test_resnet, 1 channel, 64 px, temperature 2.5 in meta.json; exported twice: as is (uint8)
    and with --input-dtype float32 --no-temperature."""
    images = real_images(real_sample_dir, 64)
    run = save_run(tmp_path_factory.mktemp("resnet") / "run", "test_resnet", 1, images, temperature=2.5)
    with_t, plain = run.parent / "with_t.onnx", run.parent / "plain.onnx"
    export_onnx(run, with_t)
    export_onnx(run, plain, input_dtype="float32", use_temperature=False)
    return run, with_t, plain, images


def test_seed_cnn_matches_pytorch_on_real_images(cnn):
    run, out, images, result = cnn
    clf = load_onnx(out, threads=1)
    diff = assert_matches(clf.predict(images), torch_probs(run, images, None))
    print(f"seed_cnn max |diff| {diff:.2e}")
    assert result.max_abs_diff <= TOLERANCE and result.temperature is None
    assert (clf.classes, clf.image_size, clf.input_dtype, clf.temperature) == (
        tuple(CLASSES),
        128,
        "uint8",
        None,
    )


def test_temperature_is_in_the_graph_unless_left_out(calibrated):
    run, with_t, plain, images = calibrated
    clf_t, clf_plain = load_onnx(with_t, threads=1), load_onnx(plain, threads=1)
    p_t, p_plain = clf_t.predict(images), clf_plain.predict(images)
    diff_t = assert_matches(p_t, torch_probs(run, images, 2.5))
    diff_plain = assert_matches(p_plain, torch_probs(run, images, None))
    print(f"test_resnet max |diff| {diff_t:.2e} (T = 2.5), {diff_plain:.2e} (no T)")
    assert np.abs(p_t - p_plain).max() > 0.05  # the temperature really changes the output
    assert (clf_t.temperature, clf_plain.temperature) == (2.5, None)
    assert (clf_t.input_dtype, clf_plain.input_dtype) == ("uint8", "float32")
    assert [i.type for i in clf_plain.session.get_inputs()] == ["tensor(float)"]
    # The float32 graph takes the same 0..255 values as float.
    np.testing.assert_array_equal(clf_plain.predict(images.astype(np.float32)), p_plain)


def test_batch_dimension_is_dynamic(calibrated):
    _run, with_t, _plain, images = calibrated
    clf = load_onnx(with_t, threads=1)
    full = clf.predict(images)
    one_by_one = np.concatenate([clf.predict(images[i : i + 1]) for i in range(len(images))])
    np.testing.assert_allclose(one_by_one, full, atol=1e-6)
    big = np.concatenate([images] * 5)  # 30, more than the traced 2 and the checked 3
    np.testing.assert_allclose(clf.predict(big)[-len(images) :], full, atol=1e-6)
    assert clf.predict(images[:0]).shape == (0, len(CLASSES))


def test_metadata_describes_the_model(calibrated):
    _run, with_t, _plain, _images = calibrated
    props = {p.key: json.loads(p.value) for p in onnx.load(str(with_t)).metadata_props}
    mean, std = normalize_stats(1)
    assert props["cxrdist_format"] == FORMAT
    assert props["classes"] == list(CLASSES) and props["image_size"] == 64 and props["in_chans"] == 1
    assert props["model_name"] == "test_resnet" and props["temperature"] == 2.5
    assert props["normalization"]["mean"] == list(mean) and props["normalization"]["std"] == list(std)
    assert props["cxrdist_version"] == cxrdist.__version__ and props["input_dtype"] == "uint8"
    assert props["trained_with"]["epoch"] == 3
    assert load_onnx(with_t).metadata == props


@pytest.mark.slow
def test_resnet18_matches_pytorch_on_real_images(real_sample_dir, tmp_path):
    """The main model: timm resnet18, 3 channels, 128 px, calibrated."""
    images = real_images(real_sample_dir, 128)
    run = save_run(tmp_path / "run", "resnet18", 3, images, temperature=1.3)
    out = tmp_path / "resnet18.onnx"
    result = export_onnx(run, out)
    diff = assert_matches(load_onnx(out, threads=1).predict(images), torch_probs(run, images, 1.3))
    print(f"resnet18 max |diff| {diff:.2e}")
    assert result.temperature == 1.3


# --------------------------------------------------------------------------------- command line and errors


def test_cli_refuses_to_overwrite_without_force(cnn, tmp_path, capsys, monkeypatch):
    run, exported, images, _result = cnn
    # The same model's bytes instead of a second export (seconds): this test is about the file.
    monkeypatch.setattr(export_module, "onnx_bytes", lambda *args: exported.read_bytes())
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the user's file")
    assert run_main(main, [str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and str(out) in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"the user's file"

    assert run_main(main, [str(run), "--out", str(out), "--force"]) == 0
    assert "max |difference|" in capsys.readouterr().out
    assert load_onnx(out).predict(images).shape == (len(images), len(CLASSES))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary file left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing-run", "--out", "{tmp}/m.onnx"], "no such run"),
        (["{run}", "--out", "{tmp}/model.bin"], "*.onnx"),
        (["{run}", "--out", "{tmp}"], "is a directory"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(cnn, tmp_path, capsys, args, message):
    run, *_ = cnn
    (tmp_path / "sub.onnx").mkdir()
    argv = [a.format(run=run, tmp=tmp_path / "sub.onnx" if a == "{tmp}" else tmp_path) for a in args]
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.onnx"]


def test_bad_temperature_is_an_input_error(real_sample_dir, tmp_path):
    run = save_run(tmp_path / "run", "seed_cnn", 1, real_images(real_sample_dir, 128, 1), temperature=-1.0)
    with pytest.raises(InputError, match="calibration.temperature"):
        export_onnx(run, tmp_path / "m.onnx")


def test_a_graph_that_disagrees_with_pytorch_is_not_written(calibrated, tmp_path, monkeypatch):
    """The post-export check can fail: hand it the graph exported without the temperature."""
    run, _with_t, plain, _images = calibrated
    monkeypatch.setattr(export_module, "onnx_bytes", lambda *args: plain.read_bytes())
    with pytest.raises(CxrdistError, match="disagrees with PyTorch"):
        export_onnx(run, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_load_onnx_errors(tmp_path, cnn):
    with pytest.raises(InputError, match="no such ONNX model"):
        load_onnx(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(InputError, match="onnxruntime cannot load it"):
        load_onnx(tmp_path / "junk.onnx")
    # A valid ONNX model that cxrdist did not write.
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "other.onnx"))
    with pytest.raises(InputError, match="not an ONNX model written by cxrdist.export"):
        load_onnx(tmp_path / "other.onnx")
    with pytest.raises(InputError, match="--device"):
        load_onnx(cnn[1], device="tpu")
    clf = load_onnx(cnn[1])
    with pytest.raises(ValueError, match="shape"):
        clf.predict(np.zeros((2, 1, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        clf.predict(np.zeros((2, 1, 128, 128), np.float32))


@pytest.mark.slow
def test_deployment_needs_no_torch(cnn, real_sample_dir):
    """onnx_model plus load_gray classify a radiograph with torch unimportable."""
    run, out, images, _result = cnn
    code = (
        "import sys, json\n"
        "import cxrdist.onnx_model, shard_tools.images\n"
        "assert 'torch' not in sys.modules, 'importing cxrdist.onnx_model imported torch'\n"
        "sys.modules['torch'] = None  # from here on, `import torch` raises ImportError\n"
        "import numpy as np\n"
        "clf = cxrdist.onnx_model.load_onnx(sys.argv[1], threads=1)\n"
        "x = np.stack([shard_tools.images.load_gray(p, clf.image_size) for p in sys.argv[2:]])[:, None]\n"
        "print(json.dumps(clf.predict(x).tolist()))\n"
    )
    paths = [str(p) for c in ("COVID", "Normal") for p in sorted((real_sample_dir / c).glob("*.png"))[:3]]
    res = subprocess.run(
        [sys.executable, "-c", code, str(out), *paths],
        cwd=ROOT,
        env=quiet_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = np.array(json.loads(res.stdout), dtype=np.float32)
    assert_matches(got, torch_probs(run, images, None))
