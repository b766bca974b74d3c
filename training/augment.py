"""Training-time augmentation: batched torch ops whose randomness comes from one ``torch.Generator``.

Every function draws its random numbers from the generator it is given, in a fixed order, so a run seeded by its
recipe is reproducible on the same machine and thread count. Images are ``[0, 1]`` floats; labels, masks and boxes
are transformed with their images so they stay aligned. ``describe_augmentation`` is the sentence a model card
gives for a recipe's augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Augmentation = Mapping[str, Any]


def _uniform(b: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return torch.rand(b, generator=g) * (hi - lo) + lo


def augment_classification(x: Tensor, g: torch.Generator, aug: Augmentation) -> Tensor:
    """Per image of ``x`` (``B x C x H x W``): horizontal flip with ``hflip_p``, zoom by a factor in ``scale`` and
    rotation within +/- ``rotate_deg`` about the centre (one ``affine_grid``; zeros outside)."""
    b = x.shape[0]
    flip = torch.rand(b, generator=g) < float(aug.get("hflip_p", 0.0))
    s = _uniform(b, *aug.get("scale", (1.0, 1.0)), g)
    a = torch.deg2rad(_uniform(b, -float(aug.get("rotate_deg", 0.0)), float(aug.get("rotate_deg", 0.0)), g))
    fx = torch.where(flip, -1.0, 1.0)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    # affine_grid maps output coordinates to input coordinates: (flip the output x, then) rotate by -a, shrink by s.
    theta = torch.stack(
        [torch.stack([cos * fx, sin, torch.zeros(b)], 1), torch.stack([-sin * fx, cos, torch.zeros(b)], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_segmentation(
    x: Tensor, y: Tensor, g: torch.Generator, aug: Augmentation, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Per image of ``x`` (``B x C x H x W``) and its label map in ``y`` (``B x H x W``): horizontal flip with
    ``hflip_p`` and a random resize-crop: zoom by s in ``scale`` (s > 1 crops a random 1/s window and enlarges it;
    s < 1 shrinks the scene and places it at a random position, the border is black and labelled
    ``ignore_index``). Images are resampled bilinearly, labels by nearest neighbour."""
    b = x.shape[0]
    flip = torch.rand(b, generator=g) < float(aug.get("hflip_p", 0.0))
    s = _uniform(b, *aug.get("scale", (1.0, 1.0)), g)
    room = (1.0 - 1.0 / s).abs()  # translation keeping the crop inside (s > 1) or the scene inside (s < 1)
    tx = (torch.rand(b, generator=g) * 2 - 1) * room
    ty = (torch.rand(b, generator=g) * 2 - 1) * room
    fx = torch.where(flip, -1.0, 1.0)
    z = torch.zeros(b)
    theta = torch.stack([torch.stack([fx / s, z, tx], 1), torch.stack([z, 1.0 / s, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    xa = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Labels + 1 so that the zero padding marks pixels outside the source scene.
    lab = F.grid_sample((y + 1).unsqueeze(1).float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    lab = lab.squeeze(1).round().long() - 1
    lab[lab < 0] = ignore_index
    return xa, lab


def augment_instance(
    images: list[Tensor], targets: list[dict[str, Tensor]], g: torch.Generator, aug: Augmentation
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Per image (``C x H x W``) and its target (``boxes`` x1 y1 x2 y2, ``labels``, ``masks`` N x H x W):
    horizontal flip with ``hflip_p`` (image, masks and boxes)."""
    p = float(aug.get("hflip_p", 0.0))
    out_i, out_t = [], []
    for img, t in zip(images, targets, strict=True):
        if torch.rand(1, generator=g).item() < p:
            w = img.shape[-1]
            img = img.flip(-1)
            boxes = t["boxes"].clone()
            boxes[:, 0], boxes[:, 2] = w - t["boxes"][:, 2], w - t["boxes"][:, 0]
            t = {"boxes": boxes, "labels": t["labels"], "masks": t["masks"].flip(-1)}
        out_i.append(img)
        out_t.append(t)
    return out_i, out_t


def _describe_classification(a: Augmentation) -> str:
    lo, hi = a.get("scale", (1.0, 1.0))
    return (
        f"per image: horizontal flip p={a.get('hflip_p', 0)}, zoom x{lo}-{hi}, rotation +/-{a.get('rotate_deg', 0)} "
        "deg about the centre (one affine_grid, zero padding)"
    )


def _describe_segmentation(a: Augmentation) -> str:
    lo, hi = a.get("scale", (1.0, 1.0))
    return (
        f"per image: horizontal flip p={a.get('hflip_p', 0)}, random resize-crop with scale {lo}-{hi} (zoom in: a "
        "random window enlarged; zoom out: the scene shrunk and placed at random, border labelled ignore 255); "
        "bilinear image, nearest-neighbour labels"
    )


def _describe_instance(a: Augmentation) -> str:
    return f"per image: horizontal flip p={a.get('hflip_p', 0)} (image, masks, boxes)"


_DESCRIBERS: dict[str, Callable[[Augmentation], str]] = {
    "classification": _describe_classification,
    "segmentation": _describe_segmentation,
    "instance": _describe_instance,
}


def describe_augmentation(task: str, aug: Augmentation) -> str:
    """The model card's sentence for augmentation parameters ``aug`` of a ``task`` recipe."""
    return _DESCRIBERS[task](aug)
