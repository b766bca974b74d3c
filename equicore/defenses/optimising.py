"""Test-time purification by maximising a per-sample objective (Algorithm 1 of the paper), and the base class of
every defense that runs it.

``x' += eta * sign(normalize(grad L(x')) + N(0, (T-1-t)/T))`` for t = 0..T-1, projecting into the eps_v-ball
around the input and into [0, 1]. ``OptimizingDefense`` holds what every such defense shares (budgets, steps, noise,
per-sample seeds); its subclasses give the objective: the equivariance and invariance defenses
(``defenses/consistency.py``) and the self-supervised baselines (``defenses/selfsup.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from equicore.adapters import TaskAdapter
from equicore.defenses.base import Defense
from equicore.defenses.budget import check_budget, require_eps_v, resolve_eps_v
from equicore.errors import InvalidInputError
from equicore.seeding import as_seed_list, per_sample_draw
from equicore.validation import check_finite, check_images, check_positive_int


def normalize_per_sample(grad: torch.Tensor, how: str = "rms") -> torch.Tensor:
    """Scale each sample's gradient to unit RMS ("rms") or unit L2 norm ("l2").

    Per sample, not over the batch: a batch-wide norm makes each image's step depend on its batch-mates, and with
    unit-L2 scaling over a whole batch the elements are ~1/sqrt(numel) so the N(0, 1) noise swamps the gradient. Unit
    RMS keeps gradient entries O(1), comparable with the annealed noise, as Algorithm 1 intends.
    """
    flat = grad.flatten(1).norm(dim=1)
    if how == "rms":
        flat = flat / math.sqrt(grad[0].numel())
    elif how != "l2":
        raise InvalidInputError(f"grad_norm: expected 'rms' or 'l2', got {how!r}")
    return grad / (flat.view(-1, *([1] * (grad.ndim - 1))) + 1e-12)


def noise_std(t: int, steps: int) -> float:
    """Algorithm 1 anneals the noise variance (T-1-t)/T linearly to zero at the last step."""
    return math.sqrt(max(0.0, (steps - 1 - t) / steps))


def optimize_objective(
    score_fn: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    *,
    eps_v: float,
    eta: float,
    steps: int,
    seeds: Sequence[int],
    noise: bool = True,
    random_start: bool = False,
    grad_norm: str = "rms",
) -> torch.Tensor:
    """Maximise ``score_fn(x', t) -> [B]`` by Algorithm 1's noisy signed steps; eps_v and eta in [0,1] units."""
    x0 = x.detach()
    xp = x0
    if random_start and eps_v > 0:
        u = per_sample_draw("uniform", x.shape[1:], seeds, "defense-start", device=x.device, dtype=x.dtype)
        xp = (x0 + (2 * u - 1) * eps_v).clamp(0, 1)
    for t in range(steps):
        xp = xp.detach().requires_grad_(True)
        score = score_fn(xp, t)
        (grad,) = torch.autograd.grad(score.sum(), xp)
        check_finite(grad, "defense gradient")
        direction = normalize_per_sample(grad, grad_norm)
        if noise:
            sigma = noise_std(t, steps)
            if sigma > 0:
                z = per_sample_draw("normal", x.shape[1:], seeds, ("defense-noise", t), device=x.device, dtype=x.dtype)
                direction = direction + sigma * z
        xp = xp.detach() + eta * direction.sign()
        xp = torch.min(torch.max(xp, x0 - eps_v), x0 + eps_v).clamp(0, 1)
    return xp.detach()


@dataclass(frozen=True)
class OptimizingDefense(Defense):
    """Parameters and ``purify`` shared by every defense that runs Algorithm 1 on a per-sample ``score``.

    Budgets in /255 units: ``eps_v`` None means ``eps_v_factor`` x the attack's eps (paper: 1.5); ``eta`` None means
    2 x eps_v (paper). Subclasses implement ``score(adapter, x, step) -> [B]``, the objective being MAXIMISED
    (differentiable in x); ``prepare(adapter)`` runs once per ``purify`` before the first step (e.g. loading a head).
    """

    steps: int = 20
    eps_v: float | None = None
    eps_v_factor: float = 1.5
    eta: float | None = None
    noise: bool = True
    random_start: bool = False
    grad_norm: str = "rms"

    name = "optimizing"
    optimizes_at_test_time = True

    def __post_init__(self) -> None:
        check_positive_int(self.steps, f"{self.name}.steps")
        check_budget(self.name, self.eps_v, self.eps_v_factor, self.eta)
        if self.grad_norm not in ("rms", "l2"):
            raise InvalidInputError(f"{self.name}.grad_norm: expected 'rms' or 'l2', got {self.grad_norm!r}")

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return self.noise or self.random_start

    def with_attack_eps(self, eps: float) -> OptimizingDefense:
        return replace(self, eps_v=resolve_eps_v(self.eps_v, self.eps_v_factor, eps))

    def score(self, adapter: TaskAdapter, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Per-sample objective value ``[B]`` (differentiable in x); ``purify`` maximises it."""
        raise NotImplementedError

    def prepare(self, adapter: TaskAdapter) -> None:
        """Checks and loading that must happen before the first step (after the input checks). Default: none."""

    def purify(self, adapter: TaskAdapter, x: torch.Tensor, seeds: Sequence[int] | torch.Tensor | None = None):
        check_images(x, "defense input")
        budget = require_eps_v(self.name, self.eps_v)
        eps_v = budget / 255.0
        eta = (self.eta if self.eta is not None else 2.0 * budget) / 255.0
        if eps_v == 0:
            return x.detach()
        seed_list = as_seed_list(seeds, x.shape[0])
        self.prepare(adapter)
        return optimize_objective(
            lambda xp, t: self.score(adapter, xp, t),
            x,
            eps_v=eps_v,
            eta=eta,
            steps=self.steps,
            seeds=seed_list,
            noise=self.noise,
            random_start=self.random_start,
            grad_norm=self.grad_norm,
        )
