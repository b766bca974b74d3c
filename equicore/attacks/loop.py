"""The one projected-gradient loop. PGD, IFGSM, FGSM, MIM, CW, Houdini and the adaptive attacks are all this loop
with a different loss (passed in) and different step rules (random start, momentum, norm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from equicore.errors import InvalidInputError
from equicore.seeding import as_seed_list, per_sample_draw
from equicore.validation import check_eps, check_finite, check_images

LossFn = Callable[[torch.Tensor], torch.Tensor]
NORMS = ("linf", "l2")


def per_sample_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    """The Lp norm of each sample, shaped to broadcast over it."""
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.ndim - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project perturbations onto the eps-ball (eps in [0,1] pixel units)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = per_sample_norm(delta, 2)
    return delta * torch.clamp(eps / (n + 1e-12), max=1.0)


def loss_and_gradient(loss_fn: LossFn, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample loss ``[B]`` at ``x_adv`` (which requires grad) and the gradient of its sum, checked: one value
    per sample, a finite gradient."""
    loss = loss_fn(x_adv)
    if loss.ndim != 1 or loss.shape[0] != x_adv.shape[0]:
        raise InvalidInputError(
            f"attack loss: expected one value per sample [{x_adv.shape[0]}], got {tuple(loss.shape)}"
        )
    (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    check_finite(grad, "attack gradient")
    return loss, grad


def random_start(x: torch.Tensor, eps: float, norm: str, seeds: Sequence[int]) -> torch.Tensor:
    """A uniform draw in the Linf ball, or a uniform direction scaled by radius ~ U^(1/d) in the L2 ball."""
    if norm == "linf":
        u = per_sample_draw("uniform", x.shape[1:], seeds, "pgd-start", device=x.device, dtype=x.dtype)
        return (2 * u - 1) * eps
    d = per_sample_draw("normal", x.shape[1:], seeds, "pgd-start", device=x.device, dtype=x.dtype)
    d = d / (per_sample_norm(d, 2) + 1e-12)
    r = per_sample_draw("uniform", (1,) * (x.ndim - 1), seeds, "pgd-radius", device=x.device, dtype=x.dtype)
    return d * eps * r.pow(1.0 / x[0].numel())


def projected_gradient(
    loss_fn: LossFn,
    x: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    random_init: bool = True,
    momentum: float | None = None,
    seeds: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Maximise ``loss_fn(x_adv).sum()`` (``loss_fn`` returns one value per sample) inside the ball.

    ``eps`` and ``step_size`` are in /255 units. ``momentum`` (MIM's decay mu) accumulates L1-normalised gradients.
    Returns ``x_adv`` detached, in [0, 1] and within ``eps`` of ``x``. Every sample's trajectory depends only on that
    sample and its seed (per-sample losses, per-sample random starts).
    """
    check_images(x, "attack input")
    if norm not in NORMS:
        raise InvalidInputError(f"norm: expected one of {NORMS}, got {norm!r}")
    eps_px = check_eps(eps, "eps") / 255.0
    step_px = check_eps(step_size, "step_size") / 255.0
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InvalidInputError(f"steps: expected an integer >= 0, got {steps!r}")
    if momentum is not None and momentum < 0:
        raise InvalidInputError(f"momentum: expected >= 0, got {momentum!r}")
    seed_list = as_seed_list(seeds, x.shape[0])
    x = x.detach()
    delta = random_start(x, eps_px, norm, seed_list) if random_init and eps_px > 0 else torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    velocity = torch.zeros_like(x)
    for _ in range(steps):
        _, grad = loss_and_gradient(loss_fn, (x + delta).requires_grad_(True))
        if momentum is not None:
            velocity = momentum * velocity + grad / (per_sample_norm(grad, 1) + 1e-12)
            grad = velocity
        if norm == "linf":
            step = step_px * grad.sign()
        else:
            step = step_px * grad / (per_sample_norm(grad, 2) + 1e-12)
        delta = project(delta + step, eps_px, norm)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()
