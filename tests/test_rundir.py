"""A run directory belongs to one run: no silent label swap on --resume, no finished run overwritten, no
empty folder left by a failed start, and only exactly named, complete checkpoints resumed from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cxrdist.checkpoint import (
    TRAIN_STATE_FILE,
    ResumeError,
    check_complete,
    latest_checkpoint,
    list_checkpoints,
    required_files,
)
from cxrdist.rundir import manifest_differences

from launch import run_module

RECIPE = "recipes/cnn.toml"


def cnn_sets(run_dir: Path, shards: Path, epochs: int) -> list[str]:
    values = [
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        f"train.epochs={epochs}",
        "train.per_device_batch_size=32",
        "train.mixed_precision=no",
        "data.num_workers=0",
    ]
    return [arg for v in values for arg in ("--set", v)]


# ------------------------------------------------------------------------------------------ checkpoints


def test_only_exactly_named_checkpoints_count(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("epoch-0001", "epoch-0002.bad", ".epoch-0003.tmp", "epoch-0002-plus-000040", "epoch-12"):
        (root / name).mkdir(parents=True)
    (root / "epoch-0004").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0001", "epoch-0002-plus-000040"]
    assert latest_checkpoint(tmp_path).name == "epoch-0002-plus-000040"
    assert list_checkpoints(tmp_path / "nothing") == []


def _fake_checkpoint(path: Path, world_size: int, names: list[str]) -> Path:
    path.mkdir(parents=True)
    (path / TRAIN_STATE_FILE).write_text(json.dumps({"epochs_done": 2, "world_size": world_size}))
    for name in names:
        if name != TRAIN_STATE_FILE:
            (path / name).write_bytes(b"x")
    return path


def test_a_checkpoint_missing_a_ranks_rng_state_is_refused(tmp_path):
    complete = required_files(2, ema=False, scaler=False)
    assert "model.safetensors" in complete and "random_states_1.pkl" in complete
    ckpt = _fake_checkpoint(tmp_path / "epoch-0002", 2, [n for n in complete if n != "random_states_1.pkl"])
    with pytest.raises(ResumeError, match=r"random_states_1\.pkl missing"):
        check_complete(ckpt, world_size=2, ema=False, scaler=False)
    (ckpt / "random_states_1.pkl").write_bytes(b"x")
    assert check_complete(ckpt, world_size=2, ema=False, scaler=False).epochs_done == 2
    with pytest.raises(ResumeError, match="written by 2 rank"):
        check_complete(ckpt, world_size=1, ema=False, scaler=False)
    (ckpt / "model.safetensors").unlink()  # the message names the file Accelerate really writes
    with pytest.raises(ResumeError, match=r"model\.safetensors missing"):
        check_complete(ckpt, world_size=2, ema=False, scaler=False)
    with pytest.raises(ResumeError, match=r"ema\.safetensors"):
        check_complete(_fake_checkpoint(tmp_path / "e", 1, required_files(1, False, False)), 1, True, False)


# -------------------------------------------------------------------------------------- same data


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_manifest_differences_name_what_changed(cnn_shards, tmp_path):
    m = _manifest(cnn_shards)
    assert manifest_differences(m, json.loads(json.dumps(m))) == []
    moved = {**m, "source": "/elsewhere", "command": ["other"]}
    assert manifest_differences(m, moved) == []  # where the shards live does not matter
    swapped = {**m, "classes": [m["classes"][1], m["classes"][0], *m["classes"][2:]]}
    assert "label ids would change" in manifest_differences(m, swapped)[0]
    other = json.loads(json.dumps(m))
    other["splits"]["train"]["shards"][1]["sha256"] = "0" * 64
    assert manifest_differences(m, other) == ["train: other shard checksums (train-000001.tar)"]
    fewer = json.loads(json.dumps(m))
    fewer["splits"]["train"]["shards"] = fewer["splits"]["train"]["shards"][:-1]
    assert manifest_differences(m, fewer)[0].startswith("train: 4 shards of ")


@pytest.mark.slow
def test_resume_refuses_other_data_and_accepts_moved_shards(cnn_shards, train_src, tmp_path):
    from shard_tools.pack import pack

    run_dir = tmp_path / "run"
    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, cnn_shards, 1))
    assert res.returncode == 0, res.stderr[-3000:]
    trained = _manifest(run_dir)

    # The same images, packed with another class order: label ids would mean other classes.
    swapped = tmp_path / "swapped"
    classes = list(reversed(trained["classes"]))
    pack(train_src, swapped, size=trained["image_size"], min_shards=4, classes=classes, progress=False)
    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, swapped, 2), "--resume")
    assert res.returncode == 2, res.stderr[-3000:]
    err = " ".join(res.stderr.split())
    assert "not the data this run trained on" in err and "label ids would change" in err
    assert "Traceback" not in err
    assert _manifest(run_dir) == trained and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1

    # Other shards of the same classes (another split seed): refused, saying which split changed.
    reseeded = tmp_path / "reseeded"
    pack(train_src, reseeded, size=trained["image_size"], min_shards=4, seed=1, progress=False)
    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, reseeded, 2), "--resume")
    assert res.returncode == 2 and "other shard checksums" in res.stderr, res.stderr[-3000:]

    # The same shards moved to another disk: resumes.
    moved = Path(shutil.copytree(cnn_shards, tmp_path / "moved"))
    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, moved, 2), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [json.loads(r)["epoch"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# -------------------------------------------------------------------------------------- overwrite


@pytest.mark.slow
def test_a_finished_run_is_never_overwritten_unless_asked(cnn_shards, tmp_path):
    run_dir = tmp_path / "run"
    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, cnn_shards, 1))
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir / "notes.txt").write_text("my notes")  # a file of the user's: never touched
    shutil.rmtree(run_dir / "checkpoints")  # cleaned up, as keep-last-K or a user would
    best_before = (run_dir / "best" / "model.safetensors").read_bytes()

    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, cnn_shards, 2))
    assert res.returncode == 2, res.stderr[-3000:]
    err = " ".join(res.stderr.split())
    assert "already holds an earlier run" in err and "--overwrite" in err and "Traceback" not in err
    assert (run_dir / "best" / "model.safetensors").read_bytes() == best_before
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1

    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, cnn_shards, 2), "--overwrite")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # started clean, not appended to the old curve
    assert (run_dir / "notes.txt").read_text() == "my notes"

    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, cnn_shards, 2), "--overwrite", "--resume")
    assert res.returncode == 2 and "contradict" in res.stderr


@pytest.mark.slow
def test_a_start_that_fails_leaves_no_run_dir(cnn_shards, tmp_path):
    bad = tmp_path / "bad_shards"
    shutil.copytree(cnn_shards, bad)
    manifest = _manifest(bad)
    manifest["splits"]["train"]["shards"][0]["file"] = "train-000000.tar; touch PWNED #"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    run_dir = tmp_path / "new" / "run"
    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, bad, 1))
    assert res.returncode == 2 and "splits.train.shards[0].file" in res.stderr, res.stderr[-3000:]
    assert not run_dir.exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    res = run_module("cxrdist.train", RECIPE, *cnn_sets(existing, bad, 1))
    assert res.returncode == 2
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]  # its own folder stays, header gone
