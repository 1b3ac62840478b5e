"""Moved to `cxrdist.stats.calibration` (ECE, Brier, NLL, temperature); re-exported for old imports."""

from cxrdist.stats.calibration import (
    N_BINS,
    T_MAX,
    T_MIN,
    apply_temperature,
    brier_score,
    calibration_report,
    ece_from_bins,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    softmax,
)

__all__ = [
    "N_BINS",
    "T_MAX",
    "T_MIN",
    "apply_temperature",
    "brier_score",
    "calibration_report",
    "ece_from_bins",
    "expected_calibration_error",
    "fit_temperature",
    "negative_log_likelihood",
    "reliability_bins",
    "softmax",
]
