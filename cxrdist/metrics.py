"""Moved to `cxrdist.stats.metrics` and, the gathers, `cxrdist.distributed`; re-exported for old imports."""

from cxrdist.distributed import all_reduce_sum, gather_objects, gather_rows
from cxrdist.stats.metrics import confusion_matrix, roc_auc_ovr, summarize

__all__ = ["all_reduce_sum", "confusion_matrix", "gather_objects", "gather_rows", "roc_auc_ovr", "summarize"]
