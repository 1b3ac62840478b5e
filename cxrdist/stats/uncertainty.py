"""95% confidence intervals for every metric `cxrdist.stats.metrics.summarize` reports: a stratified
bootstrap.

Input: the per-sample arrays evaluation gathered once on every rank, ``probs`` float ``(N, K)`` and
``labels`` int64 ``(N,)`` with class ids in ``0..K-1`` (manifest order); torch tensors (any device) or
numpy arrays. Pass the very probabilities `summarize` received: the prediction is their row argmax, and
ROC-AUC ranks column k across samples, which softmax changes (logits would give other AUCs). Runs on one
process, in numpy, on the CPU.

Method (``"stratified percentile bootstrap"``):

- Resampling is stratified by true class: resample ``r`` replaces the samples of each class with as many
  draws, with replacement, from that class only, so every resample has the test set's support. Slot ``j``
  of a resample holds a sample of class ``labels[j]`` (``labels[idx[r]] == labels``): with
  ``u = numpy.random.default_rng([seed, r]).random(N)``, slot j holds member ``floor(u[j] * n_c)`` (in
  index order) of its class c, which has n_c samples. `resample_indices` gives these indices; the same
  seed gives bit-identical intervals, and resample r does not depend on how many others are drawn.
- Each resample's metrics are `summarize`'s: the same formulas (`cxrdist.stats.formulas`) on the
  resample's confusion matrix and scores (prediction = row argmax, first index on ties; undefined values
  skipped by the averages; macro averages over the classes with samples, which stratification keeps).
- The interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (numpy's linear
  interpolation) of the metric over the resamples where it is defined.
- Rule for undefined values: the interval is None (JSON null) when the metric is undefined in more than
  `MAX_UNDEFINED_SHARE` (5%) of the resamples, which includes every metric whose point estimate is None.
  Stratification keeps recall, specificity and ROC-AUC defined in every resample whenever they are
  defined at all; precision is undefined in a resample that never predicts the class.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from cxrdist.stats.arrays import sample_arrays
from cxrdist.stats.formulas import confusion_matrices, metric_arrays, roc_auc
from cxrdist.stats.registry import AVERAGES, CLASS_KEYS, SUMMARY_KEYS

METHOD = "stratified percentile bootstrap"
MAX_UNDEFINED_SHARE = 0.05  # more undefined resamples than this: no interval (None)
_BLOCK_ELEMENTS = 1 << 21  # resamples x samples per block: bounds peak memory near 100 MB


def _check_resamples(resamples: int, seed: int) -> None:
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0, got {resamples}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


class _Strata:
    """Where each slot's class members are: slot j draws from ``members[first[j] : first[j] + size[j]]``."""

    def __init__(self, labels: np.ndarray) -> None:
        self.members = np.argsort(labels, kind="stable")  # positions grouped by class, index order inside
        counts = np.bincount(labels) if labels.size else np.zeros(0, dtype=np.int64)
        starts = np.cumsum(counts) - counts
        self.first = starts[labels]
        self.size = counts[labels]

    def block(self, seed: int, start: int, stop: int) -> np.ndarray:
        """Resamples ``start..stop-1``: int64 ``(stop - start, N)``."""
        u = np.empty((stop - start, self.members.size))
        for row, r in enumerate(range(start, stop)):
            u[row] = np.random.default_rng([seed, r]).random(self.members.size)  # one stream per resample
        # floor(u * n) < n for u < 1; the minimum guards the last float rounding.
        offset = np.minimum((u * self.size).astype(np.int64), self.size - 1)
        return self.members[self.first + offset]


def resample_blocks(labels, resamples: int, seed: int = 0, block: int | None = None) -> Iterator[np.ndarray]:
    """The stratified bootstrap's sample indices, in consecutive blocks of int64 ``(<= block, N)`` rows.

    Row r (counting over all blocks) is resample r, whatever the block size (module docstring: how it is
    drawn). The default block keeps a block near `_BLOCK_ELEMENTS` indices.
    """
    _check_resamples(resamples, seed)
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels, dtype=np.int64)
    strata = _Strata(labels)
    block = block or max(1, _BLOCK_ELEMENTS // max(labels.size, 1))
    for start in range(0, resamples, block):
        yield strata.block(seed, start, min(start + block, resamples))


def resample_indices(labels, resamples: int, seed: int = 0) -> np.ndarray:
    """All of the stratified bootstrap's sample indices: int64 ``(resamples, N)``, row r = resample r.

    Exactly the indices `bootstrap_intervals` uses with the same labels, resamples and seed, so
    ``labels[idx[r]]``, ``probs[idx[r]]`` reproduce resample r (``labels[idx[r]] == labels``).
    """
    n = len(labels)
    return np.concatenate([*resample_blocks(labels, resamples, seed), np.zeros((0, n), dtype=np.int64)])


def bootstrap_metrics(probs, labels, indices: np.ndarray) -> dict:
    """Every `summarize` metric on every resample: float arrays, NaN where undefined.

    `indices` int ``(R, M)``: resample r is the samples ``indices[r]`` (any indices, stratified or not;
    the identity ``arange(N)[None]`` reproduces `summarize`). Returns
    ``{"accuracy", "balanced_accuracy", "macro_f1", "weighted_f1": (R,),
    "per_class": {metric: (R, K)}, "macro": {metric: (R,)}, "weighted": {metric: (R,)}}`` for the metrics
    in `cxrdist.stats.registry.CLASS_METRICS`.
    """
    scores, labels = sample_arrays(probs, labels)
    indices = np.asarray(indices, dtype=np.int64)
    n, k = scores.shape
    if indices.ndim != 2 or (indices.size and (indices.min() < 0 or indices.max() >= n)):
        raise ValueError(f"indices must be (R, M) sample ids in 0..{n - 1}, got shape {indices.shape}")
    preds = scores.argmax(1)  # first index on ties, as torch.argmax in evaluation
    cm = confusion_matrices(labels, preds, indices, k)
    aucs = [roc_auc(indices, scores[:, c], labels == c) for c in range(k)]
    arrays = metric_arrays(cm, np.stack(aucs, 1) if k else np.zeros((indices.shape[0], 0)))
    del arrays["support"]
    return arrays


def _concat(blocks: list[dict]) -> dict:
    """`bootstrap_metrics` results of consecutive resample blocks joined along the resample axis."""
    first = blocks[0]
    return {
        key: _concat([b[key] for b in blocks])
        if isinstance(v, dict)
        else np.concatenate([b[key] for b in blocks])
        for key, v in first.items()
    }


def percentile_interval(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    """``[low, high]``: the central `level` quantiles of the defined (non-NaN) values, or None when more
    than `MAX_UNDEFINED_SHARE` of them are undefined (or there are none)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = np.asarray(values, dtype=np.float64)
    defined = values[~np.isnan(values)]
    if values.size == 0 or defined.size < (1 - MAX_UNDEFINED_SHARE) * values.size:
        return None
    tail = round((1 - level) / 2, 12)  # 0.025 exactly for level 0.95, not 0.025000000000000022
    low, high = np.quantile(defined, [tail, 1 - tail])
    return [float(low), float(high)]


def bootstrap_intervals(
    probs,
    labels,
    classes: Sequence[str],
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict | None:
    """Percentile intervals of every `summarize` metric under a stratified bootstrap; None if resamples=0.

    Returns, shaped like `summarize`'s dict (without support, num_samples and the matrix)::

        {"accuracy": [lo, hi], "balanced_accuracy": ..., "macro_f1": ..., "weighted_f1": ...,
         "per_class": {name: {"precision": [lo, hi], "recall", "specificity", "f1", "roc_auc"}},
         "macro": {metric: [lo, hi]}, "weighted": {metric: [lo, hi]},
         "settings": {"resamples", "seed", "level", "method", "max_undefined_share"}}

    with None for a metric without an interval (see the module docstring). Resamples run in blocks that
    keep memory near 100 MB; the result does not depend on the block size.
    """
    _check_resamples(resamples, seed)
    percentile_interval(np.zeros(1), level)  # checks level before any work
    if resamples == 0:
        return None
    scores, labels = sample_arrays(probs, labels)
    if scores.shape[1] != len(classes):
        raise ValueError(f"scores have {scores.shape[1]} columns for {len(classes)} classes {list(classes)}")
    blocks = [bootstrap_metrics(scores, labels, idx) for idx in resample_blocks(labels, resamples, seed)]
    dist = _concat(blocks)
    out: dict = {m: percentile_interval(dist[m], level) for m in SUMMARY_KEYS}
    out["per_class"] = {
        name: {m: percentile_interval(dist["per_class"][m][:, c], level) for m in CLASS_KEYS}
        for c, name in enumerate(classes)
    }
    for avg in AVERAGES:
        out[avg] = {m: percentile_interval(dist[avg][m], level) for m in CLASS_KEYS}
    out["settings"] = {
        "resamples": resamples,
        "seed": seed,
        "level": level,
        "method": METHOD,
        "max_undefined_share": MAX_UNDEFINED_SHARE,
    }
    return out
