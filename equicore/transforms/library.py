"""The transforms the paper uses: identity, horizontal flip, resize, rotation, colour jitter."""

from __future__ import annotations

import math

import torch

from equicore.errors import InvalidInputError
from equicore.registry import TRANSFORMS
from equicore.transforms import functional as TF
from equicore.transforms.base import InvertibleTransform, Params, Size


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    if low == high:
        return float(low)
    u = torch.rand((), generator=generator, device=generator.device).item()
    return float(low + (high - low) * u)


def _as_range(value: float | tuple[float, float] | list[float], name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    lo, hi = (float(v) for v in value)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise InvalidInputError(f"{name}: expected a number or a [low, high] range with low <= high, got {value!r}")
    return lo, hi


# Where a transform's maths live besides this module.
_MODULES = ("equicore.transforms.base", "equicore.transforms.functional")


@TRANSFORMS.register("identity", modules=_MODULES)
class Identity(InvertibleTransform):
    name = "identity"

    def _sample(self, generator: torch.Generator, in_size: Size) -> Params:
        return {}

    def forward(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return x

    def _inverse_dense(self, features: torch.Tensor, params: Params, size: Size) -> torch.Tensor:
        return TF.resize_to(features, size, antialias=False)

    @property
    def is_spatial(self) -> bool:
        return False


@TRANSFORMS.register("hflip", modules=_MODULES)
class HorizontalFlip(InvertibleTransform):
    name = "hflip"

    def _sample(self, generator: torch.Generator, in_size: Size) -> Params:
        return {}

    def forward(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return TF.hflip(x)

    def _inverse_dense(self, features: torch.Tensor, params: Params, size: Size) -> torch.Tensor:
        return TF.resize_to(TF.hflip(features), size, antialias=False)


@TRANSFORMS.register("resize", modules=_MODULES)
class Resize(InvertibleTransform):
    """Scale by a factor drawn from ``scale``; ``aspect_jitter`` a draws the width factor from scale*[1-a, 1+a]."""

    name = "resize"

    def __init__(self, scale: float | tuple[float, float] = (0.3, 2.0), aspect_jitter: float = 0.0) -> None:
        self.scale = _as_range(scale, "resize.scale")
        if self.scale[0] <= 0:
            raise InvalidInputError(f"resize.scale: factors must be > 0, got {scale!r}")
        if not 0.0 <= aspect_jitter < 1.0:
            raise InvalidInputError(f"resize.aspect_jitter: expected 0 <= a < 1, got {aspect_jitter!r}")
        self.aspect_jitter = float(aspect_jitter)

    def _sample(self, generator: torch.Generator, in_size: Size) -> Params:
        s = _uniform(generator, *self.scale)
        a = _uniform(generator, 1 - self.aspect_jitter, 1 + self.aspect_jitter)
        return {"size": TF.scaled_size(in_size[0], in_size[1], s, s * a)}

    def forward(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return TF.resize_to(x, tuple(params["size"]))

    def _inverse_dense(self, features: torch.Tensor, params: Params, size: Size) -> torch.Tensor:
        # Bilinear without antialias: features are compared pointwise, smoothing would blur class boundaries.
        return TF.resize_to(features, size, antialias=False)

    def out_size(self, params: Params) -> Size:
        return tuple(params["size"])  # type: ignore[return-value]


@TRANSFORMS.register("rotate", modules=_MODULES)
class Rotate(InvertibleTransform):
    """Rigid rotation about the centre by an angle drawn from ``degrees`` (default within +/-15 degrees)."""

    name = "rotate"

    def __init__(self, degrees: float | tuple[float, float] = (-15.0, 15.0)) -> None:
        self.degrees = _as_range(degrees, "rotate.degrees")

    def _sample(self, generator: torch.Generator, in_size: Size) -> Params:
        return {"angle": _uniform(generator, *self.degrees)}

    def forward(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return TF.rotate(x, params["angle"])

    def _inverse_dense(self, features: torch.Tensor, params: Params, size: Size) -> torch.Tensor:
        return TF.rotate(TF.resize_to(features, size, antialias=False), -params["angle"])

    def valid_mask(self, params: Params, size: Size, device: torch.device | str | None = None) -> torch.Tensor | None:
        return TF.rotation_valid_mask(params["angle"], size, device=device)


@TRANSFORMS.register("color_jitter", modules=_MODULES)
class ColorJitter(InvertibleTransform):
    """Brightness/contrast/saturation factors drawn from 1 +/- the given amounts; optional grayscale with
    probability ``grayscale_p``. Photometric only: its inverse on features is the identity."""

    name = "color_jitter"

    def __init__(
        self, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3, grayscale_p: float = 0.0
    ) -> None:
        for key, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= v < 1.0:
                raise InvalidInputError(f"color_jitter.{key}: expected 0 <= value < 1, got {v!r}")
        if not 0.0 <= grayscale_p <= 1.0:
            raise InvalidInputError(f"color_jitter.grayscale_p: expected a probability, got {grayscale_p!r}")
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.grayscale_p = grayscale_p

    def _sample(self, generator: torch.Generator, in_size: Size) -> Params:
        return {
            "brightness": _uniform(generator, 1 - self.brightness, 1 + self.brightness),
            "contrast": _uniform(generator, 1 - self.contrast, 1 + self.contrast),
            "saturation": _uniform(generator, 1 - self.saturation, 1 + self.saturation),
            "grayscale": _uniform(generator, 0.0, 1.0) < self.grayscale_p,
        }

    def forward(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return TF.color_jitter(x, params["brightness"], params["contrast"], params["saturation"], params["grayscale"])

    def _inverse_dense(self, features: torch.Tensor, params: Params, size: Size) -> torch.Tensor:
        return TF.resize_to(features, size, antialias=False)

    @property
    def is_spatial(self) -> bool:
        return False
