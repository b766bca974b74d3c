"""Baselines without optimisation: vanilla (identity) and random noise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from equicore.adapters import TaskAdapter
from equicore.defenses.base import Defense
from equicore.errors import InvalidInputError
from equicore.registry import DEFENSES
from equicore.seeding import as_seed_list, per_sample_draw
from equicore.validation import check_eps, check_images


@DEFENSES.register("vanilla")
@dataclass(frozen=True)
class Vanilla(Defense):
    name = "vanilla"

    def purify(self, adapter: TaskAdapter, x: torch.Tensor, seeds: Sequence[int] | torch.Tensor | None = None):
        return check_images(x, "defense input").detach()


def resolve_eps_v(eps_v: float | None, factor: float, attack_eps: float) -> float:
    return float(eps_v) if eps_v is not None else float(factor) * float(attack_eps)


@DEFENSES.register("random_noise")
@dataclass(frozen=True)
class RandomNoise(Defense):
    """Uniform noise in the eps_v ball (Kumar et al. 2020, the paper's "Random" baseline)."""

    eps_v: float | None = None  # /255; None = eps_v_factor * attack eps
    eps_v_factor: float = 1.5
    name = "random_noise"
    randomized = True

    def __post_init__(self) -> None:
        if self.eps_v is not None:
            check_eps(self.eps_v, "random_noise.eps_v")
        if not self.eps_v_factor >= 0:
            raise InvalidInputError(f"random_noise.eps_v_factor: expected >= 0, got {self.eps_v_factor!r}")

    def with_attack_eps(self, eps: float) -> RandomNoise:
        return replace(self, eps_v=resolve_eps_v(self.eps_v, self.eps_v_factor, eps))

    def purify(self, adapter: TaskAdapter, x: torch.Tensor, seeds: Sequence[int] | torch.Tensor | None = None):
        check_images(x, "defense input")
        if self.eps_v is None:
            raise InvalidInputError("random_noise.eps_v is unset: give eps_v or resolve it from the attack eps")
        u = per_sample_draw("uniform", x.shape[1:], as_seed_list(seeds, x.shape[0]), "random-defense", device=x.device)
        return (x + (2 * u - 1) * self.eps_v / 255.0).clamp(0, 1).detach()
