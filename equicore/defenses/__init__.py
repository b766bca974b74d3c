"""Defenses: vanilla, random noise, the optimisation defenses (equivariance, invariance) and the self-supervised
baselines (rotation, contrastive)."""

from equicore.defenses.base import Defense
from equicore.defenses.consistency import (
    ConsistencyDefense,
    EquivarianceDefense,
    InvarianceDefense,
    OptimizingDefense,
    optimize_objective,
)
from equicore.defenses.selfsup import ContrastiveDefense, RotationDefense, SelfSupervisedDefense
from equicore.defenses.simple import RandomNoise, Vanilla
from equicore.registry import DEFENSES


def build_defense(name: str, **params) -> Defense:
    return DEFENSES.build(name, **params)


__all__ = [
    "ConsistencyDefense",
    "ContrastiveDefense",
    "Defense",
    "EquivarianceDefense",
    "InvarianceDefense",
    "OptimizingDefense",
    "RandomNoise",
    "RotationDefense",
    "SelfSupervisedDefense",
    "Vanilla",
    "build_defense",
    "optimize_objective",
]
