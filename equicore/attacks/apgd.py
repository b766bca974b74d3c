"""Auto-PGD (Croce & Hein 2020, AutoAttack's first attack), with the loss passed in as for every attack here.

APGD keeps per-sample optimiser state that the plain loop in ``loop.py`` does not have: a step size that starts at
2 eps and is halved at checkpoints when the loss oscillates or stops improving (the iterate then restarts from the
best point), and a heavy-ball momentum of 0.25 on the previous move. Restarts run only on samples not yet fooled
(AutoAttack's cascade: the same answer, cheaper).

Following the reference (``fra31/auto-attack`` ``autoattack/autopgd_base.py``), with two deliberate differences:
- random starts and restarts draw from each image's own seed, so an image's result never depends on its batch-mates;
- a sample that is never fooled returns its highest-loss iterate, not the clean image: our pipeline scores the
  images on defenses the attack did not see, where the highest-loss point is the strongest transfer candidate.

"Fooled" comes from the loss itself: a loss that can tell (a :class:`~equicore.attacks.losses.LogitLoss` on class
logits) sets ``loss_fn.fooled`` from the same forward pass; for losses that cannot (dense tasks, the adaptive
attack's objective) every sample runs every restart and keeps its highest loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from equicore.attacks.loop import LossFn, loss_and_gradient, per_sample_norm
from equicore.seeding import per_sample_draw

# Checkpoint schedule of the reference, as fractions of the iteration budget.
_FIRST_CHECKPOINT, _MIN_CHECKPOINT, _CHECKPOINT_DECREASE = 0.22, 0.06, 0.03


@dataclass
class APGDResult:
    x_adv: torch.Tensor  # fooled iterate where one was found, else the highest-loss iterate
    loss: torch.Tensor  # [B] best loss reached
    fooled: torch.Tensor | None  # [B] bool, None when the loss cannot tell


def _evaluate(loss_fn: LossFn, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    loss, grad = loss_and_gradient(loss_fn, x_adv.detach().requires_grad_(True))
    fooled = getattr(loss_fn, "fooled", None)
    return loss.detach(), grad.detach(), (fooled.detach().clone() if fooled is not None else None)


def _unit(t: torch.Tensor, norm: str) -> torch.Tensor:
    return t / (per_sample_norm(t, float("inf") if norm == "linf" else 2.0) + 1e-12)


def _project(x: torch.Tensor, x_new: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return torch.min(torch.max(x_new, x - eps), x + eps).clamp(0.0, 1.0)
    delta = x_new - x
    return (x + _unit(delta, "l2") * torch.clamp(per_sample_norm(delta, 2.0), max=eps)).clamp(0.0, 1.0)


def _start(x: torch.Tensor, eps: float, norm: str, seeds: Sequence[int], restart: int) -> torch.Tensor:
    if norm == "linf":
        t = 2 * per_sample_draw("uniform", x.shape[1:], seeds, ("apgd-start", restart), device=x.device) - 1
    else:
        t = per_sample_draw("normal", x.shape[1:], seeds, ("apgd-start", restart), device=x.device)
    return (x + eps * _unit(t.to(x.dtype), norm)).clamp(0.0, 1.0)


def _oscillating(loss_steps: list[torch.Tensor], i: int, k: int, rho: float) -> torch.Tensor:
    """True where the loss rose in at most ``rho * k`` of the last ``k`` steps (the reference's condition 1)."""
    rises = torch.zeros_like(loss_steps[0])
    for back in range(k):
        # Index -1 reads the last row of a zero-initialised table in the reference; mirror it.
        prev = loss_steps[i - back - 1] if i - back - 1 >= 0 else loss_steps[-1]
        rises += (loss_steps[i - back] > prev).to(rises.dtype)
    return rises <= k * rho


def apgd_single_run(
    loss_fn: LossFn, x: torch.Tensor, *, eps: float, steps: int, norm: str, rho: float, x_start: torch.Tensor
) -> APGDResult:
    """One APGD run from ``x_start`` (pixel units); every per-sample quantity is a tensor over the batch."""
    n = x.shape[0]
    shape = (n, *([1] * (x.ndim - 1)))
    first = max(int(_FIRST_CHECKPOINT * steps), 1)
    min_len = max(int(_MIN_CHECKPOINT * steps), 1)
    decrease = max(int(_CHECKPOINT_DECREASE * steps), 1)

    x_adv = x_start.detach()
    loss, grad, fooled_now = _evaluate(loss_fn, x_adv)
    fooled = fooled_now
    x_best, x_best_adv, loss_best, grad_best = x_adv.clone(), x_adv.clone(), loss.clone(), grad.clone()
    step = torch.full(shape, 2.0 * eps, dtype=x.dtype, device=x.device)
    x_old = x_adv.clone()
    loss_steps = [torch.zeros(n, dtype=loss.dtype, device=x.device) for _ in range(steps)]
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones(n, dtype=torch.bool, device=x.device)
    k, since_check = first, 0
    for i in range(steps):
        with torch.no_grad():
            move = x_adv - x_old
            x_old = x_adv.clone()
            a = 0.75 if i > 0 else 1.0
            direction = grad.sign() if norm == "linf" else _unit(grad, "l2")
            x_1 = _project(x, x_adv + step * direction, eps, norm)
            x_adv = _project(x, x_adv + (x_1 - x_adv) * a + move * (1 - a), eps, norm)
        loss, grad, fooled_now = _evaluate(loss_fn, x_adv)
        if fooled_now is not None:
            x_best_adv[fooled_now] = x_adv[fooled_now]
            fooled = fooled | fooled_now
        loss_steps[i] = loss
        better = loss > loss_best
        x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], loss[better]
        since_check += 1
        if since_check == k:
            reduce = _oscillating(loss_steps, i, k, rho) | (~reduced_last_check & (loss_best_last_check >= loss_best))
            reduced_last_check, loss_best_last_check = reduce.clone(), loss_best.clone()
            if reduce.any():
                step[reduce] /= 2.0
                x_adv[reduce], grad[reduce] = x_best[reduce], grad_best[reduce]
            k, since_check = max(k - decrease, min_len), 0
    if fooled is not None:
        x_best = torch.where(fooled.view(shape), x_best_adv, x_best)
    return APGDResult(x_best.detach(), loss_best, fooled)


def apgd(
    loss_fn: LossFn,
    x: torch.Tensor,
    *,
    eps: float,
    steps: int = 100,
    norm: str = "linf",
    n_restarts: int = 1,
    rho: float = 0.75,
    seeds: Sequence[int],
    restart_offset: int = 0,
    active: torch.Tensor | None = None,
) -> APGDResult:
    """APGD with restarts; ``eps`` in pixel units ([0, 1]). ``active`` (bool [B]) limits the attack to those samples
    (the others are returned unchanged, as not fooled); restarts after the first run only on samples not yet fooled.

    ``loss_fn`` is called on subsets of the batch, so it must index its labels by position: losses built with
    :func:`equicore.attacks.losses.build_loss` take a ``select(idx)`` for that, done here.
    """
    n = x.shape[0]
    x = x.detach()
    out = x.clone()
    best = torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device)
    fooled_all: torch.Tensor | None = None
    todo = torch.ones(n, dtype=torch.bool, device=x.device) if active is None else active.clone()
    for r in range(n_restarts):
        idx = todo.nonzero().flatten()
        if idx.numel() == 0:
            break
        sub_loss = loss_fn.select(idx) if hasattr(loss_fn, "select") else loss_fn
        sub_seeds = [seeds[j] for j in idx.tolist()]
        xs = x[idx]
        res = apgd_single_run(
            sub_loss,
            xs,
            eps=eps,
            steps=steps,
            norm=norm,
            rho=rho,
            x_start=_start(xs, eps, norm, sub_seeds, restart_offset + r),
        )
        if res.fooled is not None:
            if fooled_all is None:
                fooled_all = torch.zeros(n, dtype=torch.bool, device=x.device)
            newly = res.fooled
            keep = newly | (res.loss > best[idx])
            fooled_all[idx[newly]] = True
            todo[idx[newly]] = False
        else:
            keep = res.loss > best[idx]
        out[idx[keep]] = res.x_adv[keep]
        best[idx[keep]] = torch.maximum(best[idx[keep]], res.loss[keep])
    return APGDResult(out, best, fooled_all)
