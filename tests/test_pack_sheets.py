"""`pack --groups-from-sheets`: the database's <Class>.metadata.xlsx make each source URL a group."""

from __future__ import annotations

import json
import shlex
import shutil
import tarfile
import zipfile
from collections import defaultdict
from pathlib import Path

import openpyxl
import pytest

from shard_tools.cli import run_main
from shard_tools.pack import main, pack
from shard_tools.schema import CLASSES, MANIFEST_NAME, SPLITS
from shard_tools.verify import verify

PER_CLASS = 12
OPTS = {"size": 32, "min_shards": 1, "progress": False, "workers": 1}
HEADER = ("FILE NAME", "FORMAT", "SIZE", "URL")


def _source(c: str, i: int) -> str:
    """Four sources per class, three images each: i = 1..3 from the first, 4..6 the second, ..."""
    return f"https://example.org/{c.lower().replace(' ', '-')}/source-{(i - 1) // 3}"


def _sheet(path: Path, rows, header=HEADER, title: str = "Sheet1") -> Path:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = title
    if header is not None:
        sheet.append(list(header))
    for row in rows:
        sheet.append(list(row))
    book.save(path)
    return path


def _database(root: Path, synth_src: Path) -> Path:
    """The database's layout: <Class>/images/<Class>-<i>.png and <Class>.metadata.xlsx beside the folders,
    whose names are upper case and without extension for Normal, as in the real sheets."""
    for c in CLASSES:
        (root / c / "images").mkdir(parents=True)
        rows = []
        for i in range(1, PER_CLASS + 1):
            shutil.copy(synth_src / c / "images" / f"{c}-{i}.png", root / c / "images")
            name = f"NORMAL-{i}" if c == "Normal" else f"{c}-{i}"
            rows.append((name, "PNG", "256*256", _source(c, i)))
        _sheet(root / f"{c}.metadata.xlsx", rows)
    return root


def _records(out: Path) -> dict[str, tuple[str, dict]]:
    """Recorded path -> (split, the sample's .json), read from the shards."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    found = {}
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            with tarfile.open(out / shard["file"]) as tar:
                for m in tar:
                    if m.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(m).read())
                        found[meta["path"]] = (split, meta)
    return found


def _one_line_exit_2(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    # Warnings may come first; the error is one line, the last, and no traceback.
    assert lines[-1].startswith("error:") and all(line.startswith("warning:") for line in lines[:-1]), err
    return lines[-1]


def test_each_source_stays_in_one_split_and_samples_record_it(synth_src, tmp_path):
    src = _database(tmp_path / "db", synth_src)
    manifest = pack(src, tmp_path / "out", groups_from_sheets=True, split=(0.5, 0.25, 0.25), **OPTS)
    records = _records(tmp_path / "out")
    assert len(records) == len(CLASSES) * PER_CLASS
    splits_of_source = defaultdict(set)
    for path, (split, meta) in records.items():
        c, name = path.split("/")[0], path.rsplit("/", 1)[-1]
        i = int(name.rsplit("-", 1)[1].removesuffix(".png"))
        assert meta["source"] == meta["group"] == _source(c, i)
        splits_of_source[meta["source"]].add(split)
    assert len(splits_of_source) == 16 and all(len(s) == 1 for s in splits_of_source.values())
    assert all(manifest["splits"][s]["count"] > 0 for s in SPLITS)  # sources went to every split
    summary = manifest["groups"]
    assert summary["file"] == str(src.resolve()) and summary["ungrouped"] == "error"
    assert [Path(s).name for s in summary["sheets"]] == [f"{c}.metadata.xlsx" for c in CLASSES]
    assert sorted(g for s in SPLITS for g in manifest["splits"][s]["groups"]) == sorted(splits_of_source)
    assert manifest["command"][-3:] == ["--groups-from-sheets", "--ungrouped", "error"]
    assert verify(tmp_path / "out", workers=1) == []


def test_the_zip_reads_its_own_sheets_and_a_csv_records_the_group(synth_src, tmp_path):
    src = _database(tmp_path / "db", synth_src)
    archive = tmp_path / "db.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, "COVID-19_Radiography_Dataset/" + p.relative_to(src).as_posix())
    pack(src, tmp_path / "a", groups_from_sheets=True, **OPTS)
    pack(archive, tmp_path / "b", groups_from_sheets=True, **OPTS)
    for shard in (tmp_path / "a").glob("*.tar"):
        assert (tmp_path / "b" / shard.name).read_bytes() == shard.read_bytes()
    # A --groups CSV records each sample's group too, and no source.
    csv = tmp_path / "groups.csv"
    csv.write_text(
        "file,group\n" + "".join(f"{p.split('/')[-1]},g{p[0]}\n" for p in _records(tmp_path / "a"))
    )
    pack(src, tmp_path / "c", groups=csv, **OPTS)
    for path, (_, meta) in _records(tmp_path / "c").items():
        assert meta["group"] == f"g{path[0]}" and "source" not in meta


@pytest.mark.parametrize(
    "header",
    [("file_name", "url"), ("File Name", "Url"), (" filename ", "URL "), ("FILE-NAME", "Source")],
    ids=["underscore", "title-case", "spaces", "source"],
)
def test_header_spelling_is_free(synth_src, tmp_path, header):
    src = _database(tmp_path / "db", synth_src)
    _sheet(
        src / "COVID.metadata.xlsx", [(f"COVID-{i}.png", _source("COVID", i)) for i in range(1, 13)], header
    )
    pack(src, tmp_path / "out", groups_from_sheets=True, **OPTS)
    assert _records(tmp_path / "out")["COVID/images/COVID-4.png"][1]["source"] == _source("COVID", 4)


def test_rows_for_images_not_in_src_warn_and_unnamed_images_follow_ungrouped(synth_src, tmp_path, capsys):
    src = _database(tmp_path / "db", synth_src)
    rows = [(f"COVID-{i}", "PNG", "", _source("COVID", i)) for i in range(1, 11)]  # 11 and 12 unnamed
    rows.append(("COVID-999", "PNG", "", "https://example.org/elsewhere"))  # the sheet covers more
    _sheet(src / "COVID.metadata.xlsx", rows)
    argv = [str(src), str(tmp_path / "out"), "--size", "32", "--min-shards", "1", "--groups-from-sheets"]
    err = _one_line_exit_2(argv, capsys)
    assert "names no group for 2 of 48 images: COVID/images/COVID-11.png, COVID/images/COVID-12.png" in err
    assert "--ungrouped own-group" in err
    capsys.readouterr()
    manifest = pack(src, tmp_path / "out", groups_from_sheets=True, ungrouped="own-group", **OPTS)
    err = " ".join(capsys.readouterr().err.split())
    assert "1 row(s) name no image in SRC and are ignored: COVID.metadata.xlsx:COVID-999" in err
    assert manifest["groups"]["own_groups"] == 2
    assert "group" not in _records(tmp_path / "out")["COVID/images/COVID-12.png"][1]


def _bad_sheet(kind: str, src: Path) -> str:
    """Spoil COVID's sheet (or the workbook) one way; return what the error line must say."""
    sheet = src / "COVID.metadata.xlsx"
    if kind == "not-xlsx":
        sheet.write_bytes(b"FILE NAME,URL\nCOVID-1,https://x\n")
        return f"--groups-from-sheets: {sheet} is not a readable .xlsx workbook"
    if kind == "no-file-column":
        _sheet(sheet, [("https://x", 1)], header=("URL", "Number"), title="Meta")
        return f"{sheet} (worksheet 'Meta') has no file-name column: its header row 1 holds ['URL', 'Number']"
    if kind == "no-url-column":
        _sheet(sheet, [("COVID-1", "PNG")], header=("FILE NAME", "FORMAT"))
        return f"{sheet} (worksheet 'Sheet1') has no source URL column"
    if kind == "unknown-files":
        _sheet(sheet, [(f"Normal-{i}", "PNG", "", "https://x") for i in range(1, 5)])
        return f"none of the 4 rows of {sheet} names an image of class 'COVID' in SRC"
    if kind == "two-sources":
        _sheet(sheet, [("COVID-1", "PNG", "", "https://a"), ("COVID-1.png", "PNG", "", "https://b")])
        return "COVID/images/COVID-1.png has source 'https://a'"
    if kind == "empty":
        _sheet(sheet, [], header=None)
        return f"{sheet} (worksheet 'Sheet1') is empty"
    assert kind == "missing"
    sheet.unlink()
    return "no metadata sheet for class 'COVID'"


@pytest.mark.parametrize(
    "kind",
    ["not-xlsx", "no-file-column", "no-url-column", "unknown-files", "two-sources", "empty", "missing"],
)
def test_a_bad_sheet_is_one_line_naming_it_and_exit_2(synth_src, tmp_path, capsys, kind):
    src = _database(tmp_path / "db", synth_src)
    expected = _bad_sheet(kind, src)
    argv = [str(src), str(tmp_path / "out"), "--size", "32", "--groups-from-sheets", "--no-progress"]
    err = " ".join(_one_line_exit_2(argv, capsys).split())
    assert expected in err, err
    assert not (tmp_path / "out").exists()


def test_sheets_and_a_csv_together_are_refused(synth_src, tmp_path, capsys):
    src = _database(tmp_path / "db", synth_src)
    argv = [str(src), str(tmp_path / "out"), "--groups", str(tmp_path / "g.csv"), "--groups-from-sheets"]
    assert "not both" in _one_line_exit_2(argv, capsys)


def test_a_missing_class_folder_suggests_classes_with_those_found(synth_src, tmp_path, capsys):
    src = _database(tmp_path / "db", synth_src)
    shutil.rmtree(src / "Lung_Opacity")
    capsys.readouterr()
    pack(src, tmp_path / "out", **OPTS)
    err = " ".join(capsys.readouterr().err.split())
    assert "no folder for class 'Lung_Opacity'" in err
    assert "pass --classes COVID,Normal,'Viral Pneumonia'" in err
    # The suggestion works as typed in a shell.
    suggested = shlex.split(err.split("pass --classes ", 1)[1])[0]
    argv = [str(src), str(tmp_path / "out3"), "--size", "32", "--min-shards", "1", "--no-progress"]
    capsys.readouterr()
    assert run_main(main, [*argv, "--classes", suggested]) == 0
    assert "no folder for class" not in capsys.readouterr().err
    manifest = json.loads((tmp_path / "out3" / MANIFEST_NAME).read_text())
    assert manifest["classes"] == ["COVID", "Normal", "Viral Pneumonia"]


def test_a_title_row_above_the_header_is_skipped(synth_src, tmp_path):
    src = _database(tmp_path / "db", synth_src)
    rows = [("",), HEADER, *[(f"COVID-{i}", "PNG", "", _source("COVID", i)) for i in range(1, 13)]]
    _sheet(src / "COVID.metadata.xlsx", rows, header=("COVID-19 Radiography Database: COVID",))
    pack(src, tmp_path / "out", groups_from_sheets=True, **OPTS)
    assert _records(tmp_path / "out")["COVID/images/COVID-7.png"][1]["source"] == _source("COVID", 7)
