"""Baselines without optimisation: vanilla (identity) and random noise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from equicore.adapters import TaskAdapter
from equicore.defenses.base import Defense
from equicore.defenses.budget import check_budget, require_eps_v, resolve_eps_v
from equicore.registry import DEFENSES
from equicore.seeding import as_seed_list, per_sample_draw
from equicore.validation import check_images

__all__ = ["RandomNoise", "Vanilla", "resolve_eps_v"]


@DEFENSES.register("vanilla", modules=("equicore.defenses.base",))
@dataclass(frozen=True)
class Vanilla(Defense):
    name = "vanilla"

    def purify(self, adapter: TaskAdapter, x: torch.Tensor, seeds: Sequence[int] | torch.Tensor | None = None):
        return check_images(x, "defense input").detach()


@DEFENSES.register("random_noise", modules=("equicore.defenses.base", "equicore.defenses.budget", "equicore.seeding"))
@dataclass(frozen=True)
class RandomNoise(Defense):
    """Uniform noise in the eps_v ball (Kumar et al. 2020, the paper's "Random" baseline)."""

    eps_v: float | None = None  # /255; None = eps_v_factor * attack eps
    eps_v_factor: float = 1.5
    name = "random_noise"
    randomized = True

    def __post_init__(self) -> None:
        check_budget(self.name, self.eps_v, self.eps_v_factor)

    def with_attack_eps(self, eps: float) -> RandomNoise:
        return replace(self, eps_v=resolve_eps_v(self.eps_v, self.eps_v_factor, eps))

    def purify(self, adapter: TaskAdapter, x: torch.Tensor, seeds: Sequence[int] | torch.Tensor | None = None):
        check_images(x, "defense input")
        eps_v = require_eps_v(self.name, self.eps_v)
        u = per_sample_draw("uniform", x.shape[1:], as_seed_list(seeds, x.shape[0]), "random-defense", device=x.device)
        return (x + (2 * u - 1) * eps_v / 255.0).clamp(0, 1).detach()
