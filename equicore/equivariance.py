"""Equivariance and invariance objectives (paper eq. 2 and its invariance baseline), with batched views.

All views whose transformed images have the same size run in ONE forward pass together with the reference
F(x) (grouped by size); a memory cap splits a group into chunks. ``batched=False`` is the faithful per-view loop
(one forward per view, as the official code does); both give the same numbers up to float tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from equicore.registry import Registry
from equicore.seeding import generator as make_generator
from equicore.transforms.base import InvertibleTransform, Params

FeatureFn = Callable[[torch.Tensor], torch.Tensor]

# Name -> consistency objective ``[B]`` of a ``ViewFeatures`` (the entries are the functions themselves: look them up
# with ``OBJECTIVES[name]`` or ``OBJECTIVES.get(name)``; there is nothing to build).
OBJECTIVES: Registry[torch.Tensor] = Registry("consistency objective")


def sample_view_params(views: Sequence[InvertibleTransform], seed: int, in_size: tuple[int, int]) -> list[Params]:
    """View parameters from a seed (not from the batch), so every image in any batch sees the same views."""
    g = make_generator(seed)
    return [v.sample(g, in_size) for v in views]


@dataclass
class ViewFeatures:
    reference: torch.Tensor  # F(x): B x D x h x w (or B x D)
    inverted: list[torch.Tensor]  # g_i^-1 F(g_i x), each on the reference grid
    masks: list[torch.Tensor | None]  # 1 x 1 x h x w valid pixels per view (None: all valid)
    transformed: list[torch.Tensor]  # F(g_i x) before inversion (for invariance and figures)
    forwards: int  # model passes used (for benchmarks)


def _chunks(n_images: int, pixels: int, max_pixels: int | None) -> list[tuple[int, int]]:
    if not max_pixels:
        return [(0, n_images)]
    per = max(1, max_pixels // max(1, pixels))
    return [(i, min(n_images, i + per)) for i in range(0, n_images, per)]


def view_features(
    feature_fn: FeatureFn,
    x: torch.Tensor,
    views: Sequence[InvertibleTransform],
    params: Sequence[Params],
    *,
    batched: bool = True,
    max_batch_pixels: int | None = None,
) -> ViewFeatures:
    """Compute F(x) and every F(g_i x), inverted onto F(x)'s grid."""
    b = x.shape[0]
    in_size = tuple(x.shape[-2:])
    # Slot 0 is the reference (identity); slots 1..K the views.
    images = [x] + [v.forward(x, p) for v, p in zip(views, params, strict=True)]
    outputs: list[torch.Tensor | None] = [None] * len(images)
    forwards = 0
    if batched:
        groups: dict[tuple[int, ...], list[int]] = {}
        for slot, img in enumerate(images):
            groups.setdefault(tuple(img.shape[-2:]), []).append(slot)
        # Larger groups first is irrelevant for results; sort for a deterministic order of kernels.
        for size, slots in sorted(groups.items(), key=lambda kv: kv[1][0]):
            stacked = torch.cat([images[s] for s in slots]) if len(slots) > 1 else images[slots[0]]
            parts = []
            for lo, hi in _chunks(stacked.shape[0], size[0] * size[1], max_batch_pixels):
                parts.append(feature_fn(stacked[lo:hi]))
                forwards += 1
            feats = torch.cat(parts) if len(parts) > 1 else parts[0]
            for j, s in enumerate(slots):
                outputs[s] = feats[j * b : (j + 1) * b]
    else:
        for slot, img in enumerate(images):
            outputs[slot] = feature_fn(img)
            forwards += 1
    ref = outputs[0]
    assert ref is not None
    ref_size = tuple(ref.shape[-2:]) if ref.ndim == 4 else None
    inverted, masks, transformed = [], [], []
    for v, p, out in zip(views, params, outputs[1:], strict=True):
        assert out is not None
        transformed.append(out)
        inverted.append(v.inverse(out, p, ref_size))
        masks.append(v.valid_mask(p, ref_size, device=x.device) if ref_size is not None else None)
    del in_size
    return ViewFeatures(ref, inverted, masks, transformed, forwards)


@OBJECTIVES.register("equivariance")
def equivariance_score(vf: ViewFeatures) -> torch.Tensor:
    """Paper eq. 2 as a mean (not a sum) over views: ``[B]`` in [-1, 1]; higher is more equivariant. Averaging keeps
    the objective's scale independent of K and of batch size (each sample's score is its own)."""
    # The reference is unit-normalised once per step, not once per view (same value as F.cosine_similarity).
    ref = F.normalize(vf.reference, dim=1, eps=1e-8)
    per_view = []
    for inv, mask in zip(vf.inverted, vf.masks, strict=True):
        cos = (F.normalize(inv, dim=1, eps=1e-8) * ref).sum(1)
        per_view.append(_masked_mean(cos, mask))
    return torch.stack(per_view).mean(0)


def _masked_mean(cos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if cos.ndim == 1:  # vector features
        return cos
    if mask is None:
        return cos.flatten(1).mean(1)
    m = mask[:, 0].to(cos.dtype).expand_as(cos)
    return (cos * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)


@OBJECTIVES.register("invariance")
def invariance_score(vf: ViewFeatures) -> torch.Tensor:
    """The invariance baseline: cosine of globally average-pooled features of g_i(x) and x, mean over views."""

    def pool(f: torch.Tensor) -> torch.Tensor:
        return f.mean(dim=(-2, -1)) if f.ndim == 4 else f

    ref = pool(vf.reference)
    return torch.stack([F.cosine_similarity(pool(t), ref, dim=1, eps=1e-8) for t in vf.transformed]).mean(0)


def consistency_score(
    feature_fn: FeatureFn,
    x: torch.Tensor,
    views: Sequence[InvertibleTransform],
    params: Sequence[Params],
    objective: str = "equivariance",
    **kwargs,
) -> torch.Tensor:
    """``[B]`` score of the named objective for images ``x`` (differentiable w.r.t. ``x``)."""
    return OBJECTIVES[objective](view_features(feature_fn, x, views, params, **kwargs))
