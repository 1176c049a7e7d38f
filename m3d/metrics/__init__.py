"""Detection and localization metrics of the M3Dsynth benchmark (NumPy; checked against scikit-learn)."""

from .detection import (
    auc_interval,
    balanced_accuracy,
    balanced_threshold,
    detection_metrics,
    pd_at_fpr,
    roc_auc,
    roc_curve,
    tied_pair_fraction,
)
from .localization import f1_iou, localization_metrics, localization_scores

__all__ = [
    "auc_interval",
    "balanced_accuracy",
    "balanced_threshold",
    "detection_metrics",
    "f1_iou",
    "localization_metrics",
    "localization_scores",
    "pd_at_fpr",
    "roc_auc",
    "roc_curve",
    "tied_pair_fraction",
]
