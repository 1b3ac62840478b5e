"""cxrdist.plots: every plot writes a real PNG, atomically, with something drawn on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrdist.calibration import calibration_report, fit_temperature
from cxrdist.operating_points import roc_curves
from cxrdist.plots import plot_confusion, plot_curves, plot_reliability, plot_roc

CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
K = len(CLASSES)


@pytest.fixture(scope="module")
def model_outputs():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, K, 400)
    logits = 3 * (rng.normal(size=(400, K)) + 1.5 * np.eye(K)[labels])  # over-confident on purpose
    return logits, labels


def check_png(path: Path, returned: Path, min_px: int = 300) -> np.ndarray:
    """The PNG is where it was asked to be, alone (no temporary files left), decodes and is not blank."""
    assert returned == path and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    with Image.open(path) as im:
        assert im.format == "PNG"
        width, height = im.size
        pixels = np.asarray(im.convert("RGB"))
    assert min_px <= width <= 3000 and min_px <= height <= 3000, im.size
    rgb = pixels.astype(np.int32)
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert len(colours) > 20  # lines, text, fills: not a blank canvas
    ink = (pixels.min(2) < 200).mean()  # share of clearly non-white pixels
    assert 0.005 < ink < 0.9, ink
    return pixels


def test_plot_roc_with_an_absent_class(tmp_path, model_outputs):
    logits, labels = model_outputs
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.where(labels == 3, 0, labels)  # Viral Pneumonia absent: no curve
    curves = roc_curves(probs, labels, CLASSES)
    assert curves["Viral Pneumonia"] is None
    path = tmp_path / "roc" / "roc_test.png"
    check_png(path, plot_roc(curves, path, title="test split"))


def test_plot_reliability_before_and_after(tmp_path, model_outputs):
    logits, labels = model_outputs
    report = calibration_report(logits, labels, temperature=fit_temperature(logits, labels))
    one = tmp_path / "one" / "reliability.png"
    both = tmp_path / "both" / "reliability.png"
    alone = check_png(one, plot_reliability(report["before"]["bins"], one, title="test"))
    beside = check_png(
        both, plot_reliability(report["before"]["bins"], both, "test", bins_after=report["after"]["bins"])
    )

    # The second set of bars is drawn in its own colour (matplotlib's C1, orange).
    def orange(px: np.ndarray) -> int:
        r, g, b = (px[..., i].astype(int) for i in range(3))
        return int(((r > 200) & (g > 100) & (g < 180) & (b < 100)).sum())

    assert orange(alone) == 0 and orange(beside) > 1000


def test_plot_confusion_and_curves(tmp_path):
    cm = [[50, 3, 1, 0], [4, 40, 6, 0], [2, 5, 43, 0], [0, 0, 0, 0]]  # an empty class row stays finite
    path = tmp_path / "cm" / "confusion_test.png"
    check_png(path, plot_confusion(cm, CLASSES, path))
    rows = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val": {
                "loss": 1.2 / e,
                "accuracy": 0.5 + e / 20,
                "balanced_accuracy": 0.5 + e / 21,
                "macro_f1": 0.5 + e / 22,
            },
        }
        for e in range(1, 6)
    ]
    path = tmp_path / "curves" / "curves.png"
    check_png(path, plot_curves(rows, path))
    empty = tmp_path / "empty" / "curves.png"  # no finished epoch still writes a figure
    check_png(empty, plot_curves([], empty))


def test_a_plot_replaces_an_older_file(tmp_path, model_outputs):
    logits, labels = model_outputs
    path = tmp_path / "reliability.png"
    path.write_bytes(b"old")
    plot_reliability(calibration_report(logits, labels)["before"]["bins"], path)
    with Image.open(path) as im:
        assert im.format == "PNG"
