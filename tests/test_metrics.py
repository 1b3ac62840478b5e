"""cxrdist.stats.metrics against scikit-learn on the same predictions, single process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scoregen import CLASSES, K
from sklearn.metrics import (
    balanced_accuracy_score,
    classification_report,
    recall_score,
    roc_auc_score,
)
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from cxrdist.distributed import all_reduce_sum, gather_rows
from cxrdist.stats.metrics import confusion_matrix, roc_auc_ovr, summarize


def _close(ours, theirs):
    """None matches sklearn's NaN (undefined); numbers match to float rounding."""
    if ours is None:
        return theirs is None or np.isnan(theirs)
    return theirs is not None and not np.isnan(theirs) and abs(ours - theirs) < 1e-9


def check_against_sklearn(metrics: dict, labels: np.ndarray, preds: np.ndarray, probs: np.ndarray) -> None:
    """Every metric in `metrics` equals scikit-learn's on the same labels, predictions and scores."""
    ids = list(range(K))
    report = classification_report(labels, preds, labels=ids, zero_division=np.nan, output_dict=True)
    assert metrics["confusion_matrix"] == sk_confusion_matrix(labels, preds, labels=ids).tolist()
    assert metrics["num_samples"] == len(labels)
    assert _close(metrics["accuracy"], float(np.mean(labels == preds)))
    assert _close(metrics["balanced_accuracy"], balanced_accuracy_score(labels, preds))
    for i, name in enumerate(CLASSES):
        ours, theirs = metrics["per_class"][name], report[str(i)]
        assert _close(ours["precision"], theirs["precision"]), (name, ours, theirs)
        assert _close(ours["recall"], theirs["recall"]), (name, ours, theirs)
        assert _close(ours["f1"], theirs["f1-score"]), (name, ours, theirs)
        assert ours["support"] == theirs["support"]
        # Specificity is the recall of "not this class".
        negatives = labels != i
        expected = recall_score(negatives, preds != i, zero_division=np.nan) if negatives.any() else None
        assert _close(ours["specificity"], expected)
        has_both = 0 < (labels == i).sum() < len(labels)
        expected_auc = roc_auc_score(labels == i, probs[:, i]) if has_both else None
        assert _close(ours["roc_auc"], expected_auc), (name, ours["roc_auc"], expected_auc)
    # Macro averages leave classes without samples out: sklearn's, given only the classes present.
    present = sorted(set(labels.tolist()))
    assert metrics["macro_over"] == [CLASSES[i] for i in present]
    over_present = classification_report(
        labels, preds, labels=present, zero_division=np.nan, output_dict=True
    )
    for avg, theirs in (("macro", over_present["macro avg"]), ("weighted", report["weighted avg"])):
        assert _close(metrics[avg]["precision"], theirs["precision"]), (avg, metrics[avg], theirs)
        assert _close(metrics[avg]["recall"], theirs["recall"])
        assert _close(metrics[avg]["f1"], theirs["f1-score"])
    specificities = [metrics["per_class"][CLASSES[i]]["specificity"] for i in present]
    defined = [v for v in specificities if v is not None]
    assert _close(metrics["macro"]["specificity"], float(np.mean(defined)) if defined else None)
    assert metrics["macro_f1"] == metrics["macro"]["f1"]
    assert metrics["weighted_f1"] == metrics["weighted"]["f1"]
    if len(np.unique(labels)) == K:  # sklearn's multi-class AUC needs every class present
        for avg in ("macro", "weighted"):
            expected = roc_auc_score(labels, probs, multi_class="ovr", average=avg, labels=ids)
            assert _close(metrics[avg]["roc_auc"], expected)
    json.dumps(metrics, allow_nan=False)  # JSON-able, no NaN


def _random_case(rng: np.random.Generator, n: int, present: int):
    labels = rng.integers(0, present, n)
    # Integer logits: many tied scores, which AUC must handle like sklearn; softmax keeps rows summing to 1.
    logits = rng.integers(0, 3, size=(n, K)) + 2 * np.eye(K)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    preds = probs.argmax(1)
    return labels, preds, probs


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn's notes on absent classes
@settings(max_examples=60, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), present=st.integers(1, K))
def test_summarize_matches_sklearn(seed, n, present):
    labels, preds, probs = _random_case(np.random.default_rng(seed), n, present)
    cm = confusion_matrix(torch.from_numpy(preds), torch.from_numpy(labels), K)
    metrics = summarize(cm, CLASSES, torch.from_numpy(probs), torch.from_numpy(labels))
    check_against_sklearn(metrics, labels, preds, probs)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_zero_support_class_is_null_not_nan():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 0])  # class 3 never true, never predicted
    probs = torch.nn.functional.one_hot(preds, K).float()
    metrics = summarize(confusion_matrix(preds, labels, K), CLASSES, probs, labels)
    absent = metrics["per_class"]["Viral Pneumonia"]
    assert absent == {
        "precision": None,
        "recall": None,
        "specificity": 1.0,
        "f1": None,
        "support": 0,
        "roc_auc": None,
    }
    assert metrics["macro"]["recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)  # over the 3 defined classes
    # The absent class's trivial specificity of 1.0 is not averaged in (issue 21; with it: 0.875).
    spec = [metrics["per_class"][c]["specificity"] for c in CLASSES[:3]]
    assert metrics["macro"]["specificity"] == pytest.approx(sum(spec) / 3) and sum(spec) / 3 < 0.87
    assert metrics["macro_over"] == list(CLASSES[:3])
    check_against_sklearn(metrics, labels.numpy(), preds.numpy(), probs.numpy())


def test_empty_matrix_is_all_null():
    metrics = summarize(torch.zeros(K, K, dtype=torch.int64), CLASSES)
    assert metrics["accuracy"] is None and metrics["macro_f1"] is None and metrics["weighted"]["f1"] is None
    json.dumps(metrics, allow_nan=False)


def test_roc_auc_ties_and_single_class():
    labels = torch.tensor([0, 0, 1, 1])
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.2, 0.8]])
    aucs = roc_auc_ovr(probs, labels, 2)
    assert aucs == pytest.approx(
        [roc_auc_score(labels == 0, probs[:, 0]), roc_auc_score(labels == 1, probs[:, 1])]
    )
    assert aucs[1] == pytest.approx(0.75)
    assert roc_auc_ovr(probs, torch.tensor([1, 1, 1, 1]), 2) == [None, None]


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="outside 0..3"):
        confusion_matrix(torch.tensor([4]), torch.tensor([0]), K)
    with pytest.raises(ValueError, match="expected \\(4, 4\\)"):
        summarize(torch.zeros(3, 3, dtype=torch.int64), CLASSES)
    cm = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), K)
    with pytest.raises(ValueError, match="same samples"):
        summarize(cm, CLASSES, torch.full((2, K), 0.25), torch.tensor([0, 2]))


def test_collectives_are_copies_without_a_process_group():
    t = torch.arange(6).reshape(3, 2)
    assert torch.equal(all_reduce_sum(t), t) and all_reduce_sum(t) is not t
    assert torch.equal(gather_rows(t), t)
