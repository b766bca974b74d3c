"""The registered metric states over tensors: accuracy, the mIoU confusion matrices, the mean of a per-sample score.

Each declares its fields once (``equicore.metrics.base``); ``merge``, ``to_dict`` and ``from_dict`` follow. States
pickle, and ``to_dict``/``from_dict`` give a JSON-able form for the results store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from equicore.errors import InvalidInputError
from equicore.metrics import functional as MF
from equicore.metrics.base import (
    COUNT,
    FIXED_POINT,
    FIXED_POINT_SCALE,
    INT_TENSOR,
    MetricState,
    batch_input,
    fixed_point_sum,
)
from equicore.registry import METRICS

__all__ = [
    "AccuracyState",
    "ConfusionState",
    "MeanScoreState",
    "MetricState",
    "TargetConfusionState",
    "build_metric",
    "merge_all",
    "state_from_dict",
]
_MODULES = ("equicore.metrics.base",)


@METRICS.register("accuracy", tasks=("classification",), modules=_MODULES)
class AccuracyState(MetricState):
    name = "accuracy"
    inputs = ("preds", "labels")
    fields = {"correct": COUNT, "n": COUNT}

    def __init__(self, correct: int = 0, n: int = 0) -> None:
        self.correct, self.n = int(correct), int(n)

    def update(self, batch: Mapping[str, Any]) -> None:
        preds, labels = batch_input(batch, "preds", self.name), batch_input(batch, "labels", self.name)
        if preds.shape != labels.shape:
            raise InvalidInputError(f"accuracy: preds {tuple(preds.shape)} vs labels {tuple(labels.shape)}")
        self.correct += int((preds == labels).sum())
        self.n += int(labels.numel())

    def compute(self) -> dict[str, float]:
        return {"accuracy": self.correct / self.n if self.n else float("nan")}


@METRICS.register("miou", tasks=("segmentation",), modules=(*_MODULES, "equicore.metrics.functional"))
class ConfusionState(MetricState):
    """Dataset-level int64 confusion matrix; ``key`` chooses what predictions are compared with (ground truth, or
    the attack's targets for targeted attacks)."""

    name = "miou"
    inputs = ("preds", "labels")
    config_fields = ("num_classes", "ignore_index")
    fields = {"cm": INT_TENSOR, "n": COUNT}
    target_key: ClassVar[str] = "labels"

    def __init__(self, num_classes: int, ignore_index: int | None = 255, cm: torch.Tensor | None = None, n: int = 0):
        if num_classes < 1:
            raise InvalidInputError(f"{self.name}.num_classes: expected >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.cm = cm.clone().long() if cm is not None else torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.n = int(n)

    def update(self, batch: Mapping[str, Any]) -> None:
        preds, target = batch_input(batch, "preds", self.name), batch_input(batch, self.target_key, self.name)
        self.cm += MF.confusion_matrix(preds, target, self.num_classes, self.ignore_index)
        self.n += int(target.shape[0])

    def compute(self) -> dict[str, float]:
        prefix = self.name
        out = {prefix: MF.mean_iou(self.cm), f"{prefix}_pixel_accuracy": MF.pixel_accuracy(self.cm)}
        for c, v in enumerate(MF.iou_per_class(self.cm).tolist()):
            out[f"{prefix}_class_{c}"] = v
        return out


@METRICS.register("miou_to_target", tasks=("segmentation",), modules=(*_MODULES, "equicore.metrics.functional"))
class TargetConfusionState(ConfusionState):
    """mIoU between predictions and a targeted attack's target map (Table 3: lower is better for the defender)."""

    name = "miou_to_target"
    inputs = ("preds", "attack_targets")
    target_key = "attack_targets"


@METRICS.register("equivariance_score", tasks=("classification", "segmentation", "instance"), modules=_MODULES)
class MeanScoreState(MetricState):
    """Mean of a per-sample score (Table 4's equivariance: mean cosine over views), order-independent."""

    name = "equivariance_score"
    inputs = ("scores",)
    fields = {"total_fixed": FIXED_POINT, "n": COUNT}

    def __init__(self, total_fixed: int = 0, n: int = 0) -> None:
        self.total_fixed, self.n = int(total_fixed), int(n)

    def update(self, batch: Mapping[str, Any]) -> None:
        scores = batch_input(batch, "scores", self.name).detach().double().reshape(-1)
        if not torch.isfinite(scores).all():
            raise InvalidInputError(f"{self.name}: scores contain NaN or Inf")
        self.total_fixed += fixed_point_sum(scores)
        self.n += int(scores.numel())

    def compute(self) -> dict[str, float]:
        return {self.name: self.total_fixed / FIXED_POINT_SCALE / self.n if self.n else float("nan")}


def build_metric(name: str, **params: Any) -> MetricState:
    return METRICS.build(name, **params)


def state_from_dict(data: Mapping[str, Any]) -> MetricState:
    cls = METRICS.get(data["type"])
    return cls.from_dict(data)  # type: ignore[attr-defined]


def merge_all(states: list[MetricState]) -> MetricState:
    if not states:
        raise InvalidInputError("merge_all: no states to merge")
    out = states[0]
    for s in states[1:]:
        out = out.merge(s)
    return out
