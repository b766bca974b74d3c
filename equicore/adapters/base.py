"""The task adapter protocol: one small interface over a model, and the registry of the adapters.

``features(x)`` is the representation whose equivariance the defense restores (dense logits before upsampling for
segmentation; a named spatial layer, or the logits, for classification); ``logits(x)`` what the task is scored on;
``predict(x)`` the labels; ``task_loss(x, y)`` a per-sample loss ``[B]``. ``forward`` returns both features and
logits from a single model pass so attacks and defenses never run the model twice for one input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from equicore.errors import InvalidInputError
from equicore.registry import Registry


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


# Entries are registered by the modules of the task adapters (``classification``, ``segmentation``, ``instance``);
# importing ``equicore.adapters`` imports them all.
ADAPTERS: Registry[TaskAdapter] = Registry("task adapter", base_cls=TaskAdapter)


def unwrap_output(out: Any) -> torch.Tensor:
    """A model's output as one tensor."""
    # torchvision segmentation models return {"out": ..., "aux": ...}.
    if isinstance(out, dict):
        return out["out"]
    return out


def build_adapter(task: str, model: nn.Module, **options: Any) -> TaskAdapter:
    """``instance`` segmentation plugs in here through the same registry (Mask R-CNN adapter)."""
    return ADAPTERS.build(task, model=model, **options)
