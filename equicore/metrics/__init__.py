"""Metrics: pure functions and mergeable states (``base``: the declared-field state every metric subclasses)."""

from equicore.metrics.base import COUNT, DERIVED, FIXED_POINT, INT_TENSOR, RECORDS, FieldKind
from equicore.metrics.coco import MaskAPState
from equicore.metrics.functional import confusion_matrix, iou_per_class, mean_iou, per_image_iou, pixel_accuracy
from equicore.metrics.states import (
    AccuracyState,
    ConfusionState,
    MeanScoreState,
    MetricState,  # defined in equicore.metrics.base
    TargetConfusionState,
    build_metric,
    merge_all,
    state_from_dict,
)

__all__ = [
    "COUNT",
    "DERIVED",
    "FIXED_POINT",
    "INT_TENSOR",
    "RECORDS",
    "FieldKind",
    "AccuracyState",
    "ConfusionState",
    "MaskAPState",
    "MeanScoreState",
    "MetricState",
    "TargetConfusionState",
    "build_metric",
    "confusion_matrix",
    "iou_per_class",
    "mean_iou",
    "merge_all",
    "per_image_iou",
    "pixel_accuracy",
    "state_from_dict",
]
