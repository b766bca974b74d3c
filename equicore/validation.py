"""Input checks shared by attacks, defenses and adapters. Each failure names the tensor and what was expected."""

from __future__ import annotations

import math

import torch

from equicore.errors import InvalidInputError


def check_images(x: torch.Tensor, name: str = "images") -> torch.Tensor:
    """A float batch ``B x C x H x W`` with finite values in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise InvalidInputError(f"{name}: expected shape B x C x H x W, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InvalidInputError(f"{name}: expected a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise InvalidInputError(f"{name}: empty batch {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InvalidInputError(f"{name}: {bad} NaN/Inf value(s); images must be finite")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InvalidInputError(f"{name}: values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return x


def check_finite(t: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise InvalidInputError(f"{name}: contains NaN or Inf")
    return t


class FiniteGuard:
    """``check_finite`` for a loop's tensors without a host sync per step on an accelerator.

    On the CPU a tensor is checked when it is watched (free: no device to wait for). Elsewhere reading the flag would
    stall the device every step, so the flags are AND-ed on the device and read once by :meth:`check`; a non-finite
    value only propagates (NaN stays NaN through sign, clamp and the model) until then, and the error is the same.
    """

    def __init__(self, name: str, *, defer: bool | None = None) -> None:
        self.name = name
        self.defer = defer  # None: by the watched tensor's device
        self._all_finite: torch.Tensor | None = None

    def watch(self, t: torch.Tensor) -> torch.Tensor:
        if not (self.defer if self.defer is not None else t.device.type != "cpu"):
            return check_finite(t, self.name)
        flag = torch.isfinite(t).all()
        self._all_finite = flag if self._all_finite is None else self._all_finite & flag
        return t

    def check(self) -> None:
        if self._all_finite is not None and not bool(self._all_finite):
            raise InvalidInputError(f"{self.name}: contains NaN or Inf")


def check_eps(value: float, name: str = "eps", *, allow_zero: bool = True, upper: float = 255.0) -> float:
    """A perturbation budget in /255 units: finite, non-negative, at most ``upper``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name}: expected a number (in /255 units), got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero) or v > upper:
        bound = "> 0" if not allow_zero else ">= 0"
        raise InvalidInputError(f"{name}: expected {bound} and <= {upper:g} (in /255 units), got {value!r}")
    return v


def check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


def check_batch_match(x: torch.Tensor, y: torch.Tensor, name: str = "labels") -> None:
    if y.shape[0] != x.shape[0]:
        raise InvalidInputError(f"{name}: batch size {y.shape[0]} does not match images' {x.shape[0]}")
