"""Pieces shared by the model definitions: input normalisation and finishing a built model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from equicore.errors import CheckpointError, InvalidInputError
from equicore.models.checkpoint import load_into
from equicore.registry import MODELS

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Where a model's maths live besides the module defining it: the shared normalisation and construction.
MODEL_MODULES = ("equicore.models.common",)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
RANDOM_INIT = "none"  # checkpoint value for an untrained model (tests, smoke runs, head training on a random net)


def shipped_weights(name: str) -> Path | None:
    """The weights file a registered model ships with (its registration's ``weights=``), or None."""
    file = MODELS.meta(name).get("weights")
    return WEIGHTS_DIR / file if file else None


def resolve_checkpoint(name: str, checkpoint: str | os.PathLike[str] | None, how: str) -> Path | None:
    """What to load into model ``name``: None for ``RANDOM_INIT``, the given file, else its shipped weights.

    ``how`` says, in the caller's terms, how to name a file (e.g. "set model.checkpoint"); the error for a model
    without usable shipped weights uses it.
    """
    if checkpoint is not None:
        return None if os.fspath(checkpoint) == RANDOM_INIT else Path(checkpoint)
    shipped = shipped_weights(name)
    if shipped is not None and shipped.is_file():
        return shipped
    if shipped is not None:
        raise CheckpointError(
            f"model {name!r}: its shipped weights {shipped} are missing; rebuild them with `equi train {name}` (the "
            f"project's trained models) or reinstall, or {how} to a local file"
        )
    raise CheckpointError(
        f"model {name!r} has no shipped weights: {how} to a local file (or to '{RANDOM_INIT}' for an untrained model)"
    )


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
