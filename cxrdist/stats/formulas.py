"""The one definition of every classification metric: numpy, vectorised over a batch of confusion
matrices, NaN where a value is undefined.

`cxrdist.stats.metrics.summarize` applies it to the one matrix of a split (NaN becomes None, JSON null);
`cxrdist.stats.uncertainty` to every bootstrap resample at once. Confusion matrices are int ``(B, K, K)``:
``cm[b, t, p]`` = samples of true class t predicted p in batch entry b.

Where scikit-learn defines a metric the value is the one it gives with ``zero_division=np.nan``:

- precision of a class never predicted, recall of a class with zero support: undefined;
- F1 = 2 TP / (2 TP + FP + FN), so it is 0, not undefined, when a class has predictions or support but
  no true positive, and undefined only when it has neither;
- specificity (TN / (TN + FP), no sklearn function) is the recall of "not this class";
- ROC-AUC: one-vs-rest per class, exact (ties count one half, as `sklearn.metrics.roc_auc_score`),
  undefined when the class is absent or is the only class present;
- macro averages: the plain mean of the defined per-class values over the classes WITH samples
  (support > 0; `summarize` lists them as ``macro_over``). A class with no samples has no sensitivity,
  and its specificity (1.0 when never predicted) or precision would only dilute the average; sklearn
  matches with ``labels=`` those classes. Balanced accuracy is the macro recall;
- weighted averages: weighted by support over the classes whose value is defined, or their plain mean
  when all those have zero support (sklearn's `_nanaverage`).
"""

from __future__ import annotations

import numpy as np


def divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0 (undefined), without warnings."""
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def mean_defined(values: np.ndarray, included: np.ndarray | bool = True) -> np.ndarray:
    """Mean over the last axis of the defined (non-NaN) values where `included`; NaN where none is."""
    used = ~np.isnan(values) & included
    return divide(np.where(used, values, 0.0).sum(-1), used.sum(-1))


def weighted_mean(values: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Support-weighted mean of the defined values; their plain mean where those have zero support."""
    defined = ~np.isnan(values)
    weights = np.where(defined, support, 0)
    total = weights.sum(-1)
    weighted = divide(np.where(defined, values * support, 0.0).sum(-1), total)
    return np.where(total > 0, weighted, mean_defined(values))


def confusion_matrices(labels: np.ndarray, preds: np.ndarray, indices: np.ndarray, k: int) -> np.ndarray:
    """int64 ``(B, K, K)``: the confusion matrix of each row of `indices` ``(B, M)`` (sample ids)."""
    b = indices.shape[0]
    flat = (labels * k + preds)[indices] + (np.arange(b, dtype=np.int64) * k * k)[:, None]
    return np.bincount(flat.ravel(), minlength=b * k * k).reshape(b, k, k)


def roc_auc(indices: np.ndarray, scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Exact one-vs-rest ROC-AUC of the samples each row of `indices` ``(B, M)`` draws: float ``(B,)``,
    NaN where a side is empty. `scores` float ``(N,)``, `positive` bool ``(N,)``.

    AUC = (pairs with the negative scoring lower + half the tied pairs) / (n_pos n_neg), over the drawn
    samples. Sorting the N original scores once serves every row: count how often each row drew each
    sample, in score order, and prefix sums give the negatives below every positive. The numerator is
    counted in integers (twice it, for the half pairs) and divided once.
    """
    b, n = indices.shape
    if n == 0:
        return np.full(b, np.nan)
    order = np.argsort(scores, kind="stable")
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(len(scores))
    ranked = scores[order]
    new_value = np.r_[True, ranked[1:] != ranked[:-1]]
    group = np.cumsum(new_value) - 1  # tie group of each rank
    first = np.flatnonzero(new_value)  # first rank of each group
    last = np.r_[first[1:], len(scores)] - 1
    # drawn[r, i]: how often row r drew the sample of rank i; (B, N) keeps every step row-contiguous.
    flat = rank[indices] + (np.arange(b, dtype=np.int64) * len(scores))[:, None]
    drawn = np.bincount(flat.ravel(), minlength=b * len(scores)).reshape(b, len(scores))
    pos = positive[order]
    neg_upto = np.cumsum(drawn * ~pos, axis=1)  # negatives drawn at ranks <= i
    p = np.flatnonzero(pos)
    before = first[group[p]] - 1
    neg_below = np.where(before >= 0, neg_upto[:, before], 0)  # strictly lower score
    neg_upto_tie = neg_upto[:, last[group[p]]]  # lower or tied
    pos_drawn = drawn[:, p]
    twice_numerator = (pos_drawn * (neg_below + neg_upto_tie)).sum(1)
    return divide(twice_numerator.astype(np.float64), 2.0 * pos_drawn.sum(1) * neg_upto[:, -1])


def metric_arrays(cm: np.ndarray, roc_auc: np.ndarray) -> dict:
    """Every metric of confusion matrices `cm` int ``(B, K, K)`` and per-class ROC-AUCs ``(B, K)``.

    Returns float arrays, NaN where undefined: ``{"accuracy", "balanced_accuracy", "macro_f1",
    "weighted_f1": (B,), "per_class": {metric: (B, K)}, "macro": {metric: (B,)}, "weighted": {metric:
    (B,)}, "support": int (B, K)}`` for the metrics of `cxrdist.stats.registry.CLASS_METRICS`.
    """
    total = cm.sum((1, 2))
    support = cm.sum(2)
    predicted = cm.sum(1)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    negatives = total[:, None] - support
    true_negatives = negatives - (predicted - tp)
    per_class = {
        "precision": divide(tp, predicted),
        "recall": divide(tp, support),
        "specificity": divide(true_negatives, negatives),
        "f1": divide(2 * tp, support + predicted),
        "roc_auc": np.asarray(roc_auc, dtype=np.float64),
    }
    macro = {m: mean_defined(v, support > 0) for m, v in per_class.items()}
    weighted = {m: weighted_mean(v, support) for m, v in per_class.items()}
    return {
        "accuracy": divide(tp.sum(1), total),
        "balanced_accuracy": macro["recall"],
        "macro_f1": macro["f1"],
        "weighted_f1": weighted["f1"],
        "per_class": per_class,
        "macro": macro,
        "weighted": weighted,
        "support": support,
    }
