"""shard_tools.synth: layout, format, determinism, and classes that are learnable but not trivial."""

from __future__ import annotations

import resource
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SYNTH_PER_CLASS, SYNTH_SIZE_PX
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from shard_tools.cli import run_main
from shard_tools.errors import InputError
from shard_tools.images import load_gray
from shard_tools.schema import CLASSES
from shard_tools.synth import generate, main


def test_writes_the_database_layout_in_8bit_gray(synth_src):
    for c in CLASSES:
        files = sorted((synth_src / c / "images").iterdir())
        assert len(files) == SYNTH_PER_CLASS
        assert {f.name for f in files} == {f"{c}-{i}.png" for i in range(1, SYNTH_PER_CLASS + 1)}
    with Image.open(synth_src / "Viral Pneumonia" / "images" / "Viral Pneumonia-1.png") as im:
        assert im.mode == "L" and im.size == (SYNTH_SIZE_PX, SYNTH_SIZE_PX)
        pixels = np.asarray(im)
    assert pixels.min() < 40 and pixels.max() > 200  # dark air outside the body, bright bone and tissue
    assert not list(synth_src.parent.glob(".*"))  # no temporary folder left behind


def test_same_seed_same_bytes_for_any_worker_count(tmp_path):
    a = generate(tmp_path / "a", per_class=9, size=64, seed=3, workers=1)
    b = generate(tmp_path / "b", per_class=9, size=64, seed=3, workers=2)
    c = generate(tmp_path / "c", per_class=9, size=64, seed=4, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 36
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert sum((a / f).read_bytes() != (c / f).read_bytes() for f in files) == 36


def test_force_replaces_only_an_earlier_synth_output(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="not empty"):
        generate(out, per_class=1, size=64)
    assert run_main(main, [str(out), "--per-class", "1", "--size", "64"]) == 2
    assert "pass --force" in capsys.readouterr().err
    # Contract since the --force fix: a folder holding anything but synth's images is never replaced.
    assert run_main(main, [str(out), "--per-class", "1", "--size", "64", "--force"]) == 2
    err = capsys.readouterr().err
    assert "--force would delete" in err and "mine.txt" in err
    assert (out / "mine.txt").read_text() == "keep"

    (out / "mine.txt").unlink()
    assert run_main(main, [str(out), "--per-class", "2", "--size", "64"]) == 0
    assert run_main(main, [str(out), "--per-class", "1", "--size", "64", "--force"]) == 0
    assert sorted(p.name for p in out.rglob("*.png")) == sorted(f"{c}-1.png" for c in CLASSES)
    (out / "Normal" / "images" / "notes.txt").write_text("mine")
    assert run_main(main, [str(out), "--per-class", "1", "--size", "64", "--force"]) == 2
    assert "Normal/images/notes.txt" in capsys.readouterr().err
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind


def test_bad_options_exit_2_with_one_line(tmp_path, capsys):
    assert run_main(main, [str(tmp_path / "out"), "--size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--size must be >= 32" in err
    assert not (tmp_path / "out").exists()


def test_classes_are_learnable_but_not_trivial(synth_src):
    # A linear model on 16 x 16 thumbnails: well above chance (0.25), far from perfect.
    x, y = [], []
    for label, c in enumerate(CLASSES):
        for i in range(1, SYNTH_PER_CLASS + 1):
            x.append(load_gray(synth_src / c / "images" / f"{c}-{i}.png", 16).ravel() / 255.0)
            y.append(label)
    accuracy = cross_val_score(LogisticRegression(max_iter=3000), np.array(x), np.array(y), cv=4).mean()
    assert 0.4 < accuracy < 0.9, accuracy


@pytest.mark.slow
def test_full_disk_exits_1_with_one_line_and_leaves_nothing(tmp_path):
    def limit_file_size() -> None:  # `ulimit -f`: writes past 20 kB fail with EFBIG, as ENOSPC would
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "shard_tools.synth", str(out), "--per-class", "2", "--workers", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_file_size,
    )
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot write OUT {out}: File too large" in lines[0], res.stderr
    assert list(tmp_path.iterdir()) == []  # no OUT, no staging folder
