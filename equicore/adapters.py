"""Task adapters: one small protocol over a model.

``features(x)`` is the representation whose equivariance the defense restores (dense logits before upsampling for
segmentation; a named spatial layer, or the logits, for classification); ``logits(x)`` what the task is scored on;
``predict(x)`` the labels; ``task_loss(x, y)`` a per-sample loss ``[B]``. ``forward`` returns both features and
logits from a single model pass so attacks and defenses never run the model twice for one input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from equicore.errors import InvalidInputError
from equicore.registry import Registry

ADAPTERS: Registry[Any] = Registry("task adapter")


@dataclass
class AdapterOutput:
    features: torch.Tensor
    logits: torch.Tensor


class TaskAdapter(ABC):
    """``model_name`` is the ``MODELS`` name of the wrapped model when known (the pipeline sets it); defenses with
    per-model artefacts (the self-supervised heads) use it to find theirs."""

    task: str = ""
    model_name: str | None = None

    def __init__(self, model: nn.Module, num_classes: int | None = None) -> None:
        self.model = model.eval()
        self.num_classes = num_classes

    @abstractmethod
    def forward(self, x: torch.Tensor) -> AdapterOutput: ...

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).features

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).logits

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.logits(x).argmax(1)

    @abstractmethod
    def task_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample task loss ``[B]`` (what an untargeted attack maximises)."""

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def check_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise InvalidInputError(f"model outputs {logits.shape[1]} classes but the dataset has {self.num_classes}")
        return logits


def _unwrap(out: Any) -> torch.Tensor:
    # torchvision segmentation models return {"out": ..., "aux": ...}.
    if isinstance(out, dict):
        return out["out"]
    return out


class _StopForward(Exception):
    """Raised from a forward hook to end a forward pass at the feature layer."""


@ADAPTERS.register("classification")
class ClassificationAdapter(TaskAdapter):
    """``feature_layer`` names a module (``dict(model.named_modules())``) whose output is the equivariance
    representation; ``"logits"`` uses the logit vector (whose inverse under any view is the identity)."""

    task = "classification"

    def __init__(self, model: nn.Module, num_classes: int | None = None, feature_layer: str = "logits") -> None:
        super().__init__(model, num_classes)
        self.feature_layer = feature_layer
        self._module: nn.Module | None = None
        if feature_layer != "logits":
            modules = dict(model.named_modules())
            if feature_layer not in modules:
                names = [n for n in modules if n][:40]
                raise InvalidInputError(f"feature_layer {feature_layer!r} is not a module of the model; known: {names}")
            self._module = modules[feature_layer]

    def forward(self, x: torch.Tensor) -> AdapterOutput:
        if self._module is None:
            logits = self.check_logits(_unwrap(self.model(x)))
            return AdapterOutput(logits, logits)
        captured: list[torch.Tensor] = []
        handle = self._module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            logits = self.check_logits(_unwrap(self.model(x)))
        finally:
            handle.remove()
        return AdapterOutput(captured[-1], logits)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model only up to the feature layer: the rest is not needed for the equivariance objective, and
        classifier heads with fully-connected layers could not take the resized views anyway."""
        if self._module is None:
            return self.forward(x).features
        captured: list[torch.Tensor] = []

        def stop(_m, _i, out):
            captured.append(out)
            raise _StopForward

        handle = self._module.register_forward_hook(stop)
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise InvalidInputError(f"feature_layer {self.feature_layer!r} was not reached by the model's forward")
        return captured[0]

    def task_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), y, reduction="none")


@ADAPTERS.register("segmentation")
class SegmentationAdapter(TaskAdapter):
    """Features are the model's low-resolution logits (``model.logits_lowres``) when it has them, as in the paper;
    logits are upsampled to the input size for scoring."""

    task = "segmentation"

    def __init__(self, model: nn.Module, num_classes: int | None = None, ignore_index: int = 255) -> None:
        super().__init__(model, num_classes)
        self.ignore_index = ignore_index
        self._lowres: Callable[[torch.Tensor], torch.Tensor] | None = getattr(model, "logits_lowres", None)

    def forward(self, x: torch.Tensor) -> AdapterOutput:
        if self._lowres is not None:
            low = self._lowres(x)
            logits = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
        else:
            low = logits = _unwrap(self.model(x))
            if logits.shape[-2:] != x.shape[-2:]:
                logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return AdapterOutput(low, self.check_logits(logits))

    def task_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pixel_cross_entropy(self.logits(x), y, self.ignore_index)


def pixel_cross_entropy(logits: torch.Tensor, y: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-image mean cross-entropy over labelled pixels ``[B]`` (0 for an image with no labelled pixel)."""
    ce = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none")
    valid = (y != ignore_index).flatten(1)
    return ce.flatten(1).sum(1) / valid.sum(1).clamp_min(1)


def build_adapter(task: str, model: nn.Module, **options: Any) -> TaskAdapter:
    """``instance`` segmentation plugs in here through the same registry (Mask R-CNN adapter)."""
    return ADAPTERS.build(task, model=model, **options)
