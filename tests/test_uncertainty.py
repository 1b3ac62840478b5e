"""cxrdist.stats.uncertainty: the stratified bootstrap against sklearn on the same resamples, intervals."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from scoregen import CLASSES, K, fake_probs
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

import cxrdist.stats.uncertainty as unc
from cxrdist.stats.metrics import confusion_matrix, summarize
from cxrdist.stats.registry import CLASS_KEYS, SUMMARY_KEYS
from cxrdist.stats.uncertainty import (
    bootstrap_intervals,
    bootstrap_metrics,
    percentile_interval,
    resample_blocks,
    resample_indices,
)

_case = functools.partial(fake_probs, dtype=np.float32)  # float32, as evaluation's softmax gives them


def _summary(probs: np.ndarray, labels: np.ndarray) -> dict:
    p, y = torch.from_numpy(probs), torch.from_numpy(labels)
    return summarize(confusion_matrix(p.argmax(1), y, K), CLASSES, p, y)


def _same(ours: float, theirs) -> bool:
    """NaN (undefined) matches NaN; numbers match to the last bits of float rounding."""
    if np.isnan(ours) or theirs is None or np.isnan(theirs):
        return (np.isnan(ours)) and (theirs is None or np.isnan(theirs))
    return abs(ours - theirs) <= 1e-12


def test_resamples_are_stratified_and_reproducible():
    _, labels = _case(0, 200)
    idx = resample_indices(labels, 30, seed=5)
    assert idx.shape == (30, 200) and idx.dtype == np.int64
    assert (labels[idx] == labels).all()  # every resample keeps each slot's class: same support
    assert np.array_equal(idx, resample_indices(labels, 30, seed=5))
    assert not np.array_equal(idx, resample_indices(labels, 30, seed=6))
    # Draws with replacement: some samples repeat, some are left out.
    assert all(len(np.unique(row)) < 200 for row in idx)
    # Row r depends neither on how many resamples are drawn nor on how they are split into blocks.
    assert np.array_equal(resample_indices(labels, 12, seed=5), idx[:12])
    assert np.array_equal(np.concatenate(list(resample_blocks(labels, 30, seed=5, block=7))), idx)


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn's note on a class absent from a resample
def test_bootstrap_distribution_equals_sklearn_on_the_same_indices():
    # A weak model on 120 samples with class 3 predicted 4 times: some resamples never predict it, so
    # its precision is undefined there (sklearn: NaN with zero_division=np.nan; here: NaN).
    probs, labels = _case(1, 120, signal=0.4)
    probs[:, 3] *= 0.4
    idx = resample_indices(labels, 50, seed=11)
    dist = bootstrap_metrics(probs, labels, idx)
    ids = list(range(K))
    undefined = 0
    for r in range(50):
        y, p = labels[idx[r]], probs[idx[r]]
        pred = p.argmax(1)
        assert dist["accuracy"][r] == accuracy_score(y, pred)
        assert _same(dist["balanced_accuracy"][r], balanced_accuracy_score(y, pred))
        for avg in ("macro", "weighted"):
            assert _same(dist[avg]["f1"][r], f1_score(y, pred, labels=ids, average=avg, zero_division=np.nan))
        prec, rec, f1, _ = precision_recall_fscore_support(y, pred, labels=ids, zero_division=np.nan)
        cm = sk_confusion_matrix(y, pred, labels=ids)
        for k in ids:
            assert _same(dist["per_class"]["precision"][r, k], prec[k]), (r, k)
            assert _same(dist["per_class"]["recall"][r, k], rec[k])
            assert _same(dist["per_class"]["f1"][r, k], f1[k])
            negatives = np.delete(np.delete(cm, k, 0), k, 1).sum()  # true and predicted not k
            spec = negatives / (len(y) - cm[k].sum())
            assert _same(dist["per_class"]["specificity"][r, k], spec)
            assert _same(dist["per_class"]["roc_auc"][r, k], roc_auc_score(y == k, p[:, k]))
        undefined += int(np.isnan(prec[3]))
        # Macro and weighted precision, specificity, ROC-AUC: summarize's rules on the resampled arrays.
        s = _summary(p, y)
        for avg in ("macro", "weighted"):
            for m in CLASS_KEYS:
                expected = s[avg][m]
                assert _same(dist[avg][m][r], np.nan if expected is None else expected), (avg, m)
    assert 0 < undefined < 50  # the case really exercises undefined values


def test_identity_resample_reproduces_summarize():
    probs, labels = _case(2, 300, present=3)  # class 3 absent: its recall, F1 and AUC are undefined
    dist = bootstrap_metrics(probs, labels, np.arange(300)[None])
    s = _summary(probs, labels)

    def check(ours, theirs):
        assert _same(float(ours), np.nan if theirs is None else theirs), (ours, theirs)

    for m in SUMMARY_KEYS:
        check(dist[m][0], s[m])
    for k, name in enumerate(CLASSES):
        for m in CLASS_KEYS:
            check(dist["per_class"][m][0, k], s["per_class"][name][m])
    for avg in ("macro", "weighted"):
        for m in CLASS_KEYS:
            check(dist[avg][m][0], s[avg][m])


def _intervals_and_points(intervals: dict, summary: dict):
    """Every (interval, point estimate) pair of the two dicts, by the same keys."""
    for m in SUMMARY_KEYS:
        yield m, intervals[m], summary[m]
    for name in CLASSES:
        for m in CLASS_KEYS:
            yield f"{name}.{m}", intervals["per_class"][name][m], summary["per_class"][name][m]
    for avg in ("macro", "weighted"):
        for m in CLASS_KEYS:
            yield f"{avg}.{m}", intervals[avg][m], summary[avg][m]


def _width(interval) -> float:
    return interval[1] - interval[0]


def test_intervals_contain_the_estimate_and_shrink_with_more_samples():
    results = {}
    for n in (200, 2000):
        probs, labels = _case(3, n, decimals=None)
        intervals = bootstrap_intervals(probs, labels, CLASSES, resamples=400, seed=0)
        summary = _summary(probs, labels)
        for key, interval, point in _intervals_and_points(intervals, summary):
            assert interval is not None and point is not None, key
            assert interval[0] <= point <= interval[1], (n, key, interval, point)
        results[n] = intervals
    small, large = results[200], results[2000]
    # Ten times the samples: about sqrt(10) = 3.2 times narrower.
    for m in SUMMARY_KEYS:
        assert _width(large[m]) < _width(small[m]) / 2, m
    for name in CLASSES:
        for m in CLASS_KEYS:
            assert _width(large["per_class"][name][m]) < _width(small["per_class"][name][m]) / 1.8, (name, m)


def test_same_seed_same_intervals_and_settings_recorded():
    probs, labels = _case(4, 150)
    first = bootstrap_intervals(probs, labels, CLASSES, resamples=100, seed=7)
    assert first == bootstrap_intervals(
        torch.from_numpy(probs), torch.from_numpy(labels), CLASSES, resamples=100, seed=7
    )
    assert first != bootstrap_intervals(probs, labels, CLASSES, resamples=100, seed=8)
    assert first["settings"] == {
        "resamples": 100,
        "seed": 7,
        "level": 0.95,
        "method": "stratified percentile bootstrap",
        "max_undefined_share": 0.05,
    }
    json.dumps(first, allow_nan=False)
    assert bootstrap_intervals(probs, labels, CLASSES, resamples=0) is None
    # Narrower level, narrower interval.
    narrow = bootstrap_intervals(probs, labels, CLASSES, resamples=100, seed=7, level=0.5)
    assert _width(narrow["accuracy"]) < _width(first["accuracy"])


def test_intervals_are_the_percentiles_of_the_distribution_whatever_the_block_size(monkeypatch):
    probs, labels = _case(5, 100)
    dist = bootstrap_metrics(probs, labels, resample_indices(labels, 60, seed=1))
    expected = list(np.quantile(dist["per_class"]["roc_auc"][:, 2], [0.025, 0.975]))
    default = bootstrap_intervals(probs, labels, CLASSES, resamples=60, seed=1)
    assert default["per_class"]["Normal"]["roc_auc"] == expected
    monkeypatch.setattr(unc, "_BLOCK_ELEMENTS", 700)  # blocks of 7 resamples
    assert bootstrap_intervals(probs, labels, CLASSES, resamples=60, seed=1) == default


def test_undefined_rule():
    values = np.linspace(0, 1, 100)
    assert percentile_interval(values) == pytest.approx([0.025, 0.975])
    values[:5] = np.nan  # 5% undefined: still an interval, over the defined 95
    assert percentile_interval(values) is not None
    values[5] = np.nan  # 6%: none
    assert percentile_interval(values) is None
    assert percentile_interval(np.array([])) is None

    # Class 3 predicted once, class 2 never: the point precision of 3 is defined, its interval is not
    # (a resample misses that one sample with probability ~ 1/e); precision of 2 is None throughout.
    labels = np.repeat(np.arange(K), 10)
    preds = labels.copy()
    preds[labels == 2] = 0
    preds[labels == 3] = 1
    preds[0] = 3  # a COVID image called Viral Pneumonia: the only prediction of class 3
    probs = np.eye(K, dtype=np.float32)[preds]
    summary = _summary(probs, labels)
    assert summary["per_class"]["Viral Pneumonia"]["precision"] == 0.0
    assert summary["per_class"]["Normal"]["precision"] is None
    intervals = bootstrap_intervals(probs, labels, CLASSES, resamples=200)
    assert intervals["per_class"]["Viral Pneumonia"]["precision"] is None
    assert intervals["per_class"]["Normal"]["precision"] is None
    assert intervals["per_class"]["Normal"]["recall"] == [0.0, 0.0]  # defined, never right
    assert intervals["per_class"]["COVID"]["recall"] is not None


def test_inputs_are_checked():
    probs, labels = _case(6, 20)
    with pytest.raises(ValueError, match="outside 0..3"):
        bootstrap_intervals(probs, labels + 1, CLASSES)
    with pytest.raises(ValueError, match="columns for 3 classes"):
        bootstrap_intervals(probs, labels, CLASSES[:3])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_intervals(probs, labels, CLASSES, resamples=-1)
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals(probs, labels, CLASSES, level=1.0)
    probs[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_intervals(probs, labels, CLASSES)
