"""Recipes load into typed, frozen dataclasses; every mistake is a ConfigError naming file and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrdist.config import Config, ConfigError, config_from_dict, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


def test_the_four_study_recipes_and_the_demo_exist():
    names = {p.stem for p in RECIPES}
    assert {"cnn", "cnn_augmented", "resnet18_scratch", "resnet18_pretrained", "demo"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)
    assert cfg.run.dir and cfg.data.shards


def test_study_recipes_say_what_the_study_did():
    cnn = load_config(ROOT / "recipes/cnn.toml")
    assert (cnn.model.name, cnn.optim.name, cnn.optim.lr, cnn.optim.momentum) == (
        "seed_cnn",
        "sgd",
        0.01,
        0.9,
    )
    assert cnn.train.loss == "nll" and not cnn.augment.enabled
    assert load_config(ROOT / "recipes/cnn_augmented.toml").augment.enabled
    pre = load_config(ROOT / "recipes/resnet18_pretrained.toml")
    assert (pre.model.name, pre.model.pretrained, pre.optim.name, pre.optim.lr) == (
        "resnet18",
        True,
        "adam",
        3e-5,
    )
    assert pre.train.loss == "cross_entropy"
    assert not load_config(ROOT / "recipes/resnet18_scratch.toml").model.pretrained


def test_required_override_keys_exist_and_apply():
    cfg = load_config(
        ROOT / "recipes/demo.toml",
        [
            "run.dir=/tmp/x",
            "data.shards=http://127.0.0.1:8000/shards/",
            "train.epochs=2",
            "train.per_device_batch_size=8",
            "train.mixed_precision=no",
            "run.seed=7",
            "augment.crop_scale=[0.8, 1.0]",
        ],
    )
    assert cfg.run.dir == "/tmp/x"
    assert cfg.data.shards == "http://127.0.0.1:8000/shards/"
    assert (cfg.train.epochs, cfg.train.per_device_batch_size, cfg.train.mixed_precision) == (2, 8, "no")
    assert cfg.run.seed == 7
    assert cfg.augment.crop_scale == (0.8, 1.0)


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_round_trip_through_dict():
    cfg = load_config(ROOT / "recipes/resnet18_pretrained.toml")
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[train]\nepochz = 3\n", ["bad.toml", "train.epochz", "epochs"]),
        ("[trian]\nepochs = 3\n", ["bad.toml", "[trian]", "train"]),
        ('[train]\nepochs = "three"\n', ["bad.toml", "[train] epochs", "integer"]),
        ("[train]\nepochs = 0\n", ["bad.toml", "[train] epochs", ">= 1"]),
        ('[train]\nmixed_precision = "fp8"\n', ["bad.toml", "mixed_precision", "'bf16'"]),
        ("[optim]\nlr = 0\n", ["bad.toml", "[optim] lr", "> 0"]),
        ("[augment]\nenabled = 1\n", ["bad.toml", "[augment] enabled", "true or false"]),
        ("[train\nepochs = 3\n", ["bad.toml", "not valid TOML"]),
        ("train = 3\n", ["bad.toml", "[train] must be a table"]),
    ],
)
def test_broken_recipe_names_file_and_key(tmp_path, text, expected):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    for fragment in expected:
        assert fragment in str(info.value)


def test_missing_recipe_and_bad_override():
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config("/nonexistent/recipe.toml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        load_config(None, ["train.nope=1"])


_toml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
_section_names = st.sampled_from(
    ["run", "data", "augment", "model", "optim", "train", "eval", "dist", "x"]
) | st.text(max_size=6)
_key_names = st.sampled_from(
    [
        "dir",
        "seed",
        "shards",
        "epochs",
        "lr",
        "name",
        "enabled",
        "crop_scale",
        "log_with",
        "timeout_s",
        "channels_last",
        "lr_base_batch",
        "bootstrap_resamples",
        "in_chans",
        "lung_focus",
        "border_erase",
        "border_erase_width",
        "border_erase_fill",
    ]
) | st.text(max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_section_names, st.dictionaries(_key_names, _toml_values, max_size=4) | _toml_values))
def test_fuzzed_recipes_only_ever_raise_config_error(data):
    try:
        config_from_dict(data, "fuzz.toml")
    except ConfigError as e:
        assert str(e).startswith("fuzz.toml")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_fuzzed_overrides_only_ever_raise_config_error(items):
    try:
        load_config(None, items)
    except ConfigError as e:
        assert str(e)


@pytest.mark.parametrize("value", ["[2.0, -1.0]", "[0.5]", "[0.9, 0.5]", "[0.0, 1.0]"])
def test_crop_scale_is_checked_when_the_recipe_loads(value):
    """Not at the first training step, minutes later: a config error naming the key."""
    with pytest.raises(
        ConfigError, match=r"\[augment\] crop_scale: must be \[lo, hi\] with 0 < lo <= hi <= 1"
    ):
        load_config(None, [f"augment.crop_scale={value}"])


def test_the_seed_is_a_whole_number_of_at_least_zero():
    """numpy's generators (the bootstrap) refuse negative seeds: refuse them when the recipe loads."""
    with pytest.raises(ConfigError, match=r"\[run\] seed: must be >= 0"):
        load_config(None, ["run.seed=-1"])
