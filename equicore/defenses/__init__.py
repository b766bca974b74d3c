"""Defenses: vanilla, random noise, and the optimisation defenses (equivariance, invariance)."""

from equicore.defenses.base import Defense
from equicore.defenses.consistency import ConsistencyDefense, EquivarianceDefense, InvarianceDefense, optimize_objective
from equicore.defenses.simple import RandomNoise, Vanilla
from equicore.registry import DEFENSES


def build_defense(name: str, **params) -> Defense:
    return DEFENSES.build(name, **params)


__all__ = [
    "ConsistencyDefense",
    "Defense",
    "EquivarianceDefense",
    "InvarianceDefense",
    "RandomNoise",
    "Vanilla",
    "build_defense",
    "optimize_objective",
]
