"""Fitting and scoring the heads on pooled backbone features.

- rotation: every training image in its 4 rotations (``torch.rot90``), a 4-way cross-entropy.
- contrastive: every training image as itself plus ``augmentations`` views drawn from the defense's view set
  (``simclr``), NT-Xent (SimCLR) between two random views of each image with the other images of the minibatch as
  negatives; afterwards a FIXED bank of embeddings of a seeded sample of the training split is stored in the
  artefact: at test time the defense uses it as its negatives, never the batch.

Randomness comes from generators seeded by ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from equicore.adapters import TaskAdapter
from equicore.equivariance import sample_view_params
from equicore.heads import ROTATIONS, HeadMeta, SelfSupHead, embed, head_state, info_nce, rotated_copies
from equicore.seeding import derive_seed
from equicore.seeding import generator as make_generator
from equicore.transforms import InvertibleTransform
from training.heads.backbone import pooled_features
from training.heads.settings import HeadSettings

Log = Callable[[str], None]


@dataclass
class FittedHead:
    """A fitted head with what its artefact and card record."""

    meta: HeadMeta
    head: SelfSupHead
    bank: Tensor | None
    train_figures: dict[str, float]
    feature_time_s: float
    bank_indices: list[int] | None = None

    def state(self) -> dict[str, Tensor]:
        return head_state(self.meta, self.head, self.bank)


def _standardise(head: SelfSupHead, pooled: Tensor) -> None:
    head.mean.copy_(pooled.mean(0))
    head.std.copy_(pooled.std(0).clamp_min(1e-4))


def _minibatches(n: int, batch_size: int, g: torch.Generator) -> list[Tensor]:
    perm = torch.randperm(n, generator=g)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


# ------------------------------------------------------------------------------------------------- rotation


def rotation_features(adapter: TaskAdapter, images: Tensor, grid: int) -> Tensor:
    """``ROTATIONS x N x D`` pooled features of every image rotated by 0/90/180/270 degrees."""
    return torch.stack(
        [pooled_features(adapter, images, grid, lambda x, _k, r=r: rotated_copies(x)[r]) for r in range(ROTATIONS)]
    )


def fit_rotation_head(
    feats: Tensor, settings: HeadSettings, grid: int, seed: int, log: Log = print
) -> tuple[SelfSupHead, dict[str, float]]:
    """Fit a rotation head on ``ROTATIONS x N x D`` pooled features; returns it and its final training figures."""
    r, n, d = feats.shape
    x = feats.reshape(r * n, d)
    y = torch.arange(r).repeat_interleave(n)
    torch.manual_seed(derive_seed(seed, "rotation-head-init"))
    head = SelfSupHead(d, settings.hidden, ROTATIONS, grid)
    _standardise(head, x)
    opt = torch.optim.Adam(head.net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    g = make_generator(derive_seed(seed, "rotation-head-batches"))
    stats: dict[str, float] = {}
    for epoch in range(1, settings.epochs + 1):
        loss_sum, correct, seen = 0.0, 0, 0
        for idx in _minibatches(r * n, settings.batch_size, g):
            logits = head.forward_pooled(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            seen += len(idx)
        stats = {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}
        if epoch == 1 or epoch == settings.epochs or epoch % 5 == 0:
            log(
                f"[rotation head] epoch {epoch}/{settings.epochs} loss {stats['train_loss']:.4f} "
                f"accuracy {stats['train_accuracy']:.4f}"
            )
    return head.eval(), stats


@torch.no_grad()
def rotation_accuracy(head: SelfSupHead, feats: Tensor) -> dict[str, Any]:
    """Rotation-prediction accuracy of ``head`` on ``ROTATIONS x N x D`` pooled features (chance 1/4)."""
    r, n, _ = feats.shape
    pred = head.forward_pooled(feats.reshape(r * n, -1)).argmax(1)
    y = torch.arange(r).repeat_interleave(n)
    per = [(pred[k * n : (k + 1) * n] == k).float().mean().item() for k in range(r)]
    return {
        "metric": "rotation_accuracy",
        "value": float((pred == y).float().mean()),
        "chance": 1.0 / r,
        "per_rotation": [round(v, 4) for v in per],
        "predictions": r * n,
    }


# ---------------------------------------------------------------------------------------------- contrastive


def augmented_features(
    adapter: TaskAdapter,
    images: Tensor,
    views: Sequence[InvertibleTransform],
    grid: int,
    augmentations: int,
    seed: int,
) -> Tensor:
    """``(1 + A) x N x D``: slot 0 the images themselves, slots 1..A a random view per chunk of images (view and its
    parameters drawn from a generator seeded by ``seed``)."""
    g = make_generator(derive_seed(seed, "contrastive-augment"))
    in_size = (int(images.shape[-2]), int(images.shape[-1]))

    def augment(x: Tensor, _k: int) -> Tensor:
        v = views[int(torch.randint(len(views), (), generator=g))]
        return v.forward(x, v.sample(g, in_size))

    slots = [pooled_features(adapter, images, grid)]
    slots += [pooled_features(adapter, images, grid, augment) for _ in range(augmentations)]
    return torch.stack(slots)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent over 2B unit embeddings (positives: the same row of z1 and z2)."""
    b = z1.shape[0]
    z = torch.cat([z1, z2])
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(b) + b, torch.arange(b)])
    return F.cross_entropy(sim, targets)


def fit_contrastive_head(
    feats: Tensor, settings: HeadSettings, grid: int, seed: int, log: Log = print
) -> tuple[SelfSupHead, dict[str, float]]:
    """Fit a projection head on ``S x N x D`` pooled features of S views per image (NT-Xent, two random views of
    each image per step)."""
    s, n, d = feats.shape
    torch.manual_seed(derive_seed(seed, "contrastive-head-init"))
    head = SelfSupHead(d, settings.hidden, settings.out_dim, grid)
    _standardise(head, feats.reshape(s * n, d))
    opt = torch.optim.Adam(head.net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    g = make_generator(derive_seed(seed, "contrastive-head-batches"))
    stats: dict[str, float] = {}
    for epoch in range(1, settings.epochs + 1):
        loss_sum, seen = 0.0, 0
        for idx in _minibatches(n, settings.batch_size, g):
            if len(idx) < 2:
                continue
            a = torch.randint(s, (len(idx),), generator=g)
            b = (a + torch.randint(1, s, (len(idx),), generator=g)) % s
            z1 = embed(head.forward_pooled, feats[a, idx])
            z2 = embed(head.forward_pooled, feats[b, idx])
            loss = nt_xent(z1, z2, settings.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
        stats = {"train_nt_xent": loss_sum / max(1, seen)}
        if epoch == 1 or epoch == settings.epochs or epoch % 5 == 0:
            log(f"[contrastive head] epoch {epoch}/{settings.epochs} NT-Xent {stats['train_nt_xent']:.4f}")
    return head.eval(), stats


@torch.no_grad()
def contrastive_eval(head: SelfSupHead, feats: Tensor, bank: Tensor, temperature: float) -> dict[str, Any]:
    """Held-out figures of a projection head on ``(1 + K) x N x D`` pooled features (slot 0: the images, slots 1..K:
    the defense's K views): for every (image, view) pair, whether the view's embedding is closer to the image's than
    every bank negative (chance 1/(M+1)) and than every other held-out image's view (chance 1/N); and the mean
    InfoNCE the defense minimises."""
    s, n, _ = feats.shape
    z = torch.stack([embed(head.forward_pooled, feats[k]) for k in range(s)], dim=1)  # N x S x d
    anchor = z[:, 0]
    neg_best = (anchor @ bank.t()).max(1).values  # N
    vs_bank, within = [], []
    for k in range(1, s):
        pos = (anchor * z[:, k]).sum(1)
        vs_bank.append((pos > neg_best).float())
        within.append(((anchor @ z[:, k].t()).argmax(1) == torch.arange(n)).float())
    return {
        "metric": "view_vs_bank_top1",
        "value": float(torch.cat(vs_bank).mean()),
        "chance": 1.0 / (bank.shape[0] + 1),
        "within_test_top1": float(torch.cat(within).mean()),
        "within_test_chance": 1.0 / n,
        "info_nce": float(info_nce(z, bank, temperature).mean()),
        "pairs": n * (s - 1),
    }


@torch.no_grad()
def make_bank(head: SelfSupHead, pooled: Tensor) -> Tensor:
    """``M x d`` unit embeddings of the bank images' pooled features: the contrastive defense's fixed negatives."""
    return embed(head.forward_pooled, pooled)


def defense_view_features(
    adapter: TaskAdapter, images: Tensor, views: Sequence[InvertibleTransform], grid: int, view_seed: int = 0
) -> Tensor:
    """``(1 + K) x N x D``: the images and the K views the contrastive defense uses at step 0 of ``view_seed``."""
    params = sample_view_params(
        views, derive_seed(view_seed, "views", 0), (int(images.shape[-2]), int(images.shape[-1]))
    )
    slots = [pooled_features(adapter, images, grid)]
    for v, p in zip(views, params, strict=True):
        slots.append(pooled_features(adapter, images, grid, lambda x, _k, v=v, p=p: v.forward(x, p)))
    return torch.stack(slots)
