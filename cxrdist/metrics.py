"""Classification metrics that are exact on any number of ranks.

Each rank counts its own int64 ``(K, K)`` confusion matrix (rows: true class, columns: predicted class,
in manifest class order); one `all_reduce_sum` adds them up. Everything except ROC-AUC derives from the
summed matrix. ROC-AUC needs the scores themselves: `gather_rows` collects them once, at the end.

Undefined values are ``None`` (JSON null), never NaN, and averages skip them. Where scikit-learn defines
a metric the value is the one it gives with ``zero_division=np.nan``:

- precision of a class never predicted, recall of a class with zero support: None;
- F1 = 2 TP / (2 TP + FP + FN), so it is 0, not None, when a class has predictions or support but no
  true positive, and None only when it has neither;
- macro averages: the plain mean of the defined per-class values; weighted averages: weighted by
  support over the classes whose value is defined, or their plain mean when all those have zero
  support (sklearn's `_nanaverage`);
- balanced accuracy: the mean recall over classes with support (sklearn's `balanced_accuracy_score`);
- ROC-AUC: one-vs-rest per class, None when the class is absent or is the only class present.

Specificity (TN / (TN + FP)) has no sklearn function; it is the recall of "not this class".

Only torch and torch.distributed are used; without an initialised process group the collectives are
no-ops, so the same code serves one process and many.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

_METRICS = ("precision", "recall", "specificity", "f1", "roc_auc")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8)


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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where `t` must live for the default process group's backend."""
    backend = str(dist.get_backend())
    if backend == "nccl":  # CUDA tensors only
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":  # CPU always works; CUDA support depends on the build and the collective
        return torch.device("cpu")
    return t.device  # "cpu:gloo,cuda:nccl" and other backends take the tensor where it is


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over all ranks, on `t`'s device; `t` itself is left unchanged.

    Every rank must call it, with the same shape and dtype. A plain copy without a process group.
    """
    if not _distributed():
        return t.clone()
    x = t.to(_comm_device(t), copy=True)
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows ``(N_r, ...)`` of every rank, concatenated in rank order, on every rank, on `t`'s device.

    Ranks may hold different numbers of rows, zero included (pass an empty tensor of the right trailing
    shape). Rows are padded to the longest rank for the collective and trimmed after, so nothing is
    duplicated or lost. Every rank must call it. A plain copy without a process group.
    """
    if not _distributed():
        return t.clone()
    if t.dim() == 0 or t.dim() > 8 or t.dtype not in _DTYPES:
        raise ValueError(
            f"gather_rows takes (N, ...) tensors of up to 8 dims, got {tuple(t.shape)} {t.dtype}"
        )
    device = _comm_device(t)
    x = t.to(device)
    world = dist.get_world_size()
    # Shapes first: a rank with a different trailing shape or dtype fails loudly on every rank.
    meta = torch.tensor([t.dim(), _DTYPES.index(t.dtype), *t.shape, *([0] * (8 - t.dim()))], device=device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta)
    metas_cpu = [m.cpu() for m in metas]
    layouts = {(int(m[0]), int(m[1]), tuple(m[3:].tolist())) for m in metas_cpu}
    if len(layouts) != 1:
        raise ValueError(f"gather_rows: ranks disagree on trailing shape or dtype: {sorted(layouts)}")
    sizes = [int(m[2]) for m in metas_cpu]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(t.device)


def gather_objects(items: list) -> list:
    """Every rank's list (of picklable objects, e.g. sample keys), concatenated in rank order, on every
    rank. Every rank must call it. A plain copy without a process group."""
    if not _distributed():
        return list(items)
    parts: list[list] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def roc_auc_ovr(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """One-vs-rest ROC-AUC per class, exact: the Mann-Whitney statistic with mid-ranks for ties.

    That equals the area under the ROC curve with tied scores joined by a straight line, as
    `sklearn.metrics.roc_auc_score` computes it. `probs`: float ``(N, K)`` scores; `labels`: ``(N,)``.
    None for a class that is absent or the only class present.
    """
    if probs.dim() != 2 or probs.shape[1] != num_classes or labels.shape != probs.shape[:1]:
        shapes = f"{tuple(probs.shape)} and {tuple(labels.shape)}"
        raise ValueError(f"expected probs (N, {num_classes}) and labels (N,), got {shapes}")
    scores_all = probs.detach().double().cpu()
    if not torch.isfinite(scores_all).all():
        raise ValueError("scores contain NaN or infinity")
    labels = labels.detach().long().cpu()
    aucs: list[float | None] = []
    for k in range(num_classes):
        positive = labels == k
        n_pos = int(positive.sum())
        n_neg = labels.numel() - n_pos
        if n_pos == 0 or n_neg == 0:
            aucs.append(None)
            continue
        _, inverse, counts = torch.unique(
            scores_all[:, k], sorted=True, return_inverse=True, return_counts=True
        )
        # 1-based mid-rank of each distinct score: the mean of the ranks its tied samples occupy.
        mid_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2
        rank_sum = float(mid_rank[inverse][positive].sum())
        aucs.append((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return aucs


def _ratio(num: int, den: int) -> float | None:
    return num / den if den > 0 else None


def _macro(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _weighted(values: list[float | None], weights: list[int]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
    total = sum(w for _, w in pairs)
    if total == 0:  # only zero-support classes are defined: sklearn falls back to the plain mean
        return _macro(values)
    return sum(v * w for v, w in pairs) / total


def summarize(
    cm: torch.Tensor,
    classes: Sequence[str],
    probs: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> dict:
    """A JSON-able metrics dict from the summed confusion matrix (and, for ROC-AUC, all scores).

    Keys: num_samples, accuracy, balanced_accuracy, macro_f1, weighted_f1,
    per_class {name: {precision, recall, specificity, f1, support, roc_auc}},
    macro / weighted {precision, recall, specificity, f1, roc_auc}, confusion_matrix (rows: true class).
    `probs` ``(N, K)`` and `labels` ``(N,)`` must be the same N samples the matrix counts, from
    `gather_rows`; without them roc_auc is None. See the module docstring for undefined values.
    """
    k = len(classes)
    if cm.shape != (k, k):
        raise ValueError(
            f"confusion matrix is {tuple(cm.shape)}, expected ({k}, {k}) for classes {list(classes)}"
        )
    cm = cm.detach().to("cpu", torch.int64)
    n = int(cm.sum())
    support = cm.sum(1).tolist()
    predicted = cm.sum(0).tolist()
    tp = cm.diagonal().tolist()

    if (probs is None) != (labels is None):
        raise ValueError("pass both probs and labels, or neither")
    aucs: list[float | None] = [None] * k
    if probs is not None and labels is not None:
        if labels.numel() != n or torch.bincount(labels.long().cpu(), minlength=k).tolist() != support:
            raise ValueError(
                f"the {labels.numel()} gathered labels do not match the confusion matrix ({n} samples): "
                "scores and matrix must come from the same samples"
            )
        aucs = roc_auc_ovr(probs, labels, k)

    per_class = {}
    for i, name in enumerate(classes):
        negatives = n - support[i]
        true_negatives = negatives - (predicted[i] - tp[i])
        per_class[name] = {
            "precision": _ratio(tp[i], predicted[i]),
            "recall": _ratio(tp[i], support[i]),
            "specificity": _ratio(true_negatives, negatives),
            "f1": _ratio(2 * tp[i], support[i] + predicted[i]),
            "support": support[i],
            "roc_auc": aucs[i],
        }
    columns = {m: [per_class[c][m] for c in classes] for m in _METRICS}
    macro = {m: _macro(columns[m]) for m in _METRICS}
    weighted = {m: _weighted(columns[m], support) for m in _METRICS}
    return {
        "num_samples": n,
        "accuracy": _ratio(sum(tp), n),
        "balanced_accuracy": macro["recall"],
        "macro_f1": macro["f1"],
        "weighted_f1": weighted["f1"],
        "per_class": per_class,
        "macro": macro,
        "weighted": weighted,
        "confusion_matrix": cm.tolist(),
    }
