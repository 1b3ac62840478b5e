"""Moved to `cxrdist.stats.operating_points` (ROC, thresholds); re-exported for old imports."""

from cxrdist.stats.operating_points import (
    TARGETS,
    ClassRoc,
    choose_point,
    operating_points,
    roc_curve,
    roc_curves,
)

__all__ = ["TARGETS", "ClassRoc", "choose_point", "operating_points", "roc_curve", "roc_curves"]
