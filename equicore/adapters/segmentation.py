"""The semantic segmentation adapter: features are the model's low-resolution logits, logits are upsampled to the
input size; the task loss is the per-image mean pixel cross-entropy."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from equicore.adapters.base import ADAPTERS, AdapterOutput, TaskAdapter, unwrap_output


@ADAPTERS.register("segmentation", modules=("equicore.adapters.base",))
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
            low = logits = unwrap_output(self.model(x))
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
