"""Leakage-safe splits: `pack --groups FILE.csv` keeps every patient (study, hospital) inside one split."""

from __future__ import annotations

import csv
import json
import shutil
import tarfile
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shard_tools.cli import run_main
from shard_tools.errors import InputError
from shard_tools.groups import join_groups
from shard_tools.pack import main, pack
from shard_tools.schema import CLASSES, MANIFEST_NAME, SPLITS, ManifestError, validate_manifest
from shard_tools.splits import assign_group_splits, split_sizes
from shard_tools.verify import verify

OPTS = {"size": 32, "min_shards": 1, "progress": False}


def _src(root: Path, synth_src: Path, per_class: int = 10) -> Path:
    for c in CLASSES:
        (root / c / "images").mkdir(parents=True)
        for i in range(1, per_class + 1):
            shutil.copy(synth_src / c / "images" / f"{c}-{i}.png", root / c / "images")
    return root


def _csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, ...] = ("file", "group")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _patients(per_class: int = 10, size: int = 3) -> list[tuple[str, str]]:
    """Bare file names, patients of `size` consecutive images within a class, some spanning classes."""
    rows = []
    for c in CLASSES:
        for i in range(1, per_class + 1):
            rows.append((f"{c}-{i}.png", f"{c[:3].lower()}-p{(i - 1) // size}"))
    # One patient with images in two classes (a COVID scan and, later, a normal one).
    rows[0] = (rows[0][0], "shared-patient")
    rows[2 * per_class] = (rows[2 * per_class][0], "shared-patient")
    return rows


def _split_of_paths(out: Path) -> dict[str, str]:
    """Recorded path -> split, read from the shards themselves."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    found = {}
    for split in SPLITS:
        for s in manifest["splits"][split]["shards"]:
            with tarfile.open(out / s["file"]) as tar:
                for m in tar:
                    if m.name.endswith(".json"):
                        found[json.load(tar.extractfile(m))["path"]] = split
    return found


# ------------------------------------------------------------------------------------ the split rule


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 30)), min_size=1, max_size=120),
    dup_pairs=st.lists(st.tuples(st.integers(0, 119), st.integers(0, 119)), max_size=10),
    fractions=st.sampled_from([(0.7, 0.15, 0.15), (0.8, 0.2, 0.0), (0.5, 0.25, 0.25), (1.0, 0.0, 0.0)]),
    seed=st.integers(0, 2**32 - 1),
)
def test_no_group_ever_spans_two_splits(data, dup_pairs, fractions, seed):
    labels = [c for c, _ in data]
    names = [None if g == 0 else f"g{g}" for _, g in data]  # group 0: images the CSV does not name
    dups = [[a, b] for a, b in dup_pairs if a < len(data) and b < len(data) and a != b]
    component = join_groups(names, dups)
    split = assign_group_splits(labels, component, 4, fractions, seed)
    assert len(split) == len(labels) and all(s in (0, 1, 2) for s in split)  # exactly one split each
    by_name, by_component = defaultdict(set), defaultdict(set)
    for i, s in enumerate(split):
        by_component[component[i]].add(s)
        if names[i] is not None:
            by_name[names[i]].add(s)
    assert all(len(v) == 1 for v in by_name.values())
    assert all(len(v) == 1 for v in by_component.values())
    assert all(split[a] == split[b] for a, b in dups)  # identical images share a split
    assert all(fractions[s] > 0 for s in split)  # a split with fraction 0 stays empty
    assert split == assign_group_splits(labels, component, 4, fractions, seed)  # deterministic


def test_many_small_groups_keep_the_class_shares_close():
    rng = np.random.default_rng(0)
    labels, groups = [], []
    for c, n in enumerate((1200, 2000, 3000, 400)):  # imbalanced, like the database
        k = 0
        while k < n:
            size = min(int(rng.integers(1, 5)), n - k)  # patients with 1-4 images
            labels += [c] * size
            groups += [len(set(groups)) + 1] * size
            k += size
    split = assign_group_splits(labels, groups, 4, (0.7, 0.15, 0.15), seed=3)
    counts = np.zeros((4, 3))
    for c, s in zip(labels, split):
        counts[c, s] += 1
    shares = counts / counts.sum(axis=1, keepdims=True)
    assert np.abs(shares - np.array([0.7, 0.15, 0.15])).max() < 0.01, shares
    # With singleton groups the rule reaches split_sizes exactly, as the default split does.
    single = assign_group_splits([0] * 40 + [1] * 20, list(range(60)), 2, (0.7, 0.15, 0.15), seed=1)
    assert Counter(single[:40]) == dict(zip((0, 1, 2), split_sizes(40)))
    assert Counter(single[40:]) == dict(zip((0, 1, 2), split_sizes(20)))
    # Another seed places the equal-sized groups differently.
    assert split != assign_group_splits(labels, groups, 4, (0.7, 0.15, 0.15), seed=4)


def test_join_groups_is_a_union_of_names_and_duplicates():
    names = ["a", "b", None, "a", "c", None, "b"]
    # Item 2 (no name) is a duplicate of item 4 ("c"); item 5 of item 6 ("b"); "a" and "c" stay apart.
    comp = join_groups(names, [[2, 4], [5, 6]])
    assert comp == [0, 1, 2, 0, 2, 1, 1]
    assert join_groups(names, [[3, 1]]) == [0, 0, 2, 0, 4, 5, 0]


# ------------------------------------------------------------------------------------ pack --groups


def test_groups_stay_whole_and_the_manifest_records_them(synth_src: Path, tmp_path: Path, capsys):
    src = _src(tmp_path / "src", synth_src)
    rows = _patients()
    groups_csv = _csv(tmp_path / "groups.csv", rows)
    out = tmp_path / "out"
    argv = [str(src), str(out), "--groups", str(groups_csv), "--size", "32", "--min-shards", "1"]
    assert run_main(main, [*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "class shares per split" in printed and "largest gap" in printed and "Viral Pneumonia" in printed

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    split_of = _split_of_paths(out)
    assert len(split_of) == 40  # every image in exactly one split
    group_of = {}
    for name, group in rows:
        c = name.rsplit("-", 1)[0]
        group_of[f"{c}/images/{name}"] = group
    splits_of_group = defaultdict(set)
    for path, split in split_of.items():
        splits_of_group[group_of[path]].add(split)
    assert all(len(s) == 1 for s in splits_of_group.values()), splits_of_group
    # The manifest lists each group in the split that holds its images, and nowhere else.
    for split in SPLITS:
        assert manifest["splits"][split]["groups"] == sorted(
            g for g, s in splits_of_group.items() if s == {split}
        )
    summary = manifest["groups"]
    assert summary["file"] == str(groups_csv.resolve()) and summary["ungrouped"] == "error"
    assert summary["own_groups"] == 0 and summary["joined_by_duplicates"] == []
    assert len(summary["sha256"]) == 64
    assert "--groups" in manifest["command"]
    assert verify(out, workers=1) == []
    # Same input, same seed: the same split; --groups files are part of what decides the bytes.
    again = pack(src, tmp_path / "again", groups=groups_csv, **OPTS)
    assert again["splits"] == manifest["splits"]


def test_images_missing_from_the_csv_are_an_error_unless_own_groups(synth_src: Path, tmp_path: Path):
    src = _src(tmp_path / "src", synth_src)
    rows = _patients()[:-7]  # the last seven Viral Pneumonia images have no row
    groups_csv = _csv(tmp_path / "groups.csv", rows)
    with pytest.raises(
        InputError, match=r"names no group for 7 of 40 images: .*Viral Pneumonia-10\.png"
    ) as e:
        pack(src, tmp_path / "out", groups=groups_csv, **OPTS)
    assert "(2 more)" in str(e.value) and "--ungrouped own-group" in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))

    m = pack(src, tmp_path / "out", groups=groups_csv, ungrouped="own-group", **OPTS)
    assert m["groups"]["own_groups"] == 7 and m["groups"]["ungrouped"] == "own-group"
    assert sum(m["splits"][s]["count"] for s in SPLITS) == 40
    with pytest.raises(InputError, match="--ungrouped only applies with --groups"):
        pack(src, tmp_path / "out2", ungrouped="own-group", **OPTS)


def test_identical_images_join_their_groups(synth_src: Path, tmp_path: Path):
    src = _src(tmp_path / "src", synth_src)
    # COVID-1 (patient "left") is also filed under Normal as another patient's scan ("right").
    shutil.copy(src / "COVID" / "images" / "COVID-1.png", src / "Normal" / "images" / "Normal-99.png")
    patient = {
        "COVID-1.png": "left",
        "COVID-2.png": "left",
        "Normal-5.png": "right",
        "Normal-99.png": "right",
    }
    files = [f"{c}-{i}.png" for c in CLASSES for i in range(1, 11)] + ["Normal-99.png"]
    rows = [(f, patient.get(f, f)) for f in files]  # everyone else: one image, one patient
    groups_csv = _csv(tmp_path / "groups.csv", rows)
    for seed in range(3):
        m = pack(src, tmp_path / "out", groups=groups_csv, seed=seed, force=True, **OPTS)
        split_of = _split_of_paths(tmp_path / "out")
        joined = ["COVID/images/COVID-1.png", "COVID/images/COVID-2.png"]
        joined += ["Normal/images/Normal-5.png", "Normal/images/Normal-99.png"]
        assert len({split_of[p] for p in joined}) == 1, {p: split_of[p] for p in joined}
        assert m["groups"]["joined_by_duplicates"] == [["left", "right"]]
        (dup,) = m["duplicates"]
        assert dup["split"] == split_of["Normal/images/Normal-99.png"]
        assert {"left", "right"} <= set(m["splits"][dup["split"]]["groups"])
    dropped = pack(src, tmp_path / "drop", groups=groups_csv, duplicates="drop", **OPTS)
    assert sum(dropped["splits"][s]["count"] for s in SPLITS) == 40
    assert dropped["groups"]["joined_by_duplicates"] == [["left", "right"]]


def test_csv_rows_paths_ambiguity_and_conflicts(synth_src: Path, tmp_path: Path, capsys):
    src = _src(tmp_path / "src", synth_src, per_class=2)
    shutil.copy(synth_src / "Normal" / "images" / "Normal-3.png", src / "COVID" / "images" / "scan.png")
    shutil.copy(synth_src / "Normal" / "images" / "Normal-4.png", src / "Normal" / "images" / "scan.png")
    base = [(f"{c}-{i}.png", "7") for c in CLASSES for i in (1, 2)]

    with pytest.raises(InputError, match=r"'scan\.png' is ambiguous.*COVID/images/scan\.png and Normal"):
        pack(src, tmp_path / "out", groups=_csv(tmp_path / "a.csv", [*base, ("scan.png", "1")]), **OPTS)

    # Paths relative to SRC resolve it; ids are strings ("007" is not "7"); extra columns and a byte-order
    # mark are fine; a row naming no image is a warning.
    rows = [*base, ("COVID/images/scan.png", "007"), ("Normal\\images\\scan.png", "7"), ("gone.png", "9")]
    path = tmp_path / "b.csv"
    _csv(path, [(f, g, "x") for f, g in rows], header=("file", "group", "age"))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    m = pack(src, tmp_path / "out", groups=path, **OPTS)
    assert "1 row(s) name no image in SRC and are ignored: gone.png" in " ".join(
        capsys.readouterr().err.split()
    )
    listed = [g for s in SPLITS for g in m["splits"][s]["groups"]]
    assert sorted(listed) == ["007", "7"]
    split_of = _split_of_paths(tmp_path / "out")
    assert split_of["Normal/images/scan.png"] == split_of["COVID/images/COVID-1.png"]  # both group "7"

    conflict = _csv(
        tmp_path / "c.csv", [*base, ("COVID/images/scan.png", "1"), ("COVID/images/scan.png", "2")]
    )
    with pytest.raises(InputError, match=r"in group '1' \(line 10\) and in group '2' \(line 11\)"):
        pack(src, tmp_path / "out2", groups=conflict, **OPTS)
    headless = _csv(tmp_path / "d.csv", base, header=("name", "patient"))
    with pytest.raises(InputError, match="must name the columns 'file' and 'group'"):
        pack(src, tmp_path / "out2", groups=headless, **OPTS)
    with pytest.raises(InputError, match="cannot be read"):
        pack(src, tmp_path / "out2", groups=tmp_path / "nowhere.csv", **OPTS)


def test_groups_with_zip_input_use_paths_inside_the_zip(synth_src: Path, tmp_path: Path):
    src = _src(tmp_path / "src", synth_src, per_class=6)
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*.png")):
            zf.write(p, "COVID-19_Radiography_Dataset/" + p.relative_to(src).as_posix())
    rows = [(f"{c}/images/{c}-{i}.png", f"{c}-{(i + 1) // 2}") for c in CLASSES for i in range(1, 7)]
    groups_csv = _csv(tmp_path / "groups.csv", rows)
    from_zip = pack(archive, tmp_path / "zip-out", groups=groups_csv, **OPTS)
    from_dir = pack(src, tmp_path / "dir-out", groups=groups_csv, **OPTS)
    assert from_zip["splits"] == from_dir["splits"]
    split_of = _split_of_paths(tmp_path / "zip-out")
    for c in CLASSES:
        for i in (1, 3, 5):
            assert split_of[f"{c}/images/{c}-{i}.png"] == split_of[f"{c}/images/{c}-{i + 1}.png"]


def test_schema_checks_the_optional_groups_fields(synth_src: Path, tmp_path: Path):
    src = _src(tmp_path / "src", synth_src, per_class=4)
    rows = [(f"{c}-{i}.png", f"p{i}") for c in CLASSES for i in range(1, 5)]
    m = pack(src, tmp_path / "out", groups=_csv(tmp_path / "g.csv", rows), **OPTS)
    validate_manifest(json.loads(json.dumps(m)), "m")

    def broken(change) -> dict:
        bad = json.loads(json.dumps(m))
        change(bad)
        return bad

    a_group = next(g for s in SPLITS for g in m["splits"][s]["groups"])
    home = next(s for s in SPLITS if a_group in m["splits"][s]["groups"])
    other = next(s for s in SPLITS if s != home)
    cases = {
        r"lists group '\w+' in \w+ and in \w+": lambda d: d["splits"][other]["groups"].append(a_group),
        r"lists group '\w+' twice": lambda d: d["splits"][home]["groups"].append(a_group),
        "splits.val.groups must be a list": lambda d: d["splits"]["val"].pop("groups"),
        "groups.ungrouped must be one of": lambda d: d["groups"].update(ungrouped="ignore"),
        "groups must be an object": lambda d: d.update(groups=["p1"]),
        "but the manifest has no top-level groups": lambda d: d.pop("groups"),
        "groups.own_groups must be": lambda d: d["groups"].update(own_groups=-1),
    }
    for message, change in cases.items():
        with pytest.raises(ManifestError, match=message):
            validate_manifest(broken(change), "m")
    plain = broken(lambda d: [d.pop("groups"), *(d["splits"][s].pop("groups") for s in SPLITS)])
    validate_manifest(plain, "m")  # without --groups: no groups fields at all, as before
