"""cxrdist.plots: every plot writes a real PNG, atomically, with something drawn on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scoregen import CLASSES, fake_logits

from cxrdist.plots import (
    curves_figure,
    plot_confusion,
    plot_curves,
    plot_reliability,
    plot_roc,
    reliability_figure,
)
from cxrdist.stats.calibration import calibration_report, fit_temperature
from cxrdist.stats.operating_points import roc_curves


@pytest.fixture(scope="module")
def model_outputs():
    return fake_logits(400, 0, scale=3)  # over-confident on purpose


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


# ------------------------------------------------------------- what a reader sees (issue 21, item 7)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_curves_keep_equal_lines_apart_and_legends_off_the_data():
    # A balanced validation split: accuracy and balanced accuracy are the same numbers.
    val = [
        {"loss": 1.2 / e, "accuracy": e / 8, "balanced_accuracy": e / 8, "macro_f1": e / 9}
        for e in range(1, 6)
    ]
    rows = [{"epoch": e, "train_loss": 1 / e, "val": v} for e, v in enumerate(val, start=1)]
    fig = curves_figure(rows)
    fig.canvas.draw()
    ax_loss, ax_acc = fig.axes
    lines = {line.get_label(): line for line in ax_acc.get_lines()}
    acc, bal = lines["val accuracy"], lines["val balanced accuracy"]
    assert list(acc.get_ydata()) == list(bal.get_ydata())
    assert (acc.get_linestyle(), acc.get_marker()) != (bal.get_linestyle(), bal.get_marker())
    assert bal.get_markerfacecolor() == "white"  # the line underneath shows through its markers
    renderer = fig.canvas.get_renderer()
    for ax in (ax_loss, ax_acc):
        assert not _overlaps(ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer))


def test_reliability_legend_covers_no_bar(model_outputs):
    logits, labels = model_outputs
    report = calibration_report(logits, labels, temperature=fit_temperature(logits, labels))
    fig = reliability_figure(report["before"]["bins"], "test", bins_after=report["after"]["bins"])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    assert not _overlaps(legend, ax.get_window_extent(renderer))
    assert len(ax.get_legend().get_texts()) == 3  # diagonal, before, after


def test_gradcam_grid_is_large_enough_to_read_and_marks_wrong_predictions():
    from cxrdist.explain import GRID_TILE_PX, _fit, grid_image, overlay

    gray = np.full((64, 64), 100, np.uint8)
    cam = np.zeros((64, 64), np.float32)
    rows = [(name, [(overlay(gray, cam), name)] * 4) for name in CLASSES]
    rows[3] = (CLASSES[3], [(overlay(gray, cam), CLASSES[3])] * 3 + [(overlay(gray, cam), "Normal")])
    grid = grid_image(rows)
    assert grid.width >= 4 * GRID_TILE_PX >= 880 and grid.height >= 4 * GRID_TILE_PX  # was 512 x 512
    pixels = np.asarray(grid).astype(int)
    red = (pixels[..., 0] > 120) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    ys, xs = np.nonzero(red)
    assert len(ys) > 20  # "model: Normal" under the last image of the last row only
    assert xs.min() > 3 * GRID_TILE_PX and ys.min() > 3 * GRID_TILE_PX
    # Names are whole, cut with an ellipsis only when wider than a tile.
    from PIL import ImageFont

    font = ImageFont.load_default(size=15)
    assert _fit("true: Viral Pneumonia", font, GRID_TILE_PX) == "true: Viral Pneumonia"
    cut = _fit("true: " + "Very long class name " * 4, font, GRID_TILE_PX)
    assert cut.endswith("…") and font.getlength(cut) <= GRID_TILE_PX
    empty = grid_image([("COVID", [(overlay(gray, cam), "COVID")])] + [("Normal", [])])
    assert empty.size[1] > 2 * GRID_TILE_PX  # a class without images keeps its row
