"""Pieces shared by the model definitions: input normalisation and finishing a built model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from equicore.errors import InvalidInputError
from equicore.models.checkpoint import load_into

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, so callers pass images in [0, 1] and the model owns its normalisation.

    The buffers are non-persistent: they stay out of the state_dict, so official checkpoints (which have no such
    keys) load strictly, and a checkpoint does not silently override the normalisation.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise InvalidInputError(f"Normalize: mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise InvalidInputError(f"Normalize: std must be > 0, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.mean.shape[1]:
            raise InvalidInputError(f"images: expected shape B x {self.mean.shape[1]} x H x W, got {tuple(x.shape)}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def finish(model: nn.Module, checkpoint: str | os.PathLike[str] | None, name: str) -> nn.Module:
    """Load ``checkpoint`` (when given) strictly and return the model in eval mode, as ``MODELS.build`` promises."""
    if checkpoint is not None:
        load_into(model, checkpoint, strict=True, name=name)
    return model.eval()
