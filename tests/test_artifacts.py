"""Run artifacts: atomic writes with normal permissions, the exported model directory, finding models."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest
import torch

import cxrdist
from cxrdist.artifacts import (
    ModelDirError,
    ModelMeta,
    export_model,
    find_model_dir,
    git_commit,
    load_model_files,
    model_meta,
    provenance,
)
from cxrdist.augment import normalize_stats
from shard_tools.files import atomic_write_json

from launch import ROOT


def test_atomic_write_leaves_one_file_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a" / "x.json", {"b": 1})
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "a/x.json").read_text()) == {"b": 1}
    assert os.listdir(tmp_path / "a") == ["x.json"]
    assert stat.S_IMODE((tmp_path / "a/x.json").stat().st_mode) == 0o644


def _meta(epoch: int) -> dict:
    return {
        "model": {"name": "seed_cnn", "in_chans": 3},
        "classes": ["A", "B"],
        "image_size": 128,
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]},
        "epoch": epoch,
    }


def test_export_replaces_the_whole_directory_and_loads_back(tmp_path):
    best = tmp_path / "run" / "best"
    export_model({"w": torch.zeros(2, 3).t()}, _meta(1), best)  # a non-contiguous tensor
    export_model({"w": torch.ones(3, 2)}, _meta(2), best)
    weights, meta = load_model_files(find_model_dir(tmp_path / "run"))
    assert torch.equal(weights["w"], torch.ones(3, 2))
    assert meta.data["epoch"] == 2 and meta.classes == ("A", "B") and meta.image_size == 128
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best"]
    assert stat.S_IMODE(best.stat().st_mode) & 0o055 == 0o055  # readable by others, like mkdir's


def test_find_model_dir_errors_name_the_path(tmp_path):
    with pytest.raises(ModelDirError, match="no such run"):
        find_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="model.safetensors"):
        find_model_dir(tmp_path / "empty")
    export_model({"w": torch.ones(1)}, {"model": {}}, tmp_path / "bad")
    with pytest.raises(ModelDirError, match="not a cxrdist meta.json"):
        load_model_files(tmp_path / "bad")


@pytest.mark.slow  # asks git itself
def test_provenance_names_version_and_commit():
    """In a git checkout the commit is HEAD's (as git itself says), never the fallback."""
    prov = provenance()
    assert prov["cxrdist_version"] == cxrdist.__version__ and prov["torch_version"] == torch.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout: the fallback is tested below")
    sha, _, dirty = prov["git_commit"].partition("-")
    assert sha == head.stdout.strip() and dirty in ("", "dirty"), prov["git_commit"]


def test_provenance_outside_git_says_unknown(tmp_path, monkeypatch):
    package = tmp_path / "site" / "cxrdist"  # an installed copy: no repository around it
    package.mkdir(parents=True)
    monkeypatch.setattr(cxrdist, "__file__", str(package / "__init__.py"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git must not find one further up
    assert git_commit() == "unknown"


def test_model_meta_is_what_model_meta_reads():
    """The writer (`model_meta`, used by training) and the reader (`ModelMeta.from_dict`) agree."""
    training = {"epoch": 4, "ema": True, "best_metric": "macro_f1", "val_metrics": {"macro_f1": 0.5}}
    data = json.loads(json.dumps(model_meta("seed_cnn", 1, ("a", "b"), 112, training)))  # as on disk
    meta = ModelMeta.from_dict(data, "meta.json")
    assert (meta.model_name, meta.in_chans, meta.classes, meta.image_size) == ("seed_cnn", 1, ("a", "b"), 112)
    assert (meta.mean, meta.std) == tuple(map(tuple, normalize_stats(1))) and meta.temperature is None
    assert {k: data[k] for k in training} == training and data["provenance"] == provenance()
