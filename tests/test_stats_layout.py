"""The statistics' one home (`cxrdist.stats`): the old module paths still import the same objects, the
registry names exactly what the formulas compute, and the scalar metrics are the vectorised ones."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import cxrdist.distributed
import cxrdist.stats.arrays
import cxrdist.stats.calibration
import cxrdist.stats.metrics
import cxrdist.stats.operating_points
import cxrdist.stats.uncertainty
from cxrdist.stats.formulas import metric_arrays
from cxrdist.stats.registry import AVERAGES, CLASS_KEYS, HEADLINE, SUMMARY_KEYS, label

OLD_PATHS = {
    "cxrdist.metrics": (cxrdist.stats.metrics, cxrdist.distributed),
    "cxrdist.uncertainty": (cxrdist.stats.uncertainty, cxrdist.stats.arrays),
    "cxrdist.calibration": (cxrdist.stats.calibration,),
    "cxrdist.operating_points": (cxrdist.stats.operating_points,),
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_paths_reexport_the_new_homes_objects(old):
    module = importlib.import_module(old)
    assert module.__doc__.startswith("Moved to `cxrdist.")
    for name in module.__all__:
        obj = getattr(module, name)
        if callable(obj):  # a function or class is the very object of its new home, not a copy
            homes = [getattr(home, name, None) for home in OLD_PATHS[old]]
            assert any(obj is h for h in homes), (old, name)


def test_old_constant_names_are_the_registry():
    import cxrdist.uncertainty as old

    assert old.CLASS_METRICS == CLASS_KEYS and old.SUMMARY_METRICS == SUMMARY_KEYS


def test_registry_names_what_the_formulas_compute():
    cm = np.array([[[3, 1], [0, 2]]])
    arrays = metric_arrays(cm, np.array([[0.9, 0.9]]))
    assert tuple(arrays["per_class"]) == CLASS_KEYS
    assert set(SUMMARY_KEYS) <= set(arrays) and set(AVERAGES) <= set(arrays)
    assert set(HEADLINE) <= set(SUMMARY_KEYS)
    assert label("recall") == "recall (sensitivity)" and label("macro_f1") == "macro F1"


def test_summarize_is_the_vectorised_formula_on_one_matrix():
    """The scalar dict and the bootstrap's arrays agree value for value (None where NaN)."""
    from cxrdist.stats.uncertainty import bootstrap_metrics

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 50)  # class 3 absent: left out of the macro averages
    probs = rng.dirichlet(np.ones(4), 50)
    probs[np.arange(50), labels] += 0.3
    probs /= probs.sum(1, keepdims=True)
    p, y = torch.from_numpy(probs), torch.from_numpy(labels)
    scalar = cxrdist.stats.metrics.summarize(
        cxrdist.stats.metrics.confusion_matrix(p.argmax(1), y, 4), ("a", "b", "c", "d"), p, y
    )
    arrays = bootstrap_metrics(probs, labels, np.arange(50)[None])

    def same(value, array_value):
        return (value is None and np.isnan(array_value)) or value == array_value

    for key in SUMMARY_KEYS:
        assert same(scalar[key], arrays[key][0]), key
    for avg in AVERAGES:
        for key in CLASS_KEYS:
            assert same(scalar[avg][key], arrays[avg][key][0]), (avg, key)
    for i, name in enumerate("abcd"):
        for key in CLASS_KEYS:
            assert same(scalar["per_class"][name][key], arrays["per_class"][key][0, i]), (name, key)
    assert scalar["macro_over"] == ["a", "b", "c"]
