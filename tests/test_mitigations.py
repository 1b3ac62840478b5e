"""Shortcut mitigations a recipe can switch on: lung-focus preprocessing (`data.lung_focus`, cxrdist.lungs)
and border erasing (`augment.border_erase`, cxrdist.augment).

Focus is checked against a reference computed by hand (a ramp image, whose bilinear resize is known in
closed form), then through every path that must apply it the same way: best/meta.json, evaluate, predict
and the ONNX graph. Border erasing is checked to leave training bit-for-bit unchanged when off and to touch
only the frame when on.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import cxrdist
from cxrdist.artifacts import ModelDirError, ModelMeta, export_model, load_trained_model, model_meta
from cxrdist.augment import augment, eval_transform, train_transform
from cxrdist.config import AugmentConfig, ConfigError, DataConfig, ModelConfig, load_config
from cxrdist.lungs import (
    FILL,
    FOCUS_MARGIN,
    FOCUS_MODES,
    TEMPLATE_FIELDS,
    edge_distance,
    focus,
    focus_box,
    template_mask,
)
from cxrdist.models import create_model

from launch import fast_overrides, run_module

torch.set_num_threads(1)

CLASSES = ("COVID", "Normal", "Viral Pneumonia")


def ramp(size: int, axis: str) -> torch.Tensor:
    """uint8 (1, 1, size, size): each pixel holds its column (axis "x") or row ("y") index."""
    idx = torch.arange(size, dtype=torch.uint8)
    img = idx.view(1, size).expand(size, size) if axis == "x" else idx.view(size, 1).expand(size, size)
    return img.contiguous().view(1, 1, size, size)


# ------------------------------------------------------------------------------------------ focus itself


def test_off_returns_the_images_unchanged() -> None:
    x = torch.randint(0, 256, (3, 1, 40, 40), dtype=torch.uint8)
    assert focus(x, "off") is x


def test_mask_keeps_the_template_and_fills_the_rest() -> None:
    x = torch.randint(0, 256, (2, 1, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = focus(x, "mask")
    inside = template_mask(96, 96)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out[:, :, inside], x[:, :, inside])
    assert (out[:, :, ~inside] == FILL).all()
    assert 0.25 < inside.float().mean() < 0.35  # the documented ~30% of the image


def test_crop_box_is_the_template_bounding_box_plus_the_margin() -> None:
    top = min(cy - ry for _, cy, _, ry in TEMPLATE_FIELDS) - FOCUS_MARGIN
    left = min(cx - rx for cx, _, rx, _ in TEMPLATE_FIELDS) - FOCUS_MARGIN
    assert (round(top, 6), round(left, 6)) == (0.13, 0.11)
    assert focus_box(100, 100) == (13, 81, 11, 89)  # exact fractions stay exact, no pixel more
    assert focus_box(128, 128) == (16, 104, 14, 114)  # outward to whole pixels


@pytest.mark.parametrize("size", [64, 128, 131])
def test_crop_resizes_the_box_bilinearly_back_to_the_image(size: int) -> None:
    """On a ramp, bilinear resizing is linear: output pixel j of n samples the box at
    start + (j + 0.5) * len / n - 0.5 (half-pixel centres), clamped to the box's first and last pixel."""
    top, bottom, left, right = focus_box(size, size)
    j = np.arange(size)

    def expected(start: int, stop: int) -> np.ndarray:
        pos = start + (j + 0.5) * (stop - start) / size - 0.5
        return np.clip(np.round(pos), start, stop - 1)

    x_out = focus(ramp(size, "x"), "crop")[0, 0].numpy().astype(float)
    y_out = focus(ramp(size, "y"), "crop")[0, 0].numpy().astype(float)
    np.testing.assert_allclose(x_out, np.broadcast_to(expected(left, right), (size, size)), atol=1)
    np.testing.assert_allclose(y_out, np.broadcast_to(expected(top, bottom)[:, None], (size, size)), atol=1)
    # Exact but for ties at .5, where float rounding may go either way.
    assert (x_out == np.broadcast_to(expected(left, right), (size, size))).mean() > 0.9


def test_crop_drops_a_corner_marker_and_keeps_a_central_one() -> None:
    x = torch.full((1, 1, 128, 128), 60, dtype=torch.uint8)
    x[..., 2:10, 2:10] = 255  # a burned-in marker in the frame
    x[..., 58:62, 62:66] = 200  # something between the lungs
    out = focus(x, "crop")
    assert out.max() == 200  # the marker is gone
    assert (out > 130).sum() > 16  # the centre is there, enlarged
    assert (focus(x, "mask")[..., 2:10, 2:10] == FILL).all()


def test_focus_rejects_bad_modes_and_inputs() -> None:
    x = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="lung_focus must be one of off, mask, crop, got 'lungs'"):
        focus(x, "lungs")
    with pytest.raises(ValueError, match="uint8"):
        focus(x.float(), "mask")


def test_focus_runs_in_float_inside_autocast() -> None:
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = focus(x, "crop")
    assert torch.equal(inside, focus(x, "crop"))


# --------------------------------------------------------------------------------------------- config


def test_config_modes_are_the_modes_focus_knows() -> None:
    field = next(f for f in dataclasses.fields(DataConfig) if f.name == "lung_focus")
    assert tuple(field.metadata["choices"]) == FOCUS_MODES and DataConfig().lung_focus == "off"
    assert load_config(None, ["data.lung_focus=crop"]).data.lung_focus == "crop"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.lung_focus=lungs", r"\[data\] lung_focus: 'lungs' is not one of 'off', 'mask', 'crop'"),
        ("data.lung_focus=true", r"\[data\] lung_focus: expected a string"),
        ("augment.border_erase=1.5", r"\[augment\] border_erase: must be <= 1.0"),
        ("augment.border_erase=-0.1", r"\[augment\] border_erase: must be >= 0.0"),
        ("augment.border_erase_width=[0.2, 0.1]", r"\[augment\] border_erase_width: must be \[lo, hi\]"),
        ("augment.border_erase_width=[0.1, 0.5]", r"\[augment\] border_erase_width: must be \[lo, hi\]"),
        ("augment.border_erase_width=[0.1]", r"\[augment\] border_erase_width: must be \[lo, hi\]"),
        ("augment.border_erase_fill=blur", r"\[augment\] border_erase_fill: 'blur' is not one of"),
    ],
)
def test_bad_values_are_errors_naming_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


# ------------------------------------------------------------------------------------------- meta.json


def test_meta_records_the_focus_and_old_models_read_as_off() -> None:
    meta = model_meta("seed_cnn", 1, CLASSES, 128, {"epoch": 1}, lung_focus="mask")
    assert meta["preprocess"] == {"lung_focus": "mask"}
    assert ModelMeta.from_dict(meta, "meta.json").lung_focus == "mask"
    del meta["preprocess"]  # a model trained before the key existed
    assert ModelMeta.from_dict(meta, "meta.json").lung_focus == "off"


@pytest.mark.parametrize("bad", ["lungs", 1, None])
def test_meta_with_an_unknown_focus_is_refused(bad) -> None:
    meta = model_meta("seed_cnn", 1, CLASSES, 128, {"epoch": 1})
    meta["preprocess"]["lung_focus"] = bad
    with pytest.raises(
        ModelDirError, match="meta.json: preprocess.lung_focus must be one of off, mask, crop"
    ):
        ModelMeta.from_dict(meta, "x/meta.json")


# ---------------------------------------------------------------------------------- border erasing


ON = AugmentConfig(border_erase=1.0, border_erase_width=(0.08, 0.16))


def _images(n: int = 16, size: int = 64) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )


@pytest.mark.parametrize("base", [AugmentConfig(), AugmentConfig(rotation_degrees=0.0, hflip_prob=0.0)])
def test_border_erase_off_is_bit_identical_and_draws_nothing(base: AugmentConfig) -> None:
    """Off (probability 0), the other border keys change nothing, and the generator is left exactly where
    the augmentation without border erasing leaves it: no extra draw shifts a later one."""
    x = _images()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    off = dataclasses.replace(
        base, border_erase=0.0, border_erase_width=(0.3, 0.4), border_erase_fill="noise"
    )
    a = train_transform(x, base, g1, in_chans=3)
    b = train_transform(x, off, g2, in_chans=3)
    assert torch.equal(a, b)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("fill", ["flat", "noise"])
def test_border_erase_changes_only_the_frame(fill: str) -> None:
    x = _images(32)
    cfg = dataclasses.replace(ON, border_erase_fill=fill)
    plain = augment(x, AugmentConfig(), torch.Generator().manual_seed(5))
    erased = augment(x, cfg, torch.Generator().manual_seed(5))
    dist = edge_distance(64, 64).expand_as(x)
    # Beyond the widest frame: untouched, bit for bit (the other augmentations drew the same parameters).
    assert torch.equal(erased[dist > 0.16], plain[dist > 0.16])
    # Within the narrowest: erased in every sample (probability 1).
    frame = erased[dist <= 0.08]
    if fill == "flat":
        assert torch.all(frame == FILL / 255)
    else:
        assert frame.std() > 0.2 and not torch.equal(frame, plain[dist <= 0.08])
    # Each sample's width is its own, drawn in [0.08, 0.16]: not all the same.
    changed = (erased != plain) & (dist > 0.08) & (dist <= 0.16)
    per_sample = changed.flatten(1).sum(1)
    assert len(set(per_sample.tolist())) > 3


def test_border_erase_probability_is_per_sample() -> None:
    x = _images(400, 32)
    cfg = dataclasses.replace(ON, border_erase=0.3)
    plain = augment(x, AugmentConfig(), torch.Generator().manual_seed(1))
    erased = augment(x, cfg, torch.Generator().manual_seed(1))
    hit = (erased != plain).flatten(1).any(1).float().mean().item()
    assert abs(hit - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 400)


def test_border_erase_is_training_only() -> None:
    """Disabled augmentation (and therefore evaluation, which never augments) never erases the border."""
    x = _images()
    cfg = dataclasses.replace(ON, enabled=False)
    assert torch.equal(train_transform(x, cfg, torch.Generator(), 1), eval_transform(x, 1))


# ------------------------------------------------------------------- every path applies the same focus


def save_model(run: Path, lung_focus: str, size: int = 128) -> Path:
    """A seed_cnn run's best/ (untrained, random BatchNorm statistics so outputs vary) with `lung_focus`."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="seed_cnn", in_chans=1), len(CLASSES))
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
    meta = model_meta("seed_cnn", 1, CLASSES, size, {"epoch": 1}, lung_focus=lung_focus)
    meta["provenance"] = {"cxrdist_version": cxrdist.__version__, "git_commit": "test"}
    export_model(model.state_dict(), meta, run / "best")
    return run


def reference_probs(run: Path, images: np.ndarray, lung_focus: str) -> np.ndarray:
    model, meta = load_trained_model(run, torch.device("cpu"))
    with torch.no_grad():
        x = eval_transform(focus(torch.from_numpy(images), lung_focus), meta.in_chans)
        return model(x).softmax(1).numpy()


def real_images(sample_dir: Path, size: int) -> np.ndarray:
    from shard_tools.images import load_gray

    files = [f for c in ("COVID", "Normal") for f in sorted((sample_dir / c).glob("*.png"))[:3]]
    return np.stack([load_gray(f, size) for f in files])[:, None]


@pytest.mark.parametrize("mode", ["mask", "crop"])
def test_predict_applies_the_recorded_focus(mode, real_sample_dir, tmp_path) -> None:
    from cxrdist.predict import load_classifier

    images = real_images(real_sample_dir, 128)
    run = save_model(tmp_path / "run", mode)
    got = load_classifier(str(run), "cpu", use_temperature=True).probs(images)
    np.testing.assert_allclose(got, reference_probs(run, images, mode), atol=1e-6)
    assert np.abs(got - reference_probs(run, images, "off")).max() > 1e-3  # focus matters here


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mask", "crop"])
def test_onnx_graph_applies_the_focus(mode, real_sample_dir, tmp_path) -> None:
    """The same probabilities from PyTorch (predict's path) and onnxruntime, with nothing but raw pixels
    fed to the graph; a float32-input export too."""
    from cxrdist.export import export_onnx
    from cxrdist.onnx_model import load_onnx
    from cxrdist.predict import load_classifier

    images = real_images(real_sample_dir, 128)
    run = save_model(tmp_path / "run", mode)
    expected = load_classifier(str(run), "cpu", use_temperature=True).probs(images)
    for dtype in ("uint8", "float32"):
        out = tmp_path / f"{dtype}.onnx"
        export_onnx(run, out, input_dtype=dtype)
        clf = load_onnx(out, threads=1)
        got = clf.predict(images if dtype == "uint8" else images.astype(np.float32))
        assert np.abs(got - expected).max() <= 1e-4
        assert clf.metadata["preprocess"]["lung_focus"] == mode
    assert np.abs(expected - reference_probs(run, images, "off")).max() > 1e-3


@pytest.mark.slow
def test_training_records_and_evaluate_applies_the_focus(cnn_shards, tmp_path) -> None:
    """A real run with lung_focus and border erasing on: meta.json records the focus, and evaluate's
    numbers (which apply it) are test_metrics.json's, and a by-hand scoring of the test split with the
    focus, and not without it."""
    from cxrdist.data import eval_batches, read_manifest
    from cxrdist.evaluate import ScoringSettings, evaluate_split

    run_dir = tmp_path / "run"
    sets = fast_overrides(run_dir, cnn_shards, 1, "model.name=seed_cnn", "data.lung_focus=crop")
    sets += ["--set", "augment.border_erase=0.5", "--set", "eval.gradcam_per_class=1"]
    res = run_module("cxrdist.train", "recipes/demo.toml", *sets)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((run_dir / "best" / "meta.json").read_text())
    assert meta["preprocess"] == {"lung_focus": "crop"}

    out = tmp_path / "eval.json"
    args = ("--shards", cnn_shards, "--out", out, "--num-workers", "1", "--bootstrap", "0")
    res = run_module("cxrdist.evaluate", run_dir, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    evaluated = json.loads(out.read_text())
    trained = json.loads((run_dir / "test_metrics.json").read_text())
    assert evaluated["loss"] == pytest.approx(trained["loss"], abs=1e-6)

    model, _meta = load_trained_model(run_dir, torch.device("cpu"))
    manifest = read_manifest(str(cnn_shards))
    settings = ScoringSettings(device=torch.device("cpu"), in_chans=1, num_workers=0, lung_focus="crop")
    scores = evaluate_split(model, manifest, "test", settings)
    keys, by_hand, plain = [], [], []
    with torch.no_grad():
        for images, _labels, batch_keys in eval_batches(
            manifest, "test", batch_size=64, rank=0, world_size=1, num_workers=0
        ):
            keys += batch_keys
            by_hand.append(model(eval_transform(focus(images, "crop"), 1)))
            plain.append(model(eval_transform(images, 1)))
    order = np.argsort(np.array(keys, dtype=object), kind="stable")
    assert tuple(keys[i] for i in order) == scores.keys
    np.testing.assert_allclose(scores.logits, torch.cat(by_hand).numpy()[order], atol=1e-5)
    assert np.abs(scores.logits - torch.cat(plain).numpy()[order]).max() > 1e-3
