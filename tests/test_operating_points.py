"""cxrdist.stats.operating_points: ROC curves against sklearn, chosen thresholds against a brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scoregen import CLASSES, K, fake_probs
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from cxrdist.stats.operating_points import TARGETS, operating_points, roc_curve, roc_curves
from cxrdist.stats.uncertainty import resample_indices


def brute_force(scores: np.ndarray, positive: np.ndarray, measure: str, minimum: float) -> dict:
    """Try every threshold: each distinct score and +inf, positive iff score >= threshold."""
    p, n = positive.sum(), (~positive).sum()
    candidates = []
    for t in [np.inf, *np.unique(scores)]:
        called = scores >= t
        sens = (called & positive).sum() / p
        spec = (n - (called & ~positive).sum()) / n
        candidates.append((t, sens, spec))
    if measure == "specificity":
        ok = [c for c in candidates if c[2] >= minimum]
        t, sens, spec = max(ok, key=lambda c: (c[1], c[2]))  # best sensitivity, then specificity
    else:
        ok = [c for c in candidates if c[1] >= minimum]
        t, sens, spec = max(ok, key=lambda c: (c[2], c[1]))
    return {"threshold": None if np.isinf(t) else float(t), "sensitivity": sens, "specificity": spec}


@pytest.mark.parametrize("decimals", [1, 2, None])  # heavy ties, some ties, none
def test_roc_curve_equals_sklearn(decimals):
    probs, labels = fake_probs(0, 400, decimals=decimals)
    for k in range(K):
        fpr, tpr, thresholds = roc_curve(probs[:, k], labels == k)
        sk_fpr, sk_tpr, sk_thresholds = sk_roc_curve(labels == k, probs[:, k], drop_intermediate=False)
        assert np.array_equal(fpr, sk_fpr) and np.array_equal(tpr, sk_tpr)
        assert np.array_equal(thresholds, sk_thresholds)  # +inf first, as sklearn >= 1.3
        curve = roc_curves(probs, labels, CLASSES)[CLASSES[k]]
        assert curve.auc == pytest.approx(roc_auc_score(labels == k, probs[:, k]), abs=1e-12)


def test_operating_points_equal_brute_force_over_all_thresholds():
    targets = (
        *TARGETS,
        ("specificity", 0.5),
        ("sensitivity", 0.5),
        ("sensitivity", 1.0),
        ("specificity", 1.0),
    )
    checked = 0
    for seed in range(12):
        # Small sets with one decimal: many ties and coarse rates, where the tie rules matter.
        probs, labels = fake_probs(seed, int(np.random.default_rng(seed).integers(8, 80)), decimals=1)
        curves = roc_curves(probs, labels, CLASSES, targets)
        for k, name in enumerate(CLASSES):
            if curves[name] is None:
                continue
            for (measure, minimum), point in zip(targets, curves[name].points):
                expected = brute_force(probs[:, k], labels == k, measure, minimum)
                assert point["target"] == f"{measure}>={minimum:.2f}"
                assert {key: point[key] for key in expected} == expected, (seed, name, measure, minimum)
                assert point[measure] >= minimum
                checked += 1
    assert checked > 300


def test_call_nothing_positive_has_a_null_threshold():
    # The top score is a negative: with 5 negatives, specificity >= 0.90 allows no false positive at all.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    positive = np.array([False, True, True, False, False, False, False])
    probs = np.stack([scores, 1 - scores], 1)
    labels = np.where(positive, 0, 1)
    point = roc_curves(probs, labels, ("a", "b"))["a"].points[0]
    assert point == {"target": "specificity>=0.90", "threshold": None, "sensitivity": 0.0, "specificity": 1.0}


def test_absent_or_only_class_has_no_curve():
    probs, labels = fake_probs(1, 50, present=2)  # classes 2 and 3 absent
    out = operating_points(probs, labels, CLASSES)
    assert out["Normal"] is None and out["Viral Pneumonia"] is None and out["COVID"] is not None
    only = operating_points(probs, np.zeros(50, dtype=np.int64), CLASSES, resamples=10)
    assert all(v is None for v in only.values())


def test_json_shape_and_bootstrap_intervals():
    probs, labels = fake_probs(2, 600, decimals=None)
    out = operating_points(probs, labels, CLASSES, resamples=200, seed=3)
    json.dumps(out, allow_nan=False)
    assert out == operating_points(probs, labels, CLASSES, resamples=200, seed=3)  # deterministic
    covid = out["COVID"]
    assert covid["positives"] == (labels == 0).sum() and covid["negatives"] == (labels != 0).sum()
    assert covid["auc"] == pytest.approx(roc_auc_score(labels == 0, probs[:, 0]), abs=1e-12)
    assert [p["target"] for p in covid["points"]] == [
        "specificity>=0.90",
        "specificity>=0.95",
        "sensitivity>=0.95",
    ]
    for point in covid["points"]:
        for measure in ("sensitivity", "specificity"):
            low, high = point[f"{measure}_interval"]
            assert low <= point[measure] <= high and high - low < 0.2
    # The interval is over the same stratified resamples as the metric intervals, at the fixed threshold.
    point = covid["points"][1]
    idx = resample_indices(labels, 200, seed=3)
    called = probs[:, 0] >= point["threshold"]
    sens = [called[row][labels == 0].mean() for row in idx]  # slot classes never change
    assert point["sensitivity_interval"] == list(np.quantile(sens, [0.025, 0.975]))
    # Without resamples: no interval keys.
    assert "sensitivity_interval" not in operating_points(probs, labels, CLASSES)["COVID"]["points"][0]
