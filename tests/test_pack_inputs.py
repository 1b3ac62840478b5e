"""Hostile inputs to pack, predict and the groups CSV: files that are not files, damaged tags and zips.

Each case once ended in a hang, an out-of-memory kill, a traceback or silence (issue 22). The cases that
could hang or eat memory on a regression run in a child process with a timeout and a memory limit.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shard_tools.cli import run_main
from shard_tools.files import remove_stale_staging
from shard_tools.images import ImageError, decode_gray
from shard_tools.pack import main as pack_main
from shard_tools.pack import pack
from shard_tools.synth import generate


def _limited() -> None:  # a regression reads /dev/zero until this stops it, not the machine
    resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=timeout, preexec_fn=_limited
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: {' '.join(args)[:200]}")


def _special_files(folder: Path) -> dict[str, str]:
    """A FIFO, a link to /dev/zero and a 300 MiB sparse file, named like images: name -> expected reason."""
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    with open(folder / "huge.png", "wb") as f:
        f.truncate(300 * 2**20)  # sparse: no disk used
    return {
        "fifo.png": "not a regular file (a named pipe (FIFO))",
        "zero.png": "not a regular file (a character device)",
        "huge.png": "too large: 314572800 bytes",
    }


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("inputs") / "src", per_class=20, size=64, workers=1)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------- not regular files


@pytest.mark.slow
def test_pack_skips_and_names_fifo_device_link_and_huge_file(src: Path, tmp_path: Path):
    src = _copy(src, tmp_path / "src")
    expected = _special_files(src / "COVID" / "images")
    out = tmp_path / "out"
    r = _run(
        ["-m", "shard_tools.pack", str(src), str(out), "--size", "32", "--min-shards", "1"]
        + ["--workers", "2", "--max-skipped", "0.1", "--no-progress"]
    )
    assert r.returncode == 0, r.stderr
    skipped = {d["path"]: d["reason"] for d in json.loads((out / "manifest.json").read_text())["skipped"]}
    for name, reason in expected.items():
        assert skipped[f"COVID/images/{name}"].startswith(reason)
        assert f"COVID/images/{name}: {reason}" in r.stderr


@pytest.mark.slow
def test_load_gray_and_predicts_listing_refuse_special_files_by_name(tmp_path: Path):
    # predict and explain list files with `cxrdist.cli.find_images` and read them with `load_gray`.
    expected = _special_files(tmp_path)
    code = (
        "import sys; from pathlib import Path\n"
        "from cxrdist.cli import find_images\n"
        "from shard_tools.images import ImageError, load_gray\n"
        "folder = Path(sys.argv[1])\n"
        "for files in (find_images([str(folder)])[0], find_images([str(folder / 'fifo.png')])[0]):\n"
        "    for f in files:\n"
        "        try: load_gray(f, 32)\n"
        "        except ImageError as e: print(e)\n"
    )
    r = _run(["-c", code, str(tmp_path)])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for name, reason in expected.items():
        assert f"{tmp_path / name}: {reason}" in "\n".join(lines[:3])
    assert lines[3] == f"{tmp_path / 'fifo.png'}: {expected['fifo.png']}"  # named directly


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_groups_csv_that_is_not_a_regular_file_is_refused(src: Path, tmp_path: Path, kind: str):
    csv = tmp_path / "groups.csv"
    os.mkfifo(csv) if kind == "fifo" else csv.symlink_to("/dev/zero")
    r = _run(["-m", "shard_tools.pack", str(src), str(tmp_path / "out"), "--groups", str(csv)])
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "not a regular file" in r.stderr and str(csv) in r.stderr


@pytest.mark.slow
def test_a_fifo_as_src_is_refused(tmp_path: Path):
    os.mkfifo(tmp_path / "src.zip")
    r = _run(["-m", "shard_tools.pack", str(tmp_path / "src.zip"), str(tmp_path / "out")])
    assert r.returncode == 2 and "neither a folder nor a regular file" in r.stderr


# ----------------------------------------------------------------------------------- damaged files


def _jpeg_with_damaged_exif(kind: str) -> bytes:
    """A JPEG with EXIF orientation 6 (so exif_transpose rewrites the tags), one tag's bytes damaged:
    "type" declares XResolution ASCII instead of RATIONAL (TypeError in Pillow); "tag" turns Make into a
    numeric tag holding text (struct.error)."""
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010F], exif[0x0112], exif[0x011A] = "Maker", 6, 72.0  # Make, Orientation, XResolution
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    data = bytearray(buf.getvalue())
    if kind == "type":
        i = data.find(b"\x01\x1a\x00\x05")  # XResolution, RATIONAL (big-endian TIFF header)
        data[i + 3] = 2  # ASCII
    else:
        i = data.find(b"\x01\x0f\x00\x02")  # Make, ASCII
        data[i + 1] = 0x00  # ImageWidth: a number
    assert i > 0
    return bytes(data)


@pytest.mark.parametrize("kind", ["type", "tag"])
def test_damaged_exif_is_an_unreadable_image(kind: str):
    with pytest.raises(ImageError) as e:
        decode_gray(_jpeg_with_damaged_exif(kind), name="bad.jpg")
    assert e.value.name == "bad.jpg" and "damaged image tags" in e.value.reason


def test_pack_skips_a_damaged_exif_jpeg_and_names_it(src: Path, tmp_path: Path):
    src = _copy(src, tmp_path / "src")
    (src / "Normal" / "images" / "bad.jpg").write_bytes(_jpeg_with_damaged_exif("type"))
    manifest = pack(src, tmp_path / "out", size=32, min_shards=1, workers=1, max_skipped=0.1, progress=False)
    (skipped,) = manifest["skipped"]
    assert skipped["path"] == "Normal/images/bad.jpg" and "TypeError" in skipped["reason"]


def test_a_text_file_named_dcm_is_not_a_dicom_file():
    with pytest.raises(ImageError, match="not a DICOM file"):
        decode_gray(b"patient,group\na.png,1\n", name="notes.dcm")


def test_too_many_unreadable_files_is_one_line_and_exit_1(src: Path, tmp_path: Path, capsys):
    src = _copy(src, tmp_path / "src")
    for i in range(5):
        (src / "COVID" / "images" / f"broken-{i}.png").write_bytes(b"not a png")
    code = run_main(pack_main, [str(src), str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "5 of 85 files" in err and "COVID/images/broken-0.png" in err
    assert not (tmp_path / "out").exists()


def _drop_from_central_directory(data: bytes, names: set[str]) -> bytes:
    """The zip with `names` left out of its central directory (their data stays): a damaged directory
    that zipfile still opens."""
    end = data.rfind(b"PK\x05\x06")
    count, size, offset = struct.unpack_from("<HII", data, end + 10)
    entries, i = [], offset
    while i < offset + size:
        n, m, c = struct.unpack_from("<HHH", data, i + 28)
        entries.append((data[i + 46 : i + 46 + n].decode(), data[i : i + 46 + n + m + c]))
        i += 46 + n + m + c
    kept = b"".join(raw for name, raw in entries if name not in names)
    n_kept = len(entries) - len(names)
    tail = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, n_kept, n_kept, len(kept), offset, 0)
    return data[:offset] + kept + tail


def test_zip_with_a_damaged_central_directory_names_what_it_cannot_place(src: Path, tmp_path: Path, capsys):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(src.rglob("*.png")):
            zf.write(f, f.relative_to(src).as_posix())
    lost = {"COVID/images/COVID-3.png", "Normal/images/Normal-7.png", "Normal/images/Normal-8.png"}
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(_drop_from_central_directory(buf.getvalue(), lost))
    assert len(zipfile.ZipFile(damaged).namelist()) == 77
    manifest = pack(
        damaged, tmp_path / "out", size=32, min_shards=1, workers=1, max_skipped=0.1, progress=False
    )
    err = capsys.readouterr().err
    assert "stores 3 member(s) that its central directory does not list" in " ".join(err.split())
    assert all(name in err for name in lost)
    assert {d["path"] for d in manifest["skipped"]} == lost


# ------------------------------------------------------------------------------------------ outputs


def test_a_users_dot_old_folder_beside_out_is_never_deleted(src: Path, tmp_path: Path):
    mine = tmp_path / ".cxr.old"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    pack(src, tmp_path / "cxr", size=32, min_shards=1, workers=1, progress=False)
    pack(src, tmp_path / "cxr", size=32, min_shards=1, workers=1, progress=False, force=True)
    assert (mine / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cxr.old", "cxr"]


def test_a_swap_killed_between_its_renames_is_put_back_not_deleted(tmp_path: Path):
    # replace_dir moved the previous folder aside, then its process was killed before the new one was
    # renamed into place: the next run must restore the previous folder, not delete it.
    final = tmp_path / "cxr"
    aside = tmp_path / ".cxr.tmp-999999999-0a1b2c3d.old"  # a pid that is not running
    aside.mkdir()
    (aside / "manifest.json").write_text("previous")
    remove_stale_staging(final)
    assert (final / "manifest.json").read_text() == "previous" and not aside.exists()


def test_pack_warns_when_val_or_test_comes_out_empty(src: Path, tmp_path: Path, capsys):
    pack(src, tmp_path / "out", size=32, split=(1, 0, 0), min_shards=1, workers=1, progress=False)
    err = " ".join(capsys.readouterr().err.split())
    assert "val is empty" in err and "test is empty" in err
