"""Pure functions for the invertible transforms (the ``g`` and ``g^-1`` of the paper).

Images are ``B x C x H x W``; dense features are ``B x D x h x w`` at any resolution (logits at 1/8 scale, say).
Every inverse maps features of the transformed image back onto the reference feature grid of size ``size``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def resize_to(x: torch.Tensor, size: tuple[int, int], *, antialias: bool = True) -> torch.Tensor:
    """Bilinear resize; anti-aliased when shrinking so a 0.3x view is not aliased noise."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias and shrinking)


def scaled_size(h: int, w: int, scale_h: float, scale_w: float) -> tuple[int, int]:
    return max(1, round(h * scale_h)), max(1, round(w * scale_w))


def rotation_theta(angle_deg: float, h: int, w: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """2x3 affine (normalised coordinates) sampling an image rotated by ``angle_deg`` counter-clockwise about its
    centre. The aspect-ratio terms keep the rotation rigid on non-square images (a plain normalised-coordinate
    rotation would shear them)."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    # affine_grid maps output coords to input coords, so the matrix is the inverse rotation R(-a).
    theta = torch.tensor([[c, s * h / w, 0.0], [-s * w / h, c, 0.0]], device=device, dtype=dtype)
    return theta


def rotate(x: torch.Tensor, angle_deg: float, *, mode: str = "bilinear") -> torch.Tensor:
    """Rotate about the centre, same output size, zeros outside (see :func:`rotation_valid_mask`)."""
    if angle_deg == 0:
        return x
    b, _, h, w = x.shape
    theta = rotation_theta(angle_deg, h, w, device=x.device, dtype=x.dtype).expand(b, 2, 3)
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def rotation_valid_mask(angle_deg: float, size: tuple[int, int], *, device=None) -> torch.Tensor:
    """``1 x 1 x h x w`` bool mask of reference pixels that survive rotating by ``angle`` and back: the corners a
    rotation invents carry no information and are excluded from the equivariance loss."""
    ones = torch.ones(1, 1, *size, device=device)
    there_and_back = rotate(rotate(ones, angle_deg), -angle_deg)
    return there_and_back > 0.999


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (0.299 * r + 0.587 * g + 0.114 * b).expand_as(x)


def color_jitter(
    x: torch.Tensor,
    brightness: float = 1.0,
    contrast: float = 1.0,
    saturation: float = 1.0,
    grayscale: bool = False,
) -> torch.Tensor:
    """Differentiable brightness/contrast/saturation factors (1.0 = unchanged), clamped to [0, 1]."""
    y = x * brightness
    if contrast != 1.0:
        mean = rgb_to_grayscale(y).mean(dim=(-3, -2, -1), keepdim=True)
        y = (y - mean) * contrast + mean
    if saturation != 1.0 and y.shape[1] == 3:
        gray = rgb_to_grayscale(y)
        y = (y - gray) * saturation + gray
    if grayscale:
        y = rgb_to_grayscale(y)
    return y.clamp(0.0, 1.0)
