"""The paper's defense and its baseline: Algorithm 1 (``defenses/optimising.py``) restoring the equivariance of the
model's features under K views (paper eq. 2), or their invariance, with the objectives of ``equicore.equivariance``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from equicore.adapters import TaskAdapter
from equicore.defenses.optimising import OptimizingDefense, noise_std, normalize_per_sample, optimize_objective
from equicore.defenses.view_based import ViewOptimizingDefense, ViewSpec
from equicore.equivariance import OBJECTIVES, view_features
from equicore.errors import InvalidInputError
from equicore.registry import DEFENSES
from equicore.transforms import TRANSFORM_MODULES

# Their home was this module: importable from here for code written before the move.
__all__ = [
    "ConsistencyDefense",
    "EquivarianceDefense",
    "InvarianceDefense",
    "OptimizingDefense",
    "ViewOptimizingDefense",
    "ViewSpec",
    "noise_std",
    "normalize_per_sample",
    "optimize_objective",
]

# Where the maths of the equivariance and invariance defenses live besides this module.
CONSISTENCY_MODULES = (
    "equicore.defenses.base",
    "equicore.defenses.budget",
    "equicore.defenses.optimising",
    "equicore.defenses.schedules",
    "equicore.defenses.view_based",
    "equicore.equivariance",
    "equicore.seeding",
    *TRANSFORM_MODULES,
)


@dataclass(frozen=True)
class ConsistencyDefense(ViewOptimizingDefense):
    """The equivariance / invariance defenses (Algorithm 1 on the objectives of ``equicore.equivariance``; paper
    views K=8)."""

    objective: str = "equivariance"

    name = "consistency"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise InvalidInputError(f"{self.name}.objective: {OBJECTIVES.unknown_message(self.objective)}")
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


@DEFENSES.register("equivariance", modules=CONSISTENCY_MODULES)
@dataclass(frozen=True)
class EquivarianceDefense(ConsistencyDefense):
    objective: str = "equivariance"
    name = "equivariance"


@DEFENSES.register("invariance", modules=CONSISTENCY_MODULES)
@dataclass(frozen=True)
class InvarianceDefense(ConsistencyDefense):
    objective: str = "invariance"
    name = "invariance"
