"""The base of the optimising defenses whose objective compares views of the image (equivariance, invariance,
contrastive): which views, how their parameters are drawn, and how they share forward passes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from equicore.defenses.optimising import OptimizingDefense
from equicore.equivariance import sample_view_params
from equicore.errors import InvalidInputError
from equicore.seeding import derive_seed
from equicore.transforms import InvertibleTransform, build_views

ViewSpec = str | Sequence[str | Mapping[str, Any]]


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

    @property
    def objective_varies_by_step(self) -> bool:
        """The objective changes from step to step only through views redrawn per step."""
        return self.resample_views

    def view_params(self, step: int, in_size: tuple[int, int]):
        seed = derive_seed(self.view_seed, "views", step if self.resample_views else 0)
        return sample_view_params(self._views, seed, in_size)
