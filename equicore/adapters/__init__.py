"""Task adapters: one small protocol over a model (``base``), one module per task (``classification``,
``segmentation``, ``instance``). Importing this package registers every adapter in :data:`ADAPTERS`.

``features(x)`` is the representation whose equivariance the defense restores (dense logits before upsampling for
segmentation; a named spatial layer, or the logits, for classification; an FPN level for instance segmentation);
``logits(x)`` what the task is scored on; ``predict(x)`` the labels; ``task_loss(x, y)`` a per-sample loss ``[B]``.
"""

from equicore.adapters.base import ADAPTERS, AdapterOutput, TaskAdapter, build_adapter, unwrap_output
from equicore.adapters.classification import ClassificationAdapter
from equicore.adapters.instance import FEATURE_LEVELS, LOSS_KEYS, InstanceAdapter, InstanceTargets
from equicore.adapters.segmentation import SegmentationAdapter, pixel_cross_entropy

__all__ = [
    "ADAPTERS",
    "FEATURE_LEVELS",
    "LOSS_KEYS",
    "AdapterOutput",
    "ClassificationAdapter",
    "InstanceAdapter",
    "InstanceTargets",
    "SegmentationAdapter",
    "TaskAdapter",
    "build_adapter",
    "pixel_cross_entropy",
    "unwrap_output",
]
