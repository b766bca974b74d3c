"""The classification adapter: logits are the model's output; features a named layer's output, or the logits."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from equicore.adapters.base import ADAPTERS, AdapterOutput, TaskAdapter, unwrap_output
from equicore.errors import InvalidInputError


class _StopForward(Exception):
    """Raised from a forward hook to end a forward pass at the feature layer."""


@ADAPTERS.register("classification", modules=("equicore.adapters.base",))
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
            logits = self.check_logits(unwrap_output(self.model(x)))
            return AdapterOutput(logits, logits)
        captured: list[torch.Tensor] = []
        handle = self._module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            logits = self.check_logits(unwrap_output(self.model(x)))
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
