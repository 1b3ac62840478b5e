"""Lung masks: synth draws them and plants shortcuts; pack stores them in the shards; verify checks them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from shard_tools.cli import run_main
from shard_tools.schema import CLASSES
from shard_tools.synth import generate, image_path, main, mask_path, shortcut_box


def _gray(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels within `width` of `mask` (4-neighbour steps) but not in it."""
    grown = mask.copy()
    for _ in range(width):
        g = grown.copy()
        g[1:] |= grown[:-1]
        g[:-1] |= grown[1:]
        g[:, 1:] |= grown[:, :-1]
        g[:, :-1] |= grown[:, 1:]
        grown = g
    return grown & ~mask


@pytest.fixture(scope="module")
def synth_masked(tmp_path_factory):
    out = tmp_path_factory.mktemp("masked") / "src"
    return generate(out, per_class=4, size=96, seed=5, workers=1, masks=True, shortcut="corner")


def test_synth_masks_sit_on_the_dark_lung_fields(synth_masked):
    for c in CLASSES:
        for i in range(1, 5):
            img, mask = _gray(image_path(synth_masked, c, i)), _gray(mask_path(synth_masked, c, i))
            assert mask.shape == img.shape == (96, 96)
            assert set(np.unique(mask)) == {0, 255}
            lung = mask == 255
            assert 0.08 < lung.mean() < 0.4
            # Air is dark: the lungs are clearly darker than the tissue and bone just around them.
            assert img[lung].mean() + 25 < img[_ring(lung, 3)].mean(), (c, i)
            # Two fields, left and right of the midline.
            assert lung[:, :40].any() and lung[:, 56:].any() and not lung[:, 47:49].all()


def test_masks_and_shortcut_leave_the_clean_images_as_they_were(synth_masked, tmp_path):
    plain = generate(tmp_path / "plain", per_class=4, size=96, seed=5, workers=2)
    assert not (plain / "Normal" / "masks").exists()  # masks are opt-in: the default layout is unchanged
    for c in CLASSES:
        for i in range(1, 5):
            a, b = _gray(image_path(plain, c, i)), _gray(image_path(synth_masked, c, i))
            x0, y0, x1, y1 = shortcut_box(CLASSES.index(c), 96)
            outside = np.ones_like(a, dtype=bool)
            outside[y0:y1, x0:x1] = False
            assert np.array_equal(a[outside], b[outside])  # the planted square is the only change


def test_corner_shortcut_is_class_dependent_outside_the_lungs_and_in_the_border(synth_masked):
    border = round(0.12 * 96)
    for c in CLASSES:
        label = CLASSES.index(c)
        x0, y0, x1, y1 = shortcut_box(label, 96)
        assert y1 <= border and x1 <= 96 // 2  # seen by a border-only view and by the study CNN
        for i in range(1, 5):
            img, lung = _gray(image_path(synth_masked, c, i)), _gray(mask_path(synth_masked, c, i)) == 255
            assert not lung[y0:y1, x0:x1].any()
            # A one-line detector reads the class off the frame: the one box that is entirely white.
            means = [img[b[1] : b[3], b[0] : b[2]].mean() for b in (shortcut_box(k, 96) for k in range(4))]
            assert int(np.argmax(means)) == label and means[label] == 255
            assert sorted(means)[-2] < 255


def test_synth_cli_masks_and_bad_shortcut(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(main, [str(out), "--per-class", "1", "--size", "64", "--masks", "--workers", "1"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(
        f"{c}/{sub}/{c}-1.png" for c in CLASSES for sub in ("images", "masks")
    )
    # An earlier output with masks is synth's own: --force may replace it.
    assert run_main(main, [str(out), "--per-class", "1", "--size", "64", "--force", "--workers", "1"]) == 0
    assert not (out / "COVID" / "masks").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "x"), "--shortcut", "everywhere"])
    assert e.value.code == 2
    with pytest.raises(Exception, match="--shortcut must be one of none, corner"):
        generate(tmp_path / "y", per_class=1, size=64, shortcut="everywhere")
