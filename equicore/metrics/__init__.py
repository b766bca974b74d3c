"""Metrics: pure functions and mergeable states."""

from equicore.metrics.coco import MaskAPState
from equicore.metrics.functional import confusion_matrix, iou_per_class, mean_iou, per_image_iou, pixel_accuracy
from equicore.metrics.states import (
    AccuracyState,
    ConfusionState,
    MeanScoreState,
    MetricState,
    TargetConfusionState,
    build_metric,
    merge_all,
    state_from_dict,
)

__all__ = [
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
