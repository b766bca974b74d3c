"""Defenses: vanilla, random noise, the optimisation defenses (equivariance, invariance) and the self-supervised
baselines (rotation, contrastive).

- ``base``: :class:`Defense`; ``budget``: the eps_v budget every purifying defense shares;
- ``optimising``: Algorithm 1 and :class:`OptimizingDefense`, the base of every defense that runs it;
- ``schedules``: the step-size schedules of the optimising defenses (registry ``STEP_SCHEDULES``);
- ``view_based``: :class:`ViewOptimizingDefense`, the base of those whose objective compares views;
- ``simple``, ``consistency``, ``selfsup``: the registered defenses.
"""

from equicore.defenses.base import Defense
from equicore.defenses.budget import check_budget, resolve_eps_v
from equicore.defenses.consistency import ConsistencyDefense, EquivarianceDefense, InvarianceDefense
from equicore.defenses.optimising import OptimizingDefense, optimize_objective
from equicore.defenses.schedules import STEP_SCHEDULES, StepSchedule, build_schedule
from equicore.defenses.selfsup import ContrastiveDefense, RotationDefense, SelfSupervisedDefense
from equicore.defenses.simple import RandomNoise, Vanilla
from equicore.defenses.view_based import ViewOptimizingDefense
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
    "STEP_SCHEDULES",
    "SelfSupervisedDefense",
    "StepSchedule",
    "Vanilla",
    "ViewOptimizingDefense",
    "build_defense",
    "build_schedule",
    "check_budget",
    "optimize_objective",
    "resolve_eps_v",
]
