"""Shared fixtures: a tiny synthetic database, its shards, and the real sample's location.

Session-scoped and cheap (about two seconds together): tests that change them must copy them first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_SAMPLE = REPO / "../shared/data/cxr-real-sample/COVID-19_Radiography_Dataset"

SYNTH_PER_CLASS = 40  # 28 / 6 / 6 per class with the default 70/15/15 split
SYNTH_SIZE_PX = 299  # as the database
SHARDS_SIZE_PX = 64
SHARDS_MIN_SHARDS = 4


@pytest.fixture(scope="session")
def synth_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`SRC/<Class>/images/<Class>-<i>.png`, 40 per class, 299 px 8-bit gray (read-only by convention)."""
    from shard_tools.synth import generate

    return generate(tmp_path_factory.mktemp("synth") / "src", per_class=SYNTH_PER_CLASS, size=SYNTH_SIZE_PX)


@pytest.fixture(scope="session")
def synth_shards(synth_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`synth_src` packed at 64 px with 4 train shards and the default split: the OUT folder."""
    from shard_tools.pack import pack

    out = tmp_path_factory.mktemp("shards") / "out"
    pack(synth_src, out, size=SHARDS_SIZE_PX, min_shards=SHARDS_MIN_SHARDS, progress=False)
    return out


@pytest.fixture(scope="session")
def real_sample_dir() -> Path:
    """The 800 real radiographs (COVID and Normal, 224 px RGB-saved); skips the test when absent."""
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"real sample not found at {REAL_SAMPLE}")
    return REAL_SAMPLE.resolve()


# Training fixtures: enough images that a model learns in seconds (chance is 25%), still tiny.
TRAIN_PER_CLASS = 120  # 84 / 18 / 18 per class
TRAIN_SIZE_PX = 64  # timm models (test_resnet, resnet18)
CNN_SIZE_PX = 112  # the study's seed CNN flattens to 16 features only for 100-163 px inputs


@pytest.fixture(scope="session")
def train_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shard_tools.synth import generate

    return generate(tmp_path_factory.mktemp("train_synth") / "src", per_class=TRAIN_PER_CLASS, size=160)


@pytest.fixture(scope="session")
def train_shards(train_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shard_tools.pack import pack

    out = tmp_path_factory.mktemp("train_shards") / "out"
    pack(train_src, out, size=TRAIN_SIZE_PX, min_shards=4, progress=False)
    return out


@pytest.fixture(scope="session")
def cnn_shards(train_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shard_tools.pack import pack

    out = tmp_path_factory.mktemp("cnn_shards") / "out"
    pack(train_src, out, size=CNN_SIZE_PX, min_shards=4, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run directory of the tiny model (used by evaluate, predict and explain tests)."""
    from launch import fast_overrides, run_module

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    res = run_module("cxrdist.train", "recipes/demo.toml", *fast_overrides(run_dir, train_shards, 4))
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir
