"""Moved to `cxrdist.stats.uncertainty` (bootstrap intervals); re-exported for old imports."""

from cxrdist.stats.arrays import as_scores, sample_arrays
from cxrdist.stats.registry import CLASS_KEYS as CLASS_METRICS
from cxrdist.stats.registry import SUMMARY_KEYS as SUMMARY_METRICS
from cxrdist.stats.uncertainty import (
    MAX_UNDEFINED_SHARE,
    METHOD,
    bootstrap_intervals,
    bootstrap_metrics,
    percentile_interval,
    resample_blocks,
    resample_indices,
)

__all__ = [
    "CLASS_METRICS",
    "MAX_UNDEFINED_SHARE",
    "METHOD",
    "SUMMARY_METRICS",
    "as_scores",
    "bootstrap_intervals",
    "bootstrap_metrics",
    "percentile_interval",
    "resample_blocks",
    "resample_indices",
    "sample_arrays",
]
