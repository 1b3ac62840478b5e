"""Lung masks: synth draws them and plants shortcuts; pack stores them in the shards; verify checks them."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shard_tools.cli import run_main
from shard_tools.pack import main as pack_main
from shard_tools.pack import pack, write_shard
from shard_tools.schema import (
    CLASSES,
    MANIFEST_NAME,
    MASK_EXT,
    SPLITS,
    ManifestError,
    has_masks,
    validate_manifest,
)
from shard_tools.synth import generate, image_path, main, mask_path, shortcut_box
from shard_tools.verify import verify

from shardgen import _png, write_shards

OPTS = {"size": 32, "min_shards": 1, "split": (1.0, 0.0, 0.0), "progress": False, "workers": 1}


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


# ------------------------------------------------------------------------------------------------- pack


def _members(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every shard of OUT."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    found: dict[str, dict[str, bytes]] = {}
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            with tarfile.open(out / shard["file"]) as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    found.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return found


def _png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "L"
        return np.asarray(im)


def _zip_folder(folder: Path, archive: Path, prefix: str = "COVID-19_Radiography_Dataset/") -> Path:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return archive


def _copy(synth_masked: Path, root: Path) -> Path:
    shutil.copytree(synth_masked, root)
    return root


def test_pack_stores_resized_binary_masks_from_a_folder_and_the_zip_alike(synth_masked, tmp_path):
    src = _copy(synth_masked, tmp_path / "db")
    # A database mask is 256 px while its image is 299: here 64 px beside 96 px images, with a grey rim.
    lung = _gray(mask_path(src, "Normal", 1))
    small = np.asarray(Image.fromarray(lung).resize((64, 64), Image.Resampling.BILINEAR))
    assert set(np.unique(small)) - {0, 255}  # not binary: pack must binarise it
    Image.fromarray(small).save(mask_path(src, "Normal", 1))
    manifest = pack(src, tmp_path / "out", **OPTS)
    assert manifest["masks"] is True and verify(tmp_path / "out", workers=1) == []
    samples = _members(tmp_path / "out")
    assert len(samples) == 16
    for key, members in samples.items():
        assert set(members) == {"cls", "json", "png", MASK_EXT}
        image, mask = _png_array(members["png"]), _png_array(members[MASK_EXT])
        assert mask.shape == image.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
        meta = json.loads(members["json"])
        source = _gray(src / meta["path"].replace("/images/", "/masks/"))
        want = np.asarray(Image.fromarray(source).resize((32, 32), Image.Resampling.NEAREST)) >= 128
        assert np.array_equal(mask == 255, want), key
    # The zip the database comes in gives the same bytes.
    archive = _zip_folder(src, tmp_path / "db.zip")
    pack(archive, tmp_path / "from_zip", **OPTS)
    for name in [p.name for p in (tmp_path / "out").glob("*.tar")]:
        assert (tmp_path / "from_zip" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_no_masks_and_inputs_without_masks_record_false(synth_masked, tmp_path):
    src = _copy(synth_masked, tmp_path / "db")
    with_masks = pack(src, tmp_path / "a", **OPTS)
    without = pack(src, tmp_path / "b", masks=False, **OPTS)
    assert with_masks["masks"] is True and without["masks"] is False
    assert "--no-masks" in without["command"]
    assert all(MASK_EXT not in m for m in _members(tmp_path / "b").values())
    assert verify(tmp_path / "b", workers=1) == []
    # The images, labels and splits are the same either way: masks only add a member.
    a, b = _members(tmp_path / "a"), _members(tmp_path / "b")
    assert {k: (m["png"], m["json"]) for k, m in a.items()} == {
        k: (m["png"], m["json"]) for k, m in b.items()
    }
    for c in CLASSES:
        shutil.rmtree(src / c / "masks")
    assert pack(src, tmp_path / "c", **OPTS)["masks"] is False


def test_some_images_without_a_mask_store_none_and_say_how_many(synth_masked, tmp_path, capsys):
    src = _copy(synth_masked, tmp_path / "db")
    mask_path(src, "COVID", 2).unlink()
    mask_path(src, "Normal", 3).unlink()
    capsys.readouterr()
    manifest = pack(src, tmp_path / "out", **OPTS)
    err = " ".join(capsys.readouterr().err.split())
    assert manifest["masks"] is False and all(MASK_EXT not in m for m in _members(tmp_path / "out").values())
    assert "lung masks not stored: 2 of 16 images" in err and "COVID/images/COVID-2.png" in err


@pytest.mark.parametrize("problem", ["orphan", "aspect"])
def test_a_mask_without_its_image_or_of_another_shape_is_one_line_and_exit_2(
    synth_masked, tmp_path, capsys, problem
):
    src = _copy(synth_masked, tmp_path / "db")
    if problem == "orphan":
        image_path(src, "Lung_Opacity", 4).unlink()
        named = "Lung_Opacity/masks/Lung_Opacity-4.png"
    else:
        Image.fromarray(np.zeros((96, 40), np.uint8)).save(mask_path(src, "Normal", 2))
        named = "Normal/masks/Normal-2.png is 40x96, but its image Normal/images/Normal-2.png is 96x96"
    capsys.readouterr()
    argv = [str(src), str(tmp_path / "out"), "--size", "32", "--min-shards", "1", "--no-progress"]
    assert run_main(pack_main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and named in err and "--no-masks" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # nothing half-written
    assert run_main(pack_main, [*argv, "--no-masks"]) == 0


def test_an_unreadable_mask_skips_its_image_like_an_unreadable_image(synth_masked, tmp_path, capsys):
    src = _copy(synth_masked, tmp_path / "db")
    mask_path(src, "COVID", 3).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    opts = ["--size", "32", "--min-shards", "1", "--no-progress"]
    code = run_main(pack_main, [str(src), str(tmp_path / "out"), *opts])  # 1 of 16: over --max-skipped 1%
    assert "COVID/images/COVID-3.png: its lung mask COVID/masks/COVID-3.png" in capsys.readouterr().err
    # The same exit code and line as an unreadable image gives.
    other = _copy(synth_masked, tmp_path / "db2")
    image_path(other, "COVID", 3).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert code != 0 and run_main(pack_main, [str(other), str(tmp_path / "out"), *opts]) == code
    assert "COVID/images/COVID-3.png: " in capsys.readouterr().err
    manifest = pack(src, tmp_path / "out", max_skipped=0.1, **OPTS)
    assert manifest["masks"] is True and manifest["splits"]["train"]["count"] == 15
    assert [s["path"] for s in manifest["skipped"]] == ["COVID/images/COVID-3.png"]
    assert "lung mask COVID/masks/COVID-3.png" in manifest["skipped"][0]["reason"]


# ----------------------------------------------------------------------------------------------- verify


def _rewrite_member(out: Path, edit) -> str:
    """Rewrite train-000000.tar with `edit(name, data)` -> data or None (drop); return the first key."""
    shard = out / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    first = members[0][0].split(".", 1)[0]
    edited = [(n, edit(n, d) if n.startswith(first + ".") else d) for n, d in members]
    write_shard(shard, [(n, d) for n, d in edited if d is not None])
    return first


@pytest.mark.parametrize("damage", ["missing", "wrong-size", "grey", "not-png"])
def test_verify_catches_a_bad_mask(synth_masked, tmp_path, damage):
    out = tmp_path / "out"
    pack(synth_masked, out, **OPTS)
    replacement = {
        "missing": None,
        "wrong-size": _png(np.zeros((16, 16), np.uint8)),
        "grey": _png(np.full((32, 32), 128, np.uint8)),
        "not-png": b"garbage",
    }[damage]
    key = _rewrite_member(out, lambda n, d: replacement if n.endswith("." + MASK_EXT) else d)
    problems = [p for p in verify(out, workers=1) if "sha256" not in p and "bytes, manifest" not in p]
    expected = {
        "missing": "no lung mask (.mask.png), but the manifest says masks: true",
        "wrong-size": "lung mask is 16x16, the image is 32x32",
        "grey": "lung mask has values other than 0 and 255",
        "not-png": "lung mask does not decode",
    }[damage]
    assert len(problems) == 1 and f"train-000000.tar: sample {key}: {expected}" in problems[0], problems


def test_verify_refuses_a_mask_the_manifest_does_not_announce(synth_masked, tmp_path):
    out = tmp_path / "out"
    pack(synth_masked, out, masks=False, **OPTS)
    key = _rewrite_member(out, lambda n, d: d)
    with tarfile.open(out / "train-000000.tar") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    members.insert(2, (f"{key}.{MASK_EXT}", _png(np.zeros((32, 32), np.uint8))))
    write_shard(out / "train-000000.tar", members)
    problems = verify(out, workers=1)
    assert any(f"sample {key}: has a lung mask" in p for p in problems), problems


def test_manifest_masks_must_be_a_boolean(synth_masked, tmp_path):
    out = tmp_path / "out"
    manifest = pack(synth_masked, out, **OPTS)
    validate_manifest(json.loads(json.dumps(manifest)), "m")
    with pytest.raises(ManifestError, match="masks must be true or false"):
        validate_manifest({**manifest, "masks": "yes"}, "m")
    old = {k: v for k, v in manifest.items() if k != "masks"}
    assert validate_manifest(old, "m") is old and has_masks(old) is False


# ---------------------------------------------------------------------------------------------- loaders


def test_old_shards_without_masks_and_new_ones_with_them_load_alike(synth_masked, tmp_path):
    from cxrdist.data import eval_batches, read_manifest

    write_shards(tmp_path / "old", {"train": [3, 2]}, image_size=8)
    assert "masks" not in json.loads((tmp_path / "old" / MANIFEST_NAME).read_text())
    old = read_manifest(str(tmp_path / "old"))
    assert has_masks(old.data) is False
    batches = list(eval_batches(old, "train", batch_size=4, rank=0, world_size=1, num_workers=0))
    assert sum(len(b[1]) for b in batches) == 5

    pack(synth_masked, tmp_path / "new", **OPTS)
    new = read_manifest(str(tmp_path / "new"))
    assert has_masks(new.data) is True
    batches = list(eval_batches(new, "train", batch_size=8, rank=0, world_size=1, num_workers=0))
    images = torch.cat([b[0] for b in batches])
    assert images.shape == (16, 1, 32, 32) and images.dtype == torch.uint8


def test_verify_cli_says_it_checked_the_masks(synth_masked, tmp_path, capsys):
    from shard_tools.verify import main as verify_main

    pack(synth_masked, tmp_path / "a", **OPTS)
    pack(synth_masked, tmp_path / "b", masks=False, **OPTS)
    capsys.readouterr()
    assert run_main(verify_main, [str(tmp_path / "a"), "--workers", "1"]) == 0
    assert "every image and lung mask decoded" in " ".join(capsys.readouterr().out.split())
    assert run_main(verify_main, [str(tmp_path / "b"), "--workers", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "every image decoded" in out and "lung mask" not in out


def test_the_mask_of_a_skipped_file_is_no_orphan(synth_masked, tmp_path):
    src = _copy(synth_masked, tmp_path / "db")
    # An image file pack skips (here: not named like an image) still has its mask: no orphan, no error.
    image_path(src, "Normal", 4).rename(src / "Normal" / "images" / "Normal-4.txt")
    manifest = pack(src, tmp_path / "out", max_skipped=0.1, **OPTS)
    assert manifest["masks"] is True and manifest["splits"]["train"]["count"] == 15
    assert [s["path"] for s in manifest["skipped"]] == ["Normal/images/Normal-4.txt"]


def test_flat_layout_and_original_size_keep_masks_at_the_image_size(synth_masked, tmp_path):
    # `<Class>/*.png` with `<Class>/masks/` beside them; masks at 128 px for 96 px images, kept at 96.
    src = tmp_path / "db"
    for c in CLASSES:
        (src / c / "masks").mkdir(parents=True)
        for i in range(1, 5):
            shutil.copy(image_path(synth_masked, c, i), src / c / f"{c}-{i}.png")
            big = Image.fromarray(_gray(mask_path(synth_masked, c, i))).resize(
                (128, 128), Image.Resampling.NEAREST
            )
            big.save(src / c / "masks" / f"{c}-{i}.png")
    manifest = pack(src, tmp_path / "out", **{**OPTS, "size": 0})
    assert manifest["masks"] is True and manifest["image_size"] == 96
    for members in _members(tmp_path / "out").values():
        meta = json.loads(members["json"])
        mask = _png_array(members[MASK_EXT])
        c, name = meta["path"].split("/")
        assert mask.shape == (96, 96)
        assert (mask == 255).mean() == pytest.approx(
            (_gray(src / c / "masks" / name) == 255).mean(), abs=0.02
        )
