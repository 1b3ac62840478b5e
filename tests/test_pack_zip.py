"""shard_tools.pack reading the download's zip in place: the same shards as the extracted folder."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import webdataset as wds
from conftest import REPO
from rich.console import Console

from shard_tools import pack as pack_mod
from shard_tools import sources
from shard_tools.errors import InputError
from shard_tools.images import pixel_sha256
from shard_tools.pack import pack
from shard_tools.schema import CLASSES, MANIFEST_NAME, SPLITS
from shard_tools.verify import verify

OPTS = {"size": 32, "min_shards": 2, "progress": False}
KAGGLE_ROOT = "COVID-19_Radiography_Dataset"


def _database(root: Path, synth_src: Path, per_class: int = 7, layout: str = "images") -> Path:
    """A small database folder in the newer (`<Class>/images/`, with `masks/` beside) or flat layout,
    with the download's metadata files beside the class folders."""
    for c in CLASSES:
        images = root / c / "images" if layout == "images" else root / c
        images.mkdir(parents=True)
        for i in range(1, per_class + 1):
            shutil.copy(synth_src / c / "images" / f"{c}-{i}.png", images)
        if layout == "images":
            (root / c / "masks").mkdir()
            (root / c / "masks" / f"{c}-1.png").write_bytes(b"a mask: never read")
        (root / f"{c}.metadata.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
    (root / "README.md.txt").write_text("COVID-19 Radiography Database")
    return root


def _zip(folder: Path, zip_path: Path, prefix: str = "", extra: dict[str, bytes] | None = None) -> Path:
    """Zip `folder`'s files under `prefix`, with directory entries as zip tools write them, plus `extra`
    members written verbatim (names a normal tool would never write)."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            name = prefix + p.relative_to(folder).as_posix()
            if p.is_dir():
                zf.writestr(name + "/", b"")
            else:
                zf.write(p, name)
        for name, data in (extra or {}).items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return zip_path


def _samples(out: Path) -> dict[str, tuple[int, str, str, str]]:
    """key -> (label, pixel sha256 recomputed from the stored PNG, split, recorded path)."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    found = {}
    for split in SPLITS:
        urls = [str(out / s["file"]) for s in manifest["splits"][split]["shards"]]
        for s in [] if not urls else wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("l8"):
            found[s["__key__"]] = (s["cls"], pixel_sha256(s["png"]), split, s["json"]["path"])
    return found


@pytest.mark.parametrize(
    ("layout", "prefix"),
    [("images", KAGGLE_ROOT + "/"), ("flat", "")],
    ids=["kaggle-images-one-level-down", "flat-top-level"],
)
def test_zip_packs_like_the_extracted_folder(synth_src: Path, tmp_path: Path, layout: str, prefix: str):
    folder = _database(tmp_path / "extracted" / KAGGLE_ROOT, synth_src, layout=layout)
    archive = _zip(folder, tmp_path / "archive.zip", prefix)
    m_zip = pack(archive, tmp_path / "from-zip", **OPTS)
    m_dir = pack(folder, tmp_path / "from-folder", **OPTS)

    a, b = _samples(tmp_path / "from-zip"), _samples(tmp_path / "from-folder")
    assert len(a) == 28 and a.keys() == b.keys()
    assert {v[2] for v in a.values()} == set(SPLITS)
    assert {k: v[:3] for k, v in a.items()} == {k: v[:3] for k, v in b.items()}  # labels, pixels, splits
    # Paths are recorded relative to the folder that holds the class folders, in the zip as on disk, so
    # here even the shard bytes agree.
    assert a == b and m_zip["splits"] == m_dir["splits"]
    assert m_zip["skipped"] == m_dir["skipped"] == [] and m_zip["duplicates"] == m_dir["duplicates"]
    assert m_zip["source"] == str(archive.resolve()) and m_zip["source_root"] == prefix
    assert "source_root" not in m_dir
    assert verify(tmp_path / "from-zip", workers=1) == []


def test_unsafe_member_names_are_never_followed(synth_src: Path, tmp_path: Path, capsys):
    folder = _database(tmp_path / "db", synth_src)
    hostile = {
        "../evil.png": b"zip slip",
        "/etc/evil.png": b"absolute",
        f"{KAGGLE_ROOT}/COVID/images/../../../evil.png": b"slip from inside a class folder",
        "C:/evil.png": b"a drive letter",
    }
    archive = _zip(folder, tmp_path / "archive.zip", KAGGLE_ROOT + "/", extra=hostile)
    pack(archive, tmp_path / "out", **OPTS)
    err = " ".join(capsys.readouterr().err.split())
    assert "ignored 4 member(s)" in err and "'../evil.png'" in err
    assert not (tmp_path / "evil.png").exists() and not (tmp_path.parent / "evil.png").exists()
    pack(folder, tmp_path / "clean", **OPTS)
    assert _samples(tmp_path / "out") == _samples(tmp_path / "clean")
    assert [n for n in hostile if sources.is_unsafe_member(n)] == list(hostile)
    assert not sources.is_unsafe_member(f"{KAGGLE_ROOT}/COVID/images/COVID-1.png")


def test_damaged_member_is_skipped_with_its_reason(synth_src: Path, tmp_path: Path):
    folder = _database(tmp_path / "db", synth_src)
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, p.relative_to(folder).as_posix())
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("Normal/images/Normal-2.png")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # the stored bytes
    data[start + 100] ^= 0xFF
    archive.write_bytes(bytes(data))
    m = pack(archive, tmp_path / "out", max_skipped=0.05, workers=2, **OPTS)
    assert [d["path"] for d in m["skipped"]] == ["Normal/images/Normal-2.png"]
    assert "CRC" in m["skipped"][0]["reason"]
    assert sum(m["splits"][s]["count"] for s in SPLITS) == 27


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"photos/cat.png": b"x", "notes.txt": b"x"}, "no class folders in"),
        ({"a/COVID/x.png": b"x", "b/Normal/y.png": b"x"}, "holds class folders in more than one place"),
        ({"COVID/x.png": b"x", "deeper/COVID/y.png": b"x"}, "holds class folders in more than one place"),
    ],
    ids=["none", "two-folders-down", "top-and-one-down"],
)
def test_zip_without_one_clear_root_is_bad_input(tmp_path: Path, members: dict[str, bytes], message: str):
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(InputError, match=message):
        pack(archive, tmp_path / "out", **OPTS)
    assert not (tmp_path / "out").exists()


def test_macos_resource_folder_and_other_files_are_not_zips_or_roots(synth_src: Path, tmp_path: Path):
    folder = _database(tmp_path / "db", synth_src, per_class=2)
    archive = _zip(
        folder,
        tmp_path / "archive.zip",
        KAGGLE_ROOT + "/",
        extra={f"__MACOSX/{KAGGLE_ROOT}/COVID/images/._COVID-1.png": b"resource fork"},
    )
    m = pack(archive, tmp_path / "out", **OPTS)
    assert m["source_root"] == KAGGLE_ROOT + "/" and m["skipped"] == []
    not_a_zip = tmp_path / "archive.tar"
    not_a_zip.write_bytes(b"not a zip at all")
    with pytest.raises(InputError, match="is a file but not a zip archive"):
        pack(not_a_zip, tmp_path / "out2", **OPTS)
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(archive.read_bytes()[:-30])  # the end-of-archive record is cut off
    with pytest.raises(InputError, match="not a zip archive|damaged zip"):
        pack(truncated, tmp_path / "out3", **OPTS)


def test_zip_inside_out_is_refused_and_out_beside_it_is_fine(synth_src: Path, tmp_path: Path):
    folder = _database(tmp_path / "db", synth_src, per_class=2)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    archive = _zip(folder, downloads / "archive.zip", KAGGLE_ROOT + "/")
    with pytest.raises(InputError, match="is inside OUT"):
        pack(archive, downloads, force=True, **OPTS)
    assert archive.is_file()
    pack(archive, downloads / "shards", **OPTS)  # OUT in the zip's own folder: no overlap for a zip
    assert sorted(p.name for p in downloads.iterdir()) == ["archive.zip", "shards"]


def test_progress_bars_count_zip_members(synth_src: Path, tmp_path: Path, monkeypatch):
    folder = _database(tmp_path / "db", synth_src, per_class=3)
    archive = _zip(folder, tmp_path / "archive.zip", KAGGLE_ROOT + "/")
    buf = io.StringIO()
    monkeypatch.setattr(pack_mod, "_err", Console(file=buf, force_terminal=True, width=120))
    pack(archive, tmp_path / "out", size=32, min_shards=2, progress=True)
    text = buf.getvalue()
    assert "decode" in text and "write" in text and "12/12" in text


@pytest.mark.slow
def test_cli_packs_the_zip(synth_src: Path, tmp_path: Path):
    folder = _database(tmp_path / "db", synth_src, per_class=2)
    archive = _zip(folder, tmp_path / "covid19-radiography-database.zip", KAGGLE_ROOT + "/")
    res = subprocess.run(
        [sys.executable, "-m", "shard_tools.pack", str(archive), str(tmp_path / "shards" / "cxr")]
        + ["--size", "32", "--min-shards", "1", "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "train" in res.stdout and "Traceback" not in res.stderr
    assert verify(tmp_path / "shards" / "cxr", workers=1) == []
