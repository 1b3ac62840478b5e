"""Run artifacts: atomic writes with normal permissions, the exported model directory, finding models."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from cxrdist.artifacts import (
    ModelDirError,
    export_model,
    find_model_dir,
    load_model_files,
    provenance,
)
from shard_tools.files import atomic_write_json


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


def test_provenance_names_version_and_commit():
    prov = provenance()
    assert prov["cxrdist_version"] and prov["torch_version"] == torch.__version__
    assert prov["git_commit"] == "unknown" or len(prov["git_commit"].split("-")[0]) == 40
