"""One-vs-rest ROC curves per class and the thresholds a screening or triage use would pick from them.

Input: per-sample arrays gathered once by evaluation (torch tensors or numpy arrays): ``probs`` float
``(N, K)`` (the class-k score is column k; probabilities as evaluation produces them) and ``labels``
int64 ``(N,)``, class ids ``0..K-1`` in manifest order.

Decision rule, exactly: for class k a sample is called positive iff ``probs[:, k] >= threshold``.
Sensitivity = TP / P (the true-positive rate), specificity = TN / N = 1 - FPR, both as one float division
of integer counts.

ROC curve: the points of every distinct score taken as the threshold, highest first, preceded by
``+inf`` (nothing called positive), the same arrays as ``sklearn.metrics.roc_curve(positive, score,
drop_intermediate=False)``. Tied scores fall on the same side of every threshold, so a tie moves the
curve diagonally; any threshold between two distinct scores behaves like the next score above it, so
these points are every operating point the scores allow.

Operating points, chosen among the curve's points:

- ``specificity>=X``: the highest sensitivity whose specificity is at least X; among equal sensitivities
  the highest specificity (the largest threshold).
- ``sensitivity>=X``: the highest specificity whose sensitivity is at least X; among equal
  specificities the highest sensitivity (the smallest threshold).

Both always exist when the class has positives and negatives (+inf meets any specificity target, the
lowest score any sensitivity target). A threshold of None (JSON null) means only "call nothing
positive" meets the target. A class that is absent, or the only class present, has no curve: None.

The thresholds are chosen on the split they are reported on, so their sensitivity and specificity are
optimistic for that split; to deploy one, choose it on the validation split and report it on test.
Optional bootstrap intervals (same stratified resamples as `cxrdist.stats.uncertainty`) hold the chosen
threshold fixed and give the sampling uncertainty of its sensitivity and specificity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cxrdist.stats.arrays import sample_arrays
from cxrdist.stats.formulas import roc_auc
from cxrdist.stats.uncertainty import percentile_interval, resample_blocks

# (measure, minimum): the defaults evaluated for every class.
TARGETS: tuple[tuple[str, float], ...] = (("specificity", 0.90), ("specificity", 0.95), ("sensitivity", 0.95))


@dataclass(frozen=True)
class ClassRoc:
    """One class's ROC curve (float64 arrays, thresholds descending from +inf) and chosen points."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float
    positives: int
    negatives: int
    points: tuple[dict, ...]  # {"target", "threshold", "sensitivity", "specificity"}, in TARGETS order


def _curve_counts(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tps, fps, thresholds)``: positives and negatives scoring >= each threshold, thresholds from +inf
    down through every distinct score."""
    order = np.argsort(scores, kind="stable")[::-1]  # descending; the order within ties does not matter
    ranked = scores[order]
    last_of_value = np.r_[np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1]
    tps = np.cumsum(positive[order])[last_of_value]
    fps = last_of_value + 1 - tps
    return np.r_[0, tps], np.r_[0, fps], np.r_[np.inf, ranked[last_of_value]]


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``, as sklearn's roc_curve with drop_intermediate=False.

    `scores` float ``(N,)``, `positive` bool ``(N,)`` with at least one positive and one negative.
    """
    tps, fps, thresholds = _curve_counts(scores, positive)
    return fps / fps[-1], tps / tps[-1], thresholds


def choose_point(sensitivity: np.ndarray, specificity: np.ndarray, measure: str, minimum: float) -> int:
    """Index of the curve point meeting ``measure >= minimum`` best (rules in the module docstring).

    Along the curve (thresholds descending) sensitivity and specificity are monotone, so the points
    meeting a specificity target are a prefix and those meeting a sensitivity target a suffix.
    """
    if measure == "specificity":
        last_ok = int(np.flatnonzero(specificity >= minimum)[-1])
        return int(np.flatnonzero(sensitivity == sensitivity[last_ok])[0])  # same sensitivity, higher spec
    if measure == "sensitivity":
        first_ok = int(np.flatnonzero(sensitivity >= minimum)[0])
        return int(np.flatnonzero(specificity == specificity[first_ok])[-1])
    raise ValueError(f"unknown target measure {measure!r}: use 'specificity' or 'sensitivity'")


def _class_roc(scores: np.ndarray, positive: np.ndarray, targets) -> ClassRoc | None:
    positives = int(positive.sum())
    negatives = positive.size - positives
    if positives == 0 or negatives == 0:
        return None
    tps, fps, thresholds = _curve_counts(scores, positive)
    sens, spec = tps / positives, (negatives - fps) / negatives  # one float division of counts each
    points = []
    for measure, minimum in targets:
        i = choose_point(sens, spec, measure, minimum)
        points.append(
            {
                "target": f"{measure}>={minimum:.2f}",
                "threshold": None if np.isinf(thresholds[i]) else float(thresholds[i]),
                "sensitivity": float(sens[i]),
                "specificity": float(spec[i]),
            }
        )
    fpr, tpr = fps / negatives, tps / positives
    auc = float(roc_auc(np.arange(positive.size)[None], scores, positive)[0])  # the area under this curve
    return ClassRoc(fpr, tpr, thresholds, auc, positives, negatives, tuple(points))


def roc_curves(
    probs, labels, classes: Sequence[str], targets: Sequence[tuple[str, float]] = TARGETS
) -> dict[str, ClassRoc | None]:
    """Every class's one-vs-rest ROC curve and operating points (for `cxrdist.plots.plot_roc`)."""
    scores, labels = sample_arrays(probs, labels)
    if scores.shape[1] != len(classes):
        raise ValueError(f"scores have {scores.shape[1]} columns for {len(classes)} classes {list(classes)}")
    return {name: _class_roc(scores[:, k], labels == k, targets) for k, name in enumerate(classes)}


def _point_intervals(
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: dict[int, list[float]],
    bootstrap: tuple[int, int, float],
) -> dict[int, list[tuple[list[float] | None, list[float] | None]]]:
    """Per class id, per threshold: (sensitivity, specificity) percentile intervals at that fixed threshold
    over the stratified resamples (resamples, seed, level) = `bootstrap`.

    Every count is linear in how often a resample drew each sample, so one matrix product per block of
    resamples gives the true and false positives of every class and threshold at once.
    """
    resamples, seed, level = bootstrap
    columns, keys = [], []  # indicator columns: called positive and truly k / called positive and not k
    for k, ts in thresholds.items():
        for j, t in enumerate(ts):
            called = scores[:, k] >= t
            columns += [called & (labels == k), called & (labels != k)]
            keys.append((k, j))
    indicators = np.stack(columns, 1).astype(np.float64)  # (N, 2 * points)
    n = labels.size
    blocks = []
    for idx in resample_blocks(labels, resamples, seed):
        b = idx.shape[0]
        flat = idx + (np.arange(b, dtype=np.int64) * n)[:, None]
        drawn = np.bincount(flat.ravel(), minlength=b * n).reshape(b, n)
        blocks.append(drawn.astype(np.float64) @ indicators)  # integer counts, exact in float64
    counts = np.concatenate(blocks)
    out: dict[int, list] = {k: [] for k in thresholds}
    for c, (k, _) in enumerate(keys):
        # Stratified resamples keep every class's size, so P and N are the test set's.
        positives = int((labels == k).sum())
        negatives = n - positives
        sens = counts[:, 2 * c] / positives
        spec = (negatives - counts[:, 2 * c + 1]) / negatives
        out[k].append((percentile_interval(sens, level), percentile_interval(spec, level)))
    return out


def operating_points(
    probs,
    labels,
    classes: Sequence[str],
    *,
    resamples: int = 0,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """JSON-able operating points of every class; with `resamples` > 0, bootstrap intervals too.

    Returns ``{name: {"auc", "positives", "negatives", "points": [{"target": "specificity>=0.90",
    "threshold", "sensitivity", "specificity"[, "sensitivity_interval", "specificity_interval"]}, ...]}
    or None}``, one point per `TARGETS` entry, in that order. Intervals: ``[low, high]`` percentiles at
    `level` of the point's sensitivity and specificity at its fixed threshold over `resamples` stratified
    resamples (`cxrdist.stats.uncertainty.resample_blocks` with `seed`, the same resamples as the metric
    intervals).
    """
    scores, labels = sample_arrays(probs, labels)
    curves = roc_curves(scores, labels, classes)
    out: dict = {
        name: None
        if c is None
        else {
            "auc": c.auc,
            "positives": c.positives,
            "negatives": c.negatives,
            "points": [*map(dict, c.points)],
        }
        for name, c in curves.items()
    }
    if resamples and any(v is not None for v in out.values()):
        thresholds = {
            k: [np.inf if p["threshold"] is None else p["threshold"] for p in out[name]["points"]]
            for k, name in enumerate(classes)
            if out[name] is not None
        }
        intervals = _point_intervals(scores, labels, thresholds, (resamples, seed, level))
        for k, pairs in intervals.items():
            for point, (sens, spec) in zip(out[classes[k]]["points"], pairs):
                point["sensitivity_interval"], point["specificity_interval"] = sens, spec
    return out
