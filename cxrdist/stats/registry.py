"""Every metric cxrdist reports, named once: its key in the metrics dict and the label a reader sees.

`cxrdist.tables`, the report and the bootstrap read these instead of spelling the names themselves, so a
metric is added in two places: its formula (`cxrdist.stats.formulas`) and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str  # the key in `summarize`'s dict (per class and in the averages, or at the top level)
    label: str  # in prose and the report
    short: str  # a table column's header


# Per class, and averaged over classes as "macro" and "weighted" (the same keys inside each).
CLASS_METRICS: tuple[Metric, ...] = (
    Metric("precision", "precision", "precision"),
    Metric("recall", "recall (sensitivity)", "recall"),
    Metric("specificity", "specificity", "specificity"),
    Metric("f1", "F1", "F1"),
    Metric("roc_auc", "ROC-AUC", "ROC-AUC"),
)
# One number per split, at the top level of the dict.
SUMMARY_METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "accuracy", "accuracy"),
    Metric("balanced_accuracy", "balanced accuracy", "bal. acc."),
    Metric("macro_f1", "macro F1", "macro F1"),
    Metric("weighted_f1", "weighted F1", "weighted F1"),
)
# Built from the averages where a summary names them at the top level (evaluate's `without_tta`).
DERIVED_METRICS: tuple[Metric, ...] = (Metric("macro_roc_auc", "macro ROC-AUC", "macro ROC-AUC"),)
# The summary metrics a one-line summary shows (the table's footer, the TTA and subgroup lines).
HEADLINE: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1")
# How the class averages are labelled; "macro" averages over the classes in `macro_over` only.
AVERAGES: dict[str, str] = {"macro": "macro avg", "weighted": "weighted avg"}

CLASS_KEYS: tuple[str, ...] = tuple(m.key for m in CLASS_METRICS)
SUMMARY_KEYS: tuple[str, ...] = tuple(m.key for m in SUMMARY_METRICS)
_BY_KEY = {m.key: m for m in (*CLASS_METRICS, *SUMMARY_METRICS, *DERIVED_METRICS)}


def metric(key: str) -> Metric:
    """The registered metric named `key`; KeyError for a name that is not one."""
    return _BY_KEY[key]


def label(key: str) -> str:
    return _BY_KEY[key].label
