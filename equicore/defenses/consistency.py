"""Test-time purification by restoring a self-consistency objective (Algorithm 1 of the paper).

``x' += eta * sign(normalize(grad L(x')) + N(0, (T-1-t)/T))`` for t = 0..T-1, projecting into the eps_v-ball
around the input and into [0, 1]. ``L`` is the equivariance objective (the paper's defense) or the invariance one
(its baseline). ``OptimizingDefense`` holds what every such defense shares (budgets, steps, noise, per-sample
seeds); the self-supervised baselines (rotation prediction, contrastive) subclass it in ``defenses/selfsup.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from equicore.adapters import TaskAdapter
from equicore.defenses.base import Defense
from equicore.defenses.simple import resolve_eps_v
from equicore.equivariance import OBJECTIVES, sample_view_params, view_features
from equicore.errors import InvalidInputError
from equicore.registry import DEFENSES
from equicore.seeding import as_seed_list, derive_seed, per_sample_draw
from equicore.transforms import InvertibleTransform, build_views
from equicore.validation import check_eps, check_finite, check_images

ViewSpec = str | Sequence[str | Mapping[str, Any]]


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
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InvalidInputError(f"{self.name}.steps: expected an integer >= 1, got {self.steps!r}")
        if self.eps_v is not None:
            check_eps(self.eps_v, f"{self.name}.eps_v")
        if self.eta is not None:
            check_eps(self.eta, f"{self.name}.eta")
        if not self.eps_v_factor >= 0:
            raise InvalidInputError(f"{self.name}.eps_v_factor: expected >= 0, got {self.eps_v_factor!r}")
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
        if self.eps_v is None:
            raise InvalidInputError(f"{self.name}.eps_v is unset: give eps_v or resolve it from the attack eps")
        eps_v = self.eps_v / 255.0
        eta = (self.eta if self.eta is not None else 2.0 * self.eps_v) / 255.0
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


@dataclass(frozen=True)
class ViewOptimizingDefense(OptimizingDefense):
    """An optimising defense whose objective compares views of the image (equivariance, invariance, contrastive).

    ``views`` is a view-set name or a list of transform specs. View parameters are drawn from ``view_seed``
    (re-drawn every step when ``resample_views``), never from the batch, so every image's result is independent of
    its batch-mates. ``batched``/``max_batch_pixels``: views of equal size share one forward pass, under a memory cap.
    """

    views: ViewSpec = "paper"
    resample_views: bool = True
    view_seed: int = 0
    batched: bool = True
    max_batch_pixels: int | None = None
    _views: list[InvertibleTransform] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_batch_pixels is not None and self.max_batch_pixels < 1:
            raise InvalidInputError(f"{self.name}.max_batch_pixels: expected >= 1, got {self.max_batch_pixels!r}")
        object.__setattr__(self, "_views", build_views(self.views))

    def params(self) -> dict[str, Any]:
        p = super().params()
        p.pop("_views", None)
        return p

    def view_params(self, step: int, in_size: tuple[int, int]):
        seed = derive_seed(self.view_seed, "views", step if self.resample_views else 0)
        return sample_view_params(self._views, seed, in_size)


@dataclass(frozen=True)
class ConsistencyDefense(ViewOptimizingDefense):
    """The equivariance / invariance defenses (Algorithm 1 on the objectives of ``equicore.equivariance``; paper
    views K=8)."""

    objective: str = "equivariance"

    name = "consistency"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise InvalidInputError(
                f"{self.name}.objective: expected one of {sorted(OBJECTIVES)}, got {self.objective!r}"
            )
        super().__post_init__()

    def score(self, adapter: TaskAdapter, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Per-sample objective value ``[B]`` (differentiable in x)."""
        vf = view_features(
            adapter.features,
            x,
            self._views,
            self.view_params(step, tuple(x.shape[-2:])),
            batched=self.batched,
            max_batch_pixels=self.max_batch_pixels,
        )
        return OBJECTIVES[self.objective](vf)


@DEFENSES.register("equivariance")
@dataclass(frozen=True)
class EquivarianceDefense(ConsistencyDefense):
    objective: str = "equivariance"
    name = "equivariance"


@DEFENSES.register("invariance")
@dataclass(frozen=True)
class InvarianceDefense(ConsistencyDefense):
    objective: str = "invariance"
    name = "invariance"
