"""shard_tools.pack and shard_tools.images: real folders in, real shards out, read back with webdataset."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import SHARDS_MIN_SHARDS, SHARDS_SIZE_PX, SYNTH_PER_CLASS
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from shard_tools import images
from shard_tools import write as shard_writer
from shard_tools.cli import run_main
from shard_tools.errors import InputError
from shard_tools.pack import PackError, TooManySkipped, main, pack, shard_counts
from shard_tools.schema import CLASSES, MANIFEST_NAME, SPLITS
from shard_tools.shards import tar_bytes
from shard_tools.sources import assign_keys
from shard_tools.splits import split_sizes
from shard_tools.verify import verify

# The study's split of the full database (train, val, test) and the class totals it came from.
STUDY_TABLE = {
    "Normal": (10192, (7134, 1529, 1529)),
    "COVID": (3616, (2532, 542, 542)),
    "Viral Pneumonia": (1345, (941, 202, 202)),
    "Lung_Opacity": (6012, (4210, 901, 901)),
}


def _png(pixels: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    im = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _leftovers(parent: Path, name: str) -> list[str]:
    """Anything pack may have left beside OUT: OUT itself or its temporary folders."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def _small_src(root: Path, synth_src: Path, per_class: int = 4, classes=CLASSES) -> Path:
    """Copy `per_class` synthetic images of each class into a new database folder (newer layout)."""
    for c in classes:
        (root / c / "images").mkdir(parents=True)
        for i in range(1, per_class + 1):
            shutil.copy(synth_src / c / "images" / f"{c}-{i}.png", root / c / "images")
    return root


# ----------------------------------------------------------------------------------------- split sizes


def test_split_sizes_within_one_image_of_the_study_table():
    ours = {c: split_sizes(n) for c, (n, _) in STUDY_TABLE.items()}
    for c, (n, study) in STUDY_TABLE.items():
        assert sum(ours[c]) == n
        assert all(abs(a - b) <= 1 for a, b in zip(ours[c], study)), (c, ours[c], study)
    # The rule (boundaries rounded up) exactly, so a change to it is deliberate:
    assert ours == {
        "Normal": (7135, 1529, 1528),
        "COVID": (2532, 542, 542),
        "Viral Pneumonia": (942, 202, 201),
        "Lung_Opacity": (4209, 902, 901),
    }
    assert split_sizes(400) == (280, 60, 60)  # the real sample's classes
    assert split_sizes(40) == (28, 6, 6)
    assert split_sizes(20) == (14, 3, 3)  # 0.7 * 20 is 14.000000000000002 in floating point
    assert split_sizes(1) == (1, 0, 0)
    assert split_sizes(0) == (0, 0, 0)


@given(n=st.integers(0, 50_000), train=st.integers(1, 98), val=st.integers(0, 50))
def test_split_sizes_sum_to_n_and_stay_within_one_of_the_fractions(n, train, val):
    val = min(val, 100 - train)
    fractions = (train / 100, val / 100, (100 - train - val) / 100)
    sizes = split_sizes(n, fractions)
    assert sum(sizes) == n and min(sizes) >= 0
    assert all(abs(s - f * n) < 1 + 1e-9 for s, f in zip(sizes, fractions))


def test_shard_counts_balance_and_respect_both_caps():
    assert shard_counts([1000] * 100, shard_size=30, max_shard_bytes=10**9, min_shards=1) == [25] * 4
    assert shard_counts([1000] * 10, shard_size=1000, max_shard_bytes=10**9, min_shards=16) == [1] * 10
    counts = shard_counts([1000] * 100, shard_size=1000, max_shard_bytes=20_480, min_shards=1)
    assert max(counts) - min(counts) <= 1 and sum(counts) == 100
    starts = np.cumsum([0, *counts])
    assert all(tar_bytes([1000] * (b - a)) <= 20_480 for a, b in itertools.pairwise(starts))
    assert shard_counts([], 10, 10**9, 16) == []


def test_keys_are_unique_stable_and_dot_free():
    items = [
        ("COVID", "a.png"),
        ("COVID", "a.jpg"),
        ("COVID", "A.png"),
        ("COVID", "b c.png"),
        ("Normal", "a.png"),
    ]
    keys = assign_keys(items)
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k for k in keys)
    assert keys == assign_keys(items)
    assert keys[3] == "covid__b_c" and keys[4] == "normal__a"
    assert set(keys[:3]) == {"covid__a-jpg", "covid__a-png", "covid__a-png-2"}


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_synth_pack_verify_webdataset(synth_shards: Path):
    manifest = json.loads((synth_shards / MANIFEST_NAME).read_text())
    assert manifest["classes"] == list(CLASSES)
    assert manifest["image_size"] == SHARDS_SIZE_PX
    assert manifest["format_version"] == 1 and manifest["skipped"] == [] and manifest["duplicates"] == []
    assert verify(synth_shards) == []

    keys = set()
    for split in SPLITS:
        entry = manifest["splits"][split]
        urls = [str(synth_shards / s["file"]) for s in entry["shards"]]
        ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("l8")
        per_class = Counter()
        for sample in ds:
            img, label, meta = sample["png"], sample["cls"], sample["json"]
            assert img.dtype == np.uint8 and img.shape == (SHARDS_SIZE_PX, SHARDS_SIZE_PX)
            assert meta["class"] == CLASSES[label]
            assert meta["orig_size"] == [299, 299]
            assert meta["pixel_sha256"] == images.pixel_sha256(img)
            assert sample["__key__"].startswith(re.sub(r"\W", "_", CLASSES[label].lower()) + "__")
            assert "." not in sample["__key__"] and sample["__key__"] not in keys
            keys.add(sample["__key__"])
            per_class[meta["class"]] += 1
        assert per_class == Counter({c: n for c, n in entry["class_counts"].items() if n})
        assert sum(per_class.values()) == entry["count"]
        assert entry["class_counts"] == dict.fromkeys(
            CLASSES, split_sizes(SYNTH_PER_CLASS)[SPLITS.index(split)]
        )
    assert len(keys) == SYNTH_PER_CLASS * len(CLASSES)


def test_shards_are_named_balanced_and_mix_classes(synth_shards: Path):
    manifest = json.loads((synth_shards / MANIFEST_NAME).read_text())
    train = manifest["splits"]["train"]["shards"]
    assert [s["file"] for s in train] == [f"train-{i:06d}.tar" for i in range(SHARDS_MIN_SHARDS)]
    for split in SPLITS:
        counts = [s["count"] for s in manifest["splits"][split]["shards"]]
        assert max(counts) - min(counts) <= 1
    for s in train:
        with tarfile.open(synth_shards / s["file"]) as tar:
            members = tar.getmembers()
        # No timestamps or owners: the bytes depend on the content only.
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
            (0, 0, 0, "", "", 0o444)
        }
        classes = {m.name.split("__")[0] for m in members}
        assert len(classes) >= 3, f"{s['file']} holds only {classes}"
        assert (synth_shards / s["file"]).stat().st_size == s["bytes"]


def test_pack_is_deterministic_across_runs_outs_and_workers(
    synth_src: Path, synth_shards: Path, tmp_path: Path
):
    def shards(m):
        return [
            (s["file"], s["sha256"], s["bytes"]) for split in SPLITS for s in m["splits"][split]["shards"]
        ]

    opts = {"size": SHARDS_SIZE_PX, "min_shards": SHARDS_MIN_SHARDS, "progress": False, "force": True}
    reference = json.loads((synth_shards / MANIFEST_NAME).read_text())
    a = pack(synth_src, tmp_path / "a", workers=1, **opts)
    # Another OUT and another worker count: the same shard bytes.
    assert shards(a) == shards(reference)
    for s in a["splits"]["train"]["shards"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (synth_shards / s["file"]).read_bytes()
    # The same paths and options again: a byte-identical manifest too.
    first = (tmp_path / "a" / MANIFEST_NAME).read_bytes()
    pack(synth_src, tmp_path / "a", workers=1, **opts)
    assert (tmp_path / "a" / MANIFEST_NAME).read_bytes() == first
    # Another seed splits differently.
    b = pack(synth_src, tmp_path / "b", seed=1, **opts)
    assert shards(b) != shards(reference)


def test_both_layouts_and_loose_folder_names_give_the_same_samples(synth_src: Path, tmp_path: Path):
    newer = _small_src(tmp_path / "newer", synth_src)
    (newer / "COVID" / "masks").mkdir()  # the database's masks sit beside images/ and are ignored
    (newer / "COVID" / "masks" / "COVID-1.png").write_bytes(b"not read")
    flat = tmp_path / "flat"
    for c, folder in zip(CLASSES, ("covid", "LUNG OPACITY", "Normal", "viral_pneumonia")):
        shutil.copytree(newer / c / "images", flat / folder)
    opts = {"size": 32, "min_shards": 2, "progress": False}
    m_newer = pack(newer, tmp_path / "out-newer", **opts)
    m_flat = pack(flat, tmp_path / "out-flat", **opts)
    assert m_newer["skipped"] == [] and m_flat["skipped"] == []

    def samples(out: Path) -> dict[str, tuple[int, str, str]]:
        ds = wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False).decode()
        return {s["__key__"]: (s["cls"], s["json"]["pixel_sha256"], s["json"]["path"]) for s in ds}

    a, b = samples(tmp_path / "out-newer"), samples(tmp_path / "out-flat")
    assert a.keys() == b.keys() and len(a) == 16
    assert [v[:2] for v in a.values()] == [v[:2] for v in b.values()]
    assert a["viral_pneumonia__viral_pneumonia-1"][2] == "Viral Pneumonia/images/Viral Pneumonia-1.png"
    assert b["viral_pneumonia__viral_pneumonia-1"][2] == "viral_pneumonia/Viral Pneumonia-1.png"
    for m in (m_newer, m_flat):
        assert {s: m["splits"][s]["count"] for s in SPLITS} == {"train": 12, "val": 4, "test": 0}
    # The flat layout is deterministic too.
    again = pack(flat, tmp_path / "out-flat-2", **opts)
    assert again["splits"] == m_flat["splits"]


def test_jpeg_and_rgb_inputs_are_stored_as_gray(tmp_path: Path):
    src = tmp_path / "src"
    (src / "COVID").mkdir(parents=True)
    (src / "Normal").mkdir()
    gray = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (50, 1))
    (src / "COVID" / "a.png").write_bytes(_png(np.stack([gray] * 3, -1)))  # RGB-saved gray, like the sample
    (src / "COVID" / "b.JPG").write_bytes(_png(gray, fmt="JPEG"))
    (src / "Normal" / "c.jpeg").write_bytes(_png(gray, mode="RGB", fmt="JPEG"))
    m = pack(src, tmp_path / "out", size=0, min_shards=1, progress=False, classes=["COVID", "Normal"])
    assert m["image_size"] == 50 and m["classes"] == ["COVID", "Normal"] and m["skipped"] == []
    ds = wds.WebDataset(sorted(str(p) for p in (tmp_path / "out").glob("*.tar")), shardshuffle=False)
    got = {s["__key__"]: s for s in ds.decode("l8")}
    assert set(got) == {"covid__a", "covid__b", "normal__c"}
    np.testing.assert_array_equal(got["covid__a"]["png"], gray)  # R = G = B: the gray values exactly
    assert np.abs(got["covid__b"]["png"].astype(int) - gray).max() <= 8  # JPEG is lossy on the way in


def test_real_sample_packs_with_missing_class_warning(real_sample_dir: Path, tmp_path: Path, capsys):
    m = pack(real_sample_dir, tmp_path / "out", size=64, min_shards=4, progress=False)
    err = capsys.readouterr().err
    assert "no folder for class 'Lung_Opacity'" in err and "no folder for class 'Viral Pneumonia'" in err
    assert m["classes"] == list(CLASSES) and m["image_size"] == 64 and m["skipped"] == []
    want = {
        "COVID": (280, 60, 60),
        "Lung_Opacity": (0, 0, 0),
        "Normal": (280, 60, 60),
        "Viral Pneumonia": (0, 0, 0),
    }
    for i, split in enumerate(SPLITS):
        assert m["splits"][split]["class_counts"] == {c: n[i] for c, n in want.items()}
    assert len(m["splits"]["train"]["shards"]) == 4
    # The sample holds duplicates; each group stays in one split and is reported.
    for group in m["duplicates"]:
        assert len(group["paths"]) >= 2 and group["split"] in SPLITS
    assert verify(tmp_path / "out") == []


def test_identical_images_stay_in_one_split_or_are_dropped(synth_src: Path, tmp_path: Path):
    src = _small_src(tmp_path / "src", synth_src, per_class=10)
    covid = src / "COVID" / "images"
    for i in range(2, 6):  # COVID-1 five times over, and once more under Normal (a label conflict)
        shutil.copy(covid / "COVID-1.png", covid / f"copy-{i}.png")
    shutil.copy(covid / "COVID-1.png", src / "Normal" / "images" / "same-as-covid.png")
    for seed in range(4):
        m = pack(src, tmp_path / "out", size=32, min_shards=2, seed=seed, progress=False, force=True)
        (group,) = m["duplicates"]
        assert len(group["paths"]) == 6 and "Normal/images/same-as-covid.png" in group["paths"]
        split_of = {}
        for split in SPLITS:
            for s in m["splits"][split]["shards"]:
                with tarfile.open(tmp_path / "out" / s["file"]) as tar:
                    for member in tar:
                        if member.name.endswith(".json"):
                            split_of[json.load(tar.extractfile(member))["path"]] = split
        assert {split_of[p] for p in group["paths"]} == {group["split"]}
        assert sum(m["splits"][s]["count"] for s in SPLITS) == 45
    dropped = pack(
        src, tmp_path / "out", size=32, min_shards=2, duplicates="drop", progress=False, force=True
    )
    assert sum(dropped["splits"][s]["count"] for s in SPLITS) == 40
    assert len(dropped["duplicates"][0]["dropped"]) == 5


# ------------------------------------------------------------------------------------------- bad input


def _bad_src(tmp_path: Path, synth_src: Path) -> Path:
    """A small database with one bad file of each kind in COVID: 20 good images, 5 bad files."""
    src = _small_src(tmp_path / "src", synth_src, per_class=5)
    d = src / "COVID" / "images"
    good = (d / "COVID-1.png").read_bytes()
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "text.png").write_text("not an image")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (d / "notes.txt").write_text("not an image either")
    (d / ".DS_Store").write_bytes(b"hidden files are ignored")
    return src


def test_bad_files_are_skipped_with_reasons(synth_src: Path, tmp_path: Path):
    src = _bad_src(tmp_path, synth_src)
    m = pack(src, tmp_path / "out", size=32, min_shards=2, max_skipped=0.5, progress=False)
    reasons = {d["path"].rsplit("/", 1)[-1]: d["reason"] for d in m["skipped"]}
    assert set(reasons) == {"empty.png", "truncated.png", "text.png", "corrupt.jpg", "notes.txt"}
    assert "0 bytes" in reasons["empty.png"]
    assert "truncated" in reasons["truncated.png"]
    assert "not a recognised image" in reasons["text.png"]
    assert "corrupt" in reasons["corrupt.jpg"] or "not a recognised" in reasons["corrupt.jpg"]
    assert f"not a {'/'.join(images.IMAGE_SUFFIXES)} file" in reasons["notes.txt"]
    assert sum(m["splits"][s]["count"] for s in SPLITS) == 20
    assert verify(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_src", "does not exist"),
        ("no_class_folders", "no class folders"),
        ("no_images", "no images in"),
        ("too_many_skipped", "5 of 25 files (20.0%) could not be used"),
        ("out_not_empty", "is not empty; pass --force"),
        ("bad_split", "--split fractions must sum to 1"),
    ],
)
def test_bad_input_fails_clearly_and_leaves_no_out(case: str, message: str, synth_src: Path, tmp_path: Path):
    src = tmp_path / "src"
    parent = tmp_path / "dest"
    parent.mkdir()
    out = parent / "out"
    kwargs = {}
    if case == "missing_src":
        src = tmp_path / "nowhere"
    elif case == "no_class_folders":
        (src / "xrays").mkdir(parents=True)
    elif case == "no_images":
        (src / "COVID" / "images").mkdir(parents=True)
    elif case == "too_many_skipped":
        src = _bad_src(tmp_path, synth_src)
    elif case == "out_not_empty":
        _small_src(src, synth_src, per_class=1)
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "bad_split":
        _small_src(src, synth_src, per_class=1)
        kwargs["split"] = (0.7, 0.2, 0.2)
    # PackError for what pack itself checks; InputError (its base) for SRC and OUT, checked by
    # shard_tools.sources and shard_tools.outdir.
    error = InputError if case in ("missing_src", "no_class_folders", "out_not_empty") else PackError
    if case == "too_many_skipped":  # the run failed (exit 1), as for any unreadable image
        error = TooManySkipped
    with pytest.raises(error, match=re.escape(message)):
        pack(src, out, size=32, progress=False, **kwargs)
    if case == "out_not_empty":
        assert (out / "keep.txt").read_text() == "mine" and _leftovers(parent, "out") == ["out"]
    else:
        assert _leftovers(parent, "out") == []


def test_cli_prints_the_error_without_traceback_and_exits_2(tmp_path: Path, capsys):
    # As `python -m shard_tools.pack` runs it: main inside run_main, which maps the error to exit 2.
    assert run_main(main, [str(tmp_path / "nowhere"), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "does not exist" in err and "Traceback" not in err


def test_warns_about_unknown_folders_and_empty_classes(synth_src: Path, tmp_path: Path, capsys):
    src = _small_src(tmp_path / "src", synth_src, per_class=3, classes=("COVID", "Normal"))
    (src / "Lung_Opacity" / "images").mkdir(parents=True)
    (src / "scans-to-sort").mkdir()
    (src / "README.txt").write_text("files beside the class folders are ignored")
    m = pack(src, tmp_path / "out", size=32, min_shards=1, progress=False)
    err = capsys.readouterr().err
    assert "'scans-to-sort'" in err and "ignored" in err
    assert "class 'Lung_Opacity'" in err and "has no" in err
    assert "no folder for class 'Viral Pneumonia'" in err
    assert m["splits"]["train"]["class_counts"]["Lung_Opacity"] == 0
    assert sum(m["splits"][s]["count"] for s in SPLITS) == 6 and m["skipped"] == []


def test_force_replaces_only_a_folder_of_shards_and_an_interrupted_run_leaves_nothing(
    synth_src: Path, tmp_path: Path, monkeypatch
):
    src = _small_src(tmp_path / "src", synth_src, per_class=2)
    out = tmp_path / "dest" / "out"
    pack(src, out, size=32, min_shards=3, progress=False)
    assert (out / "train-000002.tar").is_file()
    # A folder of shards is replaced as a whole: no stale shard of the previous run survives.
    m = pack(src, out, size=32, min_shards=1, progress=False, force=True)
    listed = {s["file"] for split in SPLITS for s in m["splits"][split]["shards"]}
    assert {p.name for p in out.iterdir()} == listed | {MANIFEST_NAME}
    assert not (out / "train-000002.tar").exists()
    # Anything else in it, and --force refuses, naming the file that would be lost (contract since the
    # --force fix: it used to delete any folder).
    (out / "old.txt").write_text("old")
    with pytest.raises(InputError, match=r"--force would delete .*old\.txt"):
        pack(src, out, size=32, min_shards=1, progress=False, force=True)
    assert (out / "old.txt").read_text() == "old" and (out / MANIFEST_NAME).is_file()
    assert _leftovers(tmp_path / "dest", "out") == ["out"]

    calls = []

    def interrupted(path, members):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing shards
        return real_write(path, members)

    real_write = shard_writer.write_shard
    monkeypatch.setattr(shard_writer, "write_shard", interrupted)  # where pack's write stage calls it
    with pytest.raises(KeyboardInterrupt):
        pack(src, tmp_path / "dest" / "new", size=32, min_shards=4, workers=1, progress=False)
    assert _leftovers(tmp_path / "dest", "new") == []
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------- images


def test_load_gray_converts_every_mode_to_8bit_gray(tmp_path: Path):
    ramp16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    (tmp_path / "16bit.png").write_bytes(_png(ramp16))
    g16 = images.load_gray(tmp_path / "16bit.png", 0)
    assert g16.dtype == np.uint8 and g16.shape == (64, 64)
    assert g16[0, 0] == 0 and g16[0, -1] == 255 and 120 <= g16[0, 32] <= 135  # scaled, not clipped at 255

    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    for mode in ("L", "RGB", "RGBA", "P", "LA"):
        out = images.load_gray(_png(gray, mode=mode), 0)
        np.testing.assert_array_equal(out, gray, err_msg=mode)
    cmyk = io.BytesIO()
    Image.fromarray(gray).convert("CMYK").save(cmyk, format="JPEG", quality=95)
    assert np.abs(images.load_gray(cmyk.getvalue(), 0).astype(int) - gray).mean() < 4
    one_bit = images.load_gray(_png((gray > 127).astype(np.uint8) * 255, mode="1"), 0)
    assert set(np.unique(one_bit)) == {0, 255}

    small = images.load_gray(_png(gray), 16)
    assert small.shape == (16, 16) and small.dtype == np.uint8
    assert abs(int(small.mean()) - int(gray.mean())) <= 2  # an antialiased (area-like) reduction
    assert images.load_gray(_png(np.zeros((30, 40), np.uint8)), 8).shape == (8, 8)  # squashed, not cropped


def test_load_gray_names_the_file_when_it_fails(tmp_path: Path, monkeypatch):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(images.ImageError, match=r"empty\.png: empty file"):
        images.load_gray(tmp_path / "empty.png", 32)
    with pytest.raises(images.ImageError, match="scan-7: not a recognised image"):
        images.load_gray(b"GIF? no", 32, name="scan-7")
    err = pickle.loads(pickle.dumps(images.ImageError("a.png", "bad")))  # as from a worker process
    assert (str(err), err.name, err.reason) == ("a.png: bad", "a.png", "bad")
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(images.ImageError, match="exceeds the limit"):
        images.load_gray(_png(np.zeros((11, 11), np.uint8)), 8)
