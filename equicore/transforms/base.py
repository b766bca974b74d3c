"""Invertible transforms with explicit parameters: ``g.forward(x, p)`` on images, ``g.inverse(f, p, size)`` on
dense features. No hidden state: a transform object holds only its sampling ranges, and every random choice is
in the ``params`` dict that :meth:`InvertibleTransform.sample` returns (picklable, loggable, replayable).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from equicore.errors import InvalidInputError

Params = dict[str, Any]
Size = tuple[int, int]


class InvertibleTransform(ABC):
    """Base class. Subclasses implement ``_sample``, ``forward``, ``_inverse_dense``; optionally ``valid_mask``."""

    name: str = "transform"

    def sample(self, generator: torch.Generator, in_size: Size) -> Params:
        """Draw parameters for an image of size ``in_size``; the input size travels in the params so that the
        inverse is self-contained."""
        params = self._sample(generator, in_size)
        params["in_size"] = (int(in_size[0]), int(in_size[1]))
        return params

    @abstractmethod
    def _sample(self, generator: torch.Generator, in_size: Size) -> Params: ...

    @abstractmethod
    def forward(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """Apply to images ``B x C x H x W``."""

    def inverse(self, features: torch.Tensor, params: Params, size: Size | None = None) -> torch.Tensor:
        """Map features of the transformed image back onto the reference grid ``size`` (``h x w`` of F(x)).

        Vector features (``B x D``, e.g. classifier logits) have no spatial layout: their inverse is the identity.
        """
        if features.ndim == 2:
            return features
        if features.ndim != 4:
            raise InvalidInputError(f"features: expected B x D or B x D x h x w, got {tuple(features.shape)}")
        if size is None:
            size = tuple(features.shape[-2:])  # type: ignore[assignment]
        return self._inverse_dense(features, params, (int(size[0]), int(size[1])))

    @abstractmethod
    def _inverse_dense(self, features: torch.Tensor, params: Params, size: Size) -> torch.Tensor: ...

    def out_size(self, params: Params) -> Size:
        """Spatial size of ``forward``'s output (views with equal output size share one forward pass)."""
        return tuple(params["in_size"])  # type: ignore[return-value]

    def valid_mask(self, params: Params, size: Size, device: torch.device | str | None = None) -> torch.Tensor | None:
        """``1 x 1 x h x w`` bool mask of reference-grid pixels the view really saw; None means all valid."""
        return None

    @property
    def is_spatial(self) -> bool:
        return True

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Compose(InvertibleTransform):
    """Apply transforms in order; invert in reverse order (like kornia's ``AugmentationSequential.inverse``)."""

    name = "compose"

    def __init__(self, transforms: Sequence[InvertibleTransform]) -> None:
        if not transforms:
            raise InvalidInputError("compose: needs at least one transform")
        self.transforms = list(transforms)

    def _sample(self, generator: torch.Generator, in_size: Size) -> Params:
        children, size = [], in_size
        for t in self.transforms:
            p = t.sample(generator, size)
            children.append(p)
            size = t.out_size(p)
        return {"children": children}

    def forward(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        for t, p in zip(self.transforms, params["children"], strict=True):
            x = t.forward(x, p)
        return x

    def _inverse_dense(self, features: torch.Tensor, params: Params, size: Size) -> torch.Tensor:
        # Intermediate feature grids are the reference grid scaled like the intermediate images.
        for t, p in reversed(list(zip(self.transforms, params["children"], strict=True))):
            features = t.inverse(features, p, self._stage(p, params, size))
        return features

    def out_size(self, params: Params) -> Size:
        return self.transforms[-1].out_size(params["children"][-1])

    def valid_mask(self, params: Params, size: Size, device: torch.device | str | None = None) -> torch.Tensor | None:
        # A child's mask lives on the grid of that child's input (e.g. the flipped or resized image), so it is mapped
        # back to the reference grid through the inverses of the children before it; using it as-is mirrors a
        # rotation's mask after a flip and keeps padded corners in the loss.
        pairs = list(zip(self.transforms, params["children"], strict=True))
        mask = None
        for i, (t, p) in enumerate(pairs):
            m = t.valid_mask(p, self._stage(p, params, size), device)
            if m is None:
                continue
            mf = m.to(torch.float32)
            for tj, pj in reversed(pairs[:i]):
                mf = tj.inverse(mf, pj, self._stage(pj, params, size))
            m = mf > 0.999
            mask = m if mask is None else mask & m
        return mask

    @staticmethod
    def _stage(child: Params, params: Params, size: Size) -> Size:
        """The reference grid scaled like the child's input image."""
        h0, w0 = params["in_size"]
        hi, wi = child["in_size"]
        return max(1, round(size[0] * hi / h0)), max(1, round(size[1] * wi / w0))

    @property
    def is_spatial(self) -> bool:
        return any(t.is_spatial for t in self.transforms)
