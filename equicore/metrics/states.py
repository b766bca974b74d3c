"""Mergeable metric states: ``update`` with a batch, ``merge`` shard states, ``compute`` at the end.

Exact under any split of the data: counts and confusion matrices are integers, and means of real-valued scores
are accumulated in 2^-48 fixed point as Python ints, so the sum does not depend on the order of additions.
States pickle, and ``to_dict``/``from_dict`` give a JSON-able form for the results store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from equicore.errors import InvalidInputError
from equicore.metrics import functional as MF
from equicore.registry import METRICS

_FIXED = 2**48


class MetricState(ABC):
    """``inputs`` names the batch entries ``update`` reads: preds, labels, attack_targets, scores."""

    name: ClassVar[str] = "metric"
    inputs: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def update(self, batch: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def merge(self, other: MetricState) -> MetricState: ...

    @abstractmethod
    def compute(self) -> dict[str, float]: ...

    @abstractmethod
    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    @abstractmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricState: ...

    def _check_same(self, other: MetricState) -> None:
        if type(other) is not type(self) or other.to_dict().get("config") != self.to_dict().get("config"):
            raise InvalidInputError(f"cannot merge {type(other).__name__} into {type(self).__name__} (configs differ)")

    @property
    def n_samples(self) -> int:
        return int(self.to_dict().get("n", 0))


def _get(batch: Mapping[str, Any], key: str, metric: str) -> Any:
    if key not in batch or batch[key] is None:
        raise InvalidInputError(f"metric {metric!r} needs {key!r} in the batch")
    return batch[key]


@METRICS.register("accuracy", tasks=("classification",))
class AccuracyState(MetricState):
    name = "accuracy"
    inputs = ("preds", "labels")

    def __init__(self, correct: int = 0, n: int = 0) -> None:
        self.correct, self.n = int(correct), int(n)

    def update(self, batch: Mapping[str, Any]) -> None:
        preds, labels = _get(batch, "preds", self.name), _get(batch, "labels", self.name)
        if preds.shape != labels.shape:
            raise InvalidInputError(f"accuracy: preds {tuple(preds.shape)} vs labels {tuple(labels.shape)}")
        self.correct += int((preds == labels).sum())
        self.n += int(labels.numel())

    def merge(self, other: MetricState) -> AccuracyState:
        self._check_same(other)
        assert isinstance(other, AccuracyState)
        return AccuracyState(self.correct + other.correct, self.n + other.n)

    def compute(self) -> dict[str, float]:
        return {"accuracy": self.correct / self.n if self.n else float("nan")}

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, "config": {}, "correct": self.correct, "n": self.n}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyState:
        return cls(data["correct"], data["n"])


@METRICS.register("miou", tasks=("segmentation",))
class ConfusionState(MetricState):
    """Dataset-level int64 confusion matrix; ``key`` chooses what predictions are compared with (ground truth, or
    the attack's targets for targeted attacks)."""

    name = "miou"
    inputs = ("preds", "labels")
    target_key: ClassVar[str] = "labels"

    def __init__(self, num_classes: int, ignore_index: int | None = 255, cm: torch.Tensor | None = None, n: int = 0):
        if num_classes < 1:
            raise InvalidInputError(f"{self.name}.num_classes: expected >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.cm = cm.clone().long() if cm is not None else torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.n = int(n)

    def update(self, batch: Mapping[str, Any]) -> None:
        preds, target = _get(batch, "preds", self.name), _get(batch, self.target_key, self.name)
        self.cm += MF.confusion_matrix(preds, target, self.num_classes, self.ignore_index)
        self.n += int(target.shape[0])

    def merge(self, other: MetricState) -> ConfusionState:
        self._check_same(other)
        assert isinstance(other, ConfusionState)
        return type(self)(self.num_classes, self.ignore_index, self.cm + other.cm, self.n + other.n)

    def compute(self) -> dict[str, float]:
        prefix = self.name
        out = {prefix: MF.mean_iou(self.cm), f"{prefix}_pixel_accuracy": MF.pixel_accuracy(self.cm)}
        for c, v in enumerate(MF.iou_per_class(self.cm).tolist()):
            out[f"{prefix}_class_{c}"] = v
        return out

    def to_dict(self) -> dict[str, Any]:
        config = {"num_classes": self.num_classes, "ignore_index": self.ignore_index}
        return {"type": self.name, "config": config, "cm": self.cm.tolist(), "n": self.n}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfusionState:
        cfg = data["config"]
        return cls(cfg["num_classes"], cfg["ignore_index"], torch.tensor(data["cm"], dtype=torch.int64), data["n"])


@METRICS.register("miou_to_target", tasks=("segmentation",))
class TargetConfusionState(ConfusionState):
    """mIoU between predictions and a targeted attack's target map (Table 3: lower is better for the defender)."""

    name = "miou_to_target"
    inputs = ("preds", "attack_targets")
    target_key = "attack_targets"


@METRICS.register("equivariance_score", tasks=("classification", "segmentation", "instance"))
class MeanScoreState(MetricState):
    """Mean of a per-sample score (Table 4's equivariance: mean cosine over views), order-independent."""

    name = "equivariance_score"
    inputs = ("scores",)

    def __init__(self, total_fixed: int = 0, n: int = 0) -> None:
        self.total_fixed, self.n = int(total_fixed), int(n)

    def update(self, batch: Mapping[str, Any]) -> None:
        scores = _get(batch, "scores", self.name).detach().double().reshape(-1)
        if not torch.isfinite(scores).all():
            raise InvalidInputError(f"{self.name}: scores contain NaN or Inf")
        self.total_fixed += sum(round(v * _FIXED) for v in scores.tolist())
        self.n += int(scores.numel())

    def merge(self, other: MetricState) -> MeanScoreState:
        self._check_same(other)
        assert isinstance(other, MeanScoreState)
        return MeanScoreState(self.total_fixed + other.total_fixed, self.n + other.n)

    def compute(self) -> dict[str, float]:
        return {self.name: self.total_fixed / _FIXED / self.n if self.n else float("nan")}

    def to_dict(self) -> dict[str, Any]:
        # str: the fixed-point total can exceed int64 in JSON consumers.
        return {"type": self.name, "config": {}, "total_fixed": str(self.total_fixed), "n": self.n}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MeanScoreState:
        return cls(int(data["total_fixed"]), data["n"])


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
