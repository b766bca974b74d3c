"""The self-supervised objectives the rotation and contrastive defenses restore (and their heads are trained on).

- rotation: 4 logits (0/90/180/270 degrees, ``torch.rot90``); the defense minimises the mean cross-entropy of the
  four rotated copies of an image against their rotation labels.
- contrastive: a SimCLR projection to unit vectors; the defense minimises InfoNCE between an image and its
  augmented views (positives), with a FIXED bank of embeddings of training images as negatives (stored in the
  artefact), never the other images of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from equicore.equivariance import view_features
from equicore.errors import InvalidInputError
from equicore.transforms.base import InvertibleTransform, Params

ROTATIONS = 4

FeatureFn = Callable[[Tensor], Tensor]


def rotated_copies(x: Tensor) -> list[Tensor]:
    """``x`` rotated by 0, 90, 180 and 270 degrees (counter-clockwise, ``torch.rot90`` on H, W)."""
    return [torch.rot90(x, r, dims=(-2, -1)) if r else x for r in range(ROTATIONS)]


def rotation_logits(feature_fn: FeatureFn, head: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``ROTATIONS x B x 4`` logits of the rotated copies of ``x``. Copies of equal shape run in one forward pass
    (all four for square images; 0/180 and 90/270 otherwise)."""
    b = x.shape[0]
    copies = rotated_copies(x)
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, c in enumerate(copies):
        groups.setdefault(tuple(c.shape[-2:]), []).append(r)
    out: list[Tensor | None] = [None] * ROTATIONS
    for rs in groups.values():
        logits = head(feature_fn(torch.cat([copies[r] for r in rs]) if len(rs) > 1 else copies[rs[0]]))
        for j, r in enumerate(rs):
            out[r] = logits[j * b : (j + 1) * b]
    return torch.stack(out)  # type: ignore[arg-type]


def rotation_loss_from_logits(logits: Tensor) -> Tensor:
    """Per-sample mean cross-entropy ``[B]`` of ``ROTATIONS x B x 4`` logits against their rotation labels."""
    r, b = logits.shape[:2]
    labels = torch.arange(r, device=logits.device).repeat_interleave(b)
    ce = F.cross_entropy(logits.reshape(r * b, -1), labels, reduction="none")
    return ce.view(r, b).mean(0)


def rotation_loss(feature_fn: FeatureFn, head: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    return rotation_loss_from_logits(rotation_logits(feature_fn, head, x))


def embed(head: Callable[[Tensor], Tensor], features: Tensor) -> Tensor:
    return F.normalize(head(features), dim=-1, eps=1e-8)


def contrastive_embeddings(
    feature_fn: FeatureFn,
    head: Callable[[Tensor], Tensor],
    x: Tensor,
    views: Sequence[InvertibleTransform],
    params: Sequence[Params],
    *,
    batched: bool = True,
    max_batch_pixels: int | None = None,
) -> Tensor:
    """``B x (1 + K) x d`` unit embeddings of ``x`` and its K views (views of equal size share a forward pass)."""
    vf = view_features(feature_fn, x, views, params, batched=batched, max_batch_pixels=max_batch_pixels)
    return torch.stack([embed(head, f) for f in (vf.reference, *vf.transformed)], dim=1)


def info_nce(z: Tensor, bank: Tensor, temperature: float) -> Tensor:
    """Per-image InfoNCE ``[B]`` of ``z`` (``B x V x d`` unit embeddings of V views of each image).

    For every ordered pair (a, p) of distinct views of one image: ``-log exp(z_a.z_p / t) / (sum over the image's
    other views v != a of exp(z_a.z_v / t) + sum over the bank of exp(z_a.b_m / t))`` (NT-Xent with the fixed bank
    as negatives), averaged over the V(V-1) pairs. Only the image's own views and the bank enter: batch-mates never.
    """
    b, v, _ = z.shape
    if v < 2:
        raise InvalidInputError("contrastive: InfoNCE needs at least two views of each image")
    pos = torch.einsum("bvd,bwd->bvw", z, z) / temperature  # B x V x V
    neg = torch.einsum("bvd,md->bvm", z, bank) / temperature  # B x V x M
    eye = torch.eye(v, dtype=torch.bool, device=z.device)
    pos_masked = pos.masked_fill(eye, float("-inf"))
    denom = torch.logsumexp(torch.cat([pos_masked, neg], dim=2), dim=2)  # B x V
    terms = denom.unsqueeze(2) - pos  # B x V(anchor) x V(positive)
    return terms.masked_fill(eye, 0.0).sum((1, 2)) / (v * (v - 1))
