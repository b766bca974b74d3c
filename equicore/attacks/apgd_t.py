"""APGD-T (AutoAttack): targeted APGD over the top-k other classes of each image, one run per target rank."""

from __future__ import annotations

import torch

from equicore.adapters import TaskAdapter
from equicore.attacks.attack import Attack, through_defense, truth_for
from equicore.attacks.losses import build_loss
from equicore.defenses.base import Defense


def top_k_targets(
    attack: Attack, adapter: TaskAdapter, x: torch.Tensor, y: torch.Tensor, seeds: list[int], defense: Defense | None
) -> torch.Tensor:
    """APGD-T (AutoAttack): one run per target rank k = 2..n_target_classes+1 (the k-th highest clean logit), each
    only on samples not yet fooled. Per pixel for segmentation (the k-th class of each pixel)."""
    with torch.no_grad():
        ranked = adapter.logits(x).argsort(dim=1, descending=True)
    n_classes = ranked.shape[1]
    out = x.detach().clone()
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    best = torch.full((x.shape[0],), float("-inf"), device=x.device)
    for rank in range(1, min(attack.n_target_classes, n_classes - 1) + 1):
        targets = ranked[:, rank]
        ignore = getattr(adapter, "ignore_index", None)
        if ignore is not None and y.ndim > 1:
            targets = torch.where(y == ignore, y, targets)
        params = {**attack.loss_params, **truth_for(attack, y)}
        task_loss = build_loss(attack.loss, adapter, targets, targeted=True, **params)
        loss_fn = through_defense(attack, task_loss, adapter, seeds, defense)
        res = attack.run_apgd(loss_fn, x, seeds, restart_offset=rank * attack.n_restarts, active=active)
        ran = active.clone()
        if res.fooled is not None:
            newly = res.fooled & ran
            keep = newly | (ran & ~res.fooled & (res.loss > best))
            active &= ~res.fooled
        else:
            keep = ran & (res.loss > best)
        out[keep] = res.x_adv[keep]
        best = torch.where(keep, res.loss, best)
        if not active.any():
            break
    return out
