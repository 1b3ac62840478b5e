"""The input every statistic takes: per-sample scores float ``(N, K)`` and labels int64 ``(N,)``.

Scores are any real per-class scores (probabilities or logits, as each function says); labels are class
ids in ``0..K-1`` in manifest order. Torch tensors (any device, any float dtype) or array-likes come in;
float64 / int64 numpy copies go out, checked, so a NaN or a stray label fails here with a clear message,
not deep inside a formula.
"""

from __future__ import annotations

import numpy as np


def as_scores(scores) -> np.ndarray:
    """A float64 ``(N, K)`` numpy copy of per-sample scores (torch tensor on any device, or array-like),
    checked to be finite."""
    if hasattr(scores, "detach"):  # torch.Tensor, without importing torch here
        scores = scores.detach().cpu().double().numpy()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"expected scores (N, K), got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    return scores


def sample_arrays(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """``(float64 (N, K), int64 (N,))`` numpy copies of per-sample scores and labels, checked.

    Raises ValueError on wrong shapes, non-finite scores or labels outside ``0..K-1``.
    """
    scores = as_scores(scores)
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.shape != scores.shape[:1]:
        raise ValueError(f"expected scores (N, K) and labels (N,), got {scores.shape} and {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    k = scores.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels hold ids outside 0..{k - 1}")
    return scores, labels
