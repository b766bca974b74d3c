"""Running an attack: check the inputs, build its loss for the adapter and labels (outside the optimiser), pick
targets for targeted attacks, wrap the loss with the defense for BPDA/AA, and dispatch to the optimiser."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from equicore.adapters import TaskAdapter
from equicore.attacks.apgd_t import top_k_targets
from equicore.attacks.attack import Attack, AttackResult, make_targets, through_defense, truth_for
from equicore.attacks.loop import LossFn
from equicore.attacks.losses import build_loss
from equicore.attacks.square import defended_square
from equicore.defenses.base import Defense
from equicore.errors import InvalidInputError
from equicore.seeding import as_seed_list
from equicore.validation import check_batch_match, check_images


def run_attack(
    attack: Attack,
    adapter: TaskAdapter,
    x: torch.Tensor,
    y: torch.Tensor | Sequence[Mapping[str, Any]],
    seeds: Sequence[int] | torch.Tensor | None = None,
    loss_fn: LossFn | None = None,
    defense: Defense | None = None,
) -> AttackResult:
    """Build the attack's loss for this adapter and these labels (unless one is passed), wrap it with the defense
    for BPDA/AA, then run the loop. ``defense`` must be given (with its budgets resolved) for those attacks."""
    # Images first: a 3-D image would otherwise be reported as a label batch-size mismatch, or reach the model.
    check_images(x, "attack input")
    if isinstance(y, torch.Tensor):
        check_batch_match(x, y)
    else:
        # Instance targets: one dict per image (their instance counts differ, so they do not stack).
        if not isinstance(y, Sequence) or isinstance(y, (str, bytes)):
            raise InvalidInputError(f"labels: expected a tensor or a list of target dicts, got {type(y).__name__}")
        if len(y) != x.shape[0]:
            raise InvalidInputError(f"labels: {len(y)} targets do not match images' batch size {x.shape[0]}")
        if attack.targeted:
            raise InvalidInputError(f"{attack.name}: targeted attacks are not defined for instance targets")
    seed_list = as_seed_list(seeds, x.shape[0])
    if attack.optimizer == "square":
        return AttackResult(defended_square(attack, adapter, x, y, seed_list, defense), None)
    if attack.targeted and attack.target == "top":
        if loss_fn is not None:
            raise InvalidInputError(f"{attack.name}: the top-k target sweep builds its own losses")
        return AttackResult(top_k_targets(attack, adapter, x, y, seed_list, defense), None)
    targets = make_targets(adapter, x, y, attack.target) if attack.targeted else None
    if loss_fn is None:
        labels = targets if targets is not None else y
        params = {**attack.loss_params, **truth_for(attack, y)}
        loss_fn = build_loss(attack.loss, adapter, labels, targeted=attack.targeted, **params)
    loss_fn = through_defense(attack, loss_fn, adapter, seed_list, defense)
    return AttackResult(attack.perturb(x, loss_fn, seed_list), targets)
