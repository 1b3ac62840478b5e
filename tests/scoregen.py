"""Fake per-sample scores for the tests of statistics, tables, plots and the report: a model that is
mostly right, as logits or rounded softmax probabilities, with labels. The class names are the
database's (`shard_tools.schema.CLASSES`): tests import them from here instead of spelling them again.
"""

from __future__ import annotations

import numpy as np

from shard_tools.schema import CLASSES

K = len(CLASSES)


def fake_logits(
    n: int, seed: int, *, k: int = K, signal: float = 1.5, scale: float = 1.0, present: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """float64 logits ``(n, k)`` = scale * (N(0, 1) + signal at the true class), and int64 labels drawn
    uniformly from the first `present` classes (all k by default): the others have no samples."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k if present is None else present, n)
    logits = scale * (rng.normal(size=(n, k)) + signal * np.eye(k)[labels])
    return logits, labels.astype(np.int64)


def fake_probs(
    seed: int,
    n: int,
    *,
    signal: float = 1.5,
    decimals: int | None = 2,
    present: int | None = None,
    dtype: type = np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of `fake_logits` over the K database classes, rounded to `decimals` (many tied scores, which
    ROC-AUC and the thresholds must handle), and the labels."""
    logits, labels = fake_logits(n, seed, signal=signal, present=present)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if decimals is not None:
        probs = np.round(probs, decimals)
    return probs.astype(dtype), labels
