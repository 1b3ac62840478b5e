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
