"""Defense-aware losses for the one projected-gradient loop: BPDA (+EOT) and the adaptive attack (AA, eq. 6).

Both wrap the attack's task loss (built outside, as for every attack) with the defense under attack:

* ``bpda_loss``: the defense runs in the forward pass, the identity in the backward pass (Athalye et al. 2018):
  ``x_st = x + stopgrad(h(x) - x)`` so ``d L(F(x_st)) / dx`` is the task-loss gradient AT THE PURIFIED IMAGE. For a
  randomised defense the gradient is averaged over ``eot`` independent draws of its randomness (EOT); every draw of
  every step has its own per-sample seed, so an image's attack never depends on its batch-mates.
* ``adaptive_loss``: ``L_task(x) + lambda_e * S(x)`` where ``S`` is the defense's own self-consistency objective
  (the equivariance score for the paper's defense; ``score`` of any defense that has one) evaluated AT THE
  PERTURBED INPUT, so the gradient flows through it. (The official code computes the equivariance term on the
  clean image, which makes its "AA" plain PGD.) Defenses with no objective (vanilla, random noise) get the
  equivariance score over ``fallback_views``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from equicore.adapters import TaskAdapter
from equicore.attacks.loop import LossFn
from equicore.defenses.base import Defense
from equicore.equivariance import OBJECTIVES, sample_view_params, view_features
from equicore.errors import InvalidInputError
from equicore.seeding import derive_seed
from equicore.transforms import build_views
from equicore.validation import check_positive_int


class BPDALoss:
    """Straight-through (BPDA) loss through ``defense.purify``, averaged over ``eot`` draws of its randomness.

    Deterministic defenses are purified once per step whatever ``eot`` says: the draws would be identical. The
    attack calls the loss once per step, in order: the call count seeds that step's draws (shared with subsets made
    by ``select``, so a restart on the samples not yet fooled continues the count). ``fooled``: the defended model
    misclassifies under every draw of the last call.
    """

    def __init__(
        self,
        task_loss: LossFn,
        defense: Defense,
        adapter: TaskAdapter,
        seeds: Sequence[int],
        eot: int = 1,
        calls: list[int] | None = None,
    ) -> None:
        check_positive_int(eot, "bpda.eot")
        self.task_loss, self.defense, self.adapter, self.seeds, self.eot = task_loss, defense, adapter, seeds, eot
        self.draws = eot if defense.randomized else 1
        self.calls = calls if calls is not None else [0]
        self.fooled: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        step = self.calls[0]
        self.calls[0] += 1
        total, fooled = None, None
        for k in range(self.draws):
            draw_seeds = [derive_seed(s, "bpda", step, k) for s in self.seeds]
            purified = self.defense.purify(self.adapter, x.detach(), draw_seeds)
            straight_through = x + (purified - x).detach()
            value = self.task_loss(straight_through)
            total = value if total is None else total + value
            drew = getattr(self.task_loss, "fooled", None)
            fooled = None if drew is None else (drew if fooled is None else fooled & drew)
        self.fooled = fooled
        return total / self.draws

    def select(self, idx: torch.Tensor) -> BPDALoss:
        sub = self.task_loss.select(idx)  # type: ignore[attr-defined]
        return BPDALoss(sub, self.defense, self.adapter, [self.seeds[i] for i in idx.tolist()], self.eot, self.calls)


def bpda_loss(task_loss: LossFn, defense: Defense, adapter: TaskAdapter, seeds: Sequence[int], eot: int = 1) -> LossFn:
    """See :class:`BPDALoss`."""
    return BPDALoss(task_loss, defense, adapter, seeds, eot)


def defense_objective(defense: Defense, fallback_views: str | Sequence = "paper"):
    """``score(adapter, x, step) -> [B]``: the defense's own objective, or the equivariance score for defenses
    without one (the attacker then keeps the image equivariant, as the paper's AA does)."""
    score = getattr(defense, "score", None)
    if callable(score):
        return score
    views = build_views(fallback_views)

    def equivariance(adapter: TaskAdapter, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        params = sample_view_params(views, derive_seed("aa-views", step), tuple(x.shape[-2:]))
        return OBJECTIVES["equivariance"](view_features(adapter.features, x, views, params))

    return equivariance


class AdaptiveLoss:
    """Paper eq. 6: ``L_task(x_a) + lambda_e * S(x_a)`` with ``S`` differentiated at ``x_a``. ``fooled`` stays None:
    the undefended logits do not say whether the defended model is fooled."""

    def __init__(self, task_loss: LossFn, objective, adapter: TaskAdapter, lambda_e: float, calls=None) -> None:
        self.task_loss, self.objective, self.adapter, self.lambda_e = task_loss, objective, adapter, lambda_e
        self.calls = calls if calls is not None else [0]
        self.fooled: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        step = self.calls[0]
        self.calls[0] += 1
        value = self.task_loss(x)
        if self.lambda_e > 0:
            value = value + self.lambda_e * self.objective(self.adapter, x, step)
        return value

    def select(self, idx: torch.Tensor) -> AdaptiveLoss:
        sub = self.task_loss.select(idx)  # type: ignore[attr-defined]
        return AdaptiveLoss(sub, self.objective, self.adapter, self.lambda_e, self.calls)


def adaptive_loss(
    task_loss: LossFn,
    defense: Defense,
    adapter: TaskAdapter,
    lambda_e: float,
    fallback_views: str | Sequence = "paper",
) -> LossFn:
    """Paper eq. 6 (see :class:`AdaptiveLoss`)."""
    if not lambda_e >= 0 or lambda_e == float("inf"):
        raise InvalidInputError(f"aa.lambda_e: expected a finite value >= 0, got {lambda_e!r}")
    return AdaptiveLoss(task_loss, defense_objective(defense, fallback_views), adapter, lambda_e)
