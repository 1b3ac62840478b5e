"""The metrics of one split, exact on any number of ranks: the confusion matrix and `summarize`.

Each rank counts its own int64 ``(K, K)`` confusion matrix (rows: true class, columns: predicted class,
in manifest class order); one `cxrdist.distributed.all_reduce_sum` adds them up. Everything except
ROC-AUC derives from the summed matrix; ROC-AUC needs the scores themselves, gathered once
(`cxrdist.distributed.gather_rows`).

The formulas are `cxrdist.stats.formulas` (its docstring: which values are undefined, what the averages
average over), applied to this one matrix. Undefined values are ``None`` (JSON null), never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cxrdist.stats.arrays import sample_arrays
from cxrdist.stats.formulas import metric_arrays, roc_auc
from cxrdist.stats.registry import CLASS_KEYS, SUMMARY_KEYS


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 ``(K, K)`` counts on the inputs' device; ``cm[t, p]`` = samples of class t predicted p.

    `preds` and `labels`: integer ``(N,)`` class ids in ``0..K-1``.
    """
    if preds.shape != labels.shape or preds.dim() != 1:
        raise ValueError(
            f"preds and labels must both be (N,), got {tuple(preds.shape)} and {tuple(labels.shape)}"
        )
    preds, labels = preds.long(), labels.long()
    for name, ids in (("preds", preds), ("labels", labels)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
            raise ValueError(f"{name} hold ids outside 0..{num_classes - 1}")
    # bincount without weights is deterministic on CUDA too (torch.use_deterministic_algorithms).
    flat = torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _class_aucs(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float ``(1, K)``: every class's one-vs-rest ROC-AUC over all samples (NaN where undefined)."""
    everyone = np.arange(len(labels))[None]
    return np.stack([roc_auc(everyone, scores[:, c], labels == c) for c in range(scores.shape[1])], 1)


def roc_auc_ovr(probs, labels, num_classes: int) -> list[float | None]:
    """One-vs-rest ROC-AUC per class, exact (ties count one half), as `sklearn.metrics.roc_auc_score`.

    `probs`: float ``(N, K)`` scores; `labels`: ``(N,)``. None for a class that is absent or the only
    class present.
    """
    if probs.dim() != 2 or probs.shape[1] != num_classes or labels.shape != probs.shape[:1]:
        shapes = f"{tuple(probs.shape)} and {tuple(labels.shape)}"
        raise ValueError(f"expected probs (N, {num_classes}) and labels (N,), got {shapes}")
    scores, labels = sample_arrays(probs, labels)
    return [_defined(v) for v in _class_aucs(scores, labels)[0]]


def _defined(value) -> float | None:
    return None if np.isnan(value) else float(value)


def summarize(
    cm: torch.Tensor,
    classes: Sequence[str],
    probs: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> dict:
    """A JSON-able metrics dict from the summed confusion matrix (and, for ROC-AUC, all scores).

    Keys: num_samples, accuracy, balanced_accuracy, macro_f1, weighted_f1,
    per_class {name: {precision, recall, specificity, f1, support, roc_auc}},
    macro / weighted {precision, recall, specificity, f1, roc_auc}, macro_over (the classes with samples,
    which the macro averages and balanced accuracy average over), confusion_matrix (rows: true class).
    `probs` ``(N, K)`` and `labels` ``(N,)`` must be the same N samples the matrix counts, from
    `gather_rows`; without them roc_auc is None. Undefined values: `cxrdist.stats.formulas`.
    """
    k = len(classes)
    if cm.shape != (k, k):
        raise ValueError(
            f"confusion matrix is {tuple(cm.shape)}, expected ({k}, {k}) for classes {list(classes)}"
        )
    counts = cm.detach().to("cpu", torch.int64).numpy()
    n = int(counts.sum())
    support = counts.sum(1)
    if (probs is None) != (labels is None):
        raise ValueError("pass both probs and labels, or neither")
    aucs = np.full((1, k), np.nan)
    if probs is not None and labels is not None:
        scores, ids = sample_arrays(probs, labels)
        if len(ids) != n or np.bincount(ids, minlength=k).tolist() != support.tolist():
            raise ValueError(
                f"the {len(ids)} gathered labels do not match the confusion matrix ({n} samples): "
                "scores and matrix must come from the same samples"
            )
        aucs = _class_aucs(scores, ids)

    arrays = metric_arrays(counts[None], aucs)  # the one definition, on a batch of one matrix
    per_class = {
        name: {**{m: _defined(arrays["per_class"][m][0, i]) for m in CLASS_KEYS}, "support": int(support[i])}
        for i, name in enumerate(classes)
    }
    return {
        "num_samples": n,
        **{m: _defined(arrays[m][0]) for m in SUMMARY_KEYS},
        "per_class": per_class,
        "macro": {m: _defined(arrays["macro"][m][0]) for m in CLASS_KEYS},
        "weighted": {m: _defined(arrays["weighted"][m][0]) for m in CLASS_KEYS},
        "macro_over": [name for name, s in zip(classes, support) if s > 0],
        "confusion_matrix": counts.tolist(),
    }
