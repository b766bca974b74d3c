"""The self-supervised baselines of the paper's tables: rotation (Shi et al., ICLR 2021) and contrastive (Mao et al.,
ICCV 2021) defenses.

Both run Algorithm 1 (``optimize_objective``, the equivariance defense's optimiser, as the paper does) per image on
an eps_v-bounded input vector, maximising ``score`` = minus a self-supervised loss computed by a small head on the
frozen model's ``adapter.features`` (``equicore.heads``):

- ``rotation``: minus the mean 4-way rotation-prediction cross-entropy of the image rotated by 0/90/180/270 degrees.
  The official code optimises one vector for a whole batch; here every image has its own.
- ``contrastive``: minus InfoNCE between the image and its K augmented views (``views``, seeded from ``view_seed``
  and the step, never from the batch), with the head's fixed bank of training-split embeddings as negatives instead
  of batch-mates, so an image's result is the same under any batching or sharding.

``head`` is a head file; None means the shipped head of the adapter's model (``adapter.model_name``), at
``equicore/models/weights/heads/<model>.<kind>.pt``. The head is loaded once per (file, model) and checked against
the model's weights digest and feature layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from equicore.adapters import TaskAdapter
from equicore.defenses.optimising import OptimizingDefense
from equicore.defenses.view_based import ViewOptimizingDefense, ViewSpec
from equicore.errors import InvalidInputError
from equicore.heads import (
    HEADS_DIR,
    HeadArtifact,
    check_channels,
    contrastive_embeddings,
    file_sha256,
    info_nce,
    load_head_for,
    resolve_head_path,
    rotation_loss,
)
from equicore.registry import DEFENSES
from equicore.transforms import TRANSFORM_MODULES

# Where the maths of the self-supervised defenses live besides this module: Algorithm 1 and its budget, the head
# network and its objectives (the head file itself is in ``params()["head_files"]``); contrastive adds the views.
ROTATION_MODULES = (
    "equicore.defenses.base",
    "equicore.defenses.budget",
    "equicore.defenses.optimising",
    "equicore.defenses.schedules",
    "equicore.heads.format",
    "equicore.heads.losses",
    "equicore.seeding",
)
CONTRASTIVE_MODULES = (
    *ROTATION_MODULES,
    "equicore.defenses.view_based",
    "equicore.equivariance",
    *TRANSFORM_MODULES,
)


@dataclass(frozen=True)
class SelfSupervisedDefense(OptimizingDefense):
    """An ``OptimizingDefense`` whose objective needs a trained head (``head``: a file, None = the shipped one)."""

    head: str | None = None
    # The model whose shipped head is meant when ``head`` is None (set by the pipeline from the run's model): it
    # narrows ``head_files`` to that one file, so retraining another model's head leaves these results valid.
    for_model: str | None = None

    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head is not None:
            if not isinstance(self.head, (str, os.PathLike)) or not os.fspath(self.head):
                raise InvalidInputError(f"{self.name}.head: expected a file path or null, got {self.head!r}")
            object.__setattr__(self, "head", os.fspath(self.head))
            # A missing explicit file fails when the defense is built (config validation), before any work.
            resolve_head_path(self.kind, self.head, None, self.name)

    def params(self) -> dict[str, Any]:
        p = super().params()
        p["head_files"] = self.head_files()
        return p

    def head_files(self) -> dict[str, str]:
        """sha256 (16 hex) of every file this defense may read, so results keyed by ``params()`` change when a head is
        retrained: the given head, or every shipped head of this kind (the model is not known here)."""
        if self.head is not None:
            files = [Path(self.head)]
        elif self.for_model is not None:
            files = [HEADS_DIR / f"{self.for_model}.{self.kind}.pt"]
        else:
            files = sorted(HEADS_DIR.glob(f"*.{self.kind}.pt"))
        return {
            (str(f) if self.head is not None else f.name): (file_sha256(f) if f.is_file() else "missing") for f in files
        }

    def artifact(self, adapter: TaskAdapter) -> HeadArtifact:
        return load_head_for(adapter, self.kind, self.head, self.name)

    def prepare(self, adapter: TaskAdapter) -> None:
        self.artifact(adapter)

    def _feature_fn(self, adapter: TaskAdapter, art: HeadArtifact):
        def features(x: torch.Tensor) -> torch.Tensor:
            f = adapter.features(x)
            check_channels(art, f, self.name)
            return f

        return features

    @staticmethod
    def _head_fn(art: HeadArtifact):
        return lambda f: art.on(f.device, f.dtype)[0](f)


@DEFENSES.register("rotation", modules=ROTATION_MODULES)
@dataclass(frozen=True)
class RotationDefense(SelfSupervisedDefense):
    """Shi et al. (ICLR 2021): restore the model's rotation-prediction ability (4 rotations, per image)."""

    name = "rotation"
    kind: ClassVar[str] = "rotation"
    objective_varies_by_step: ClassVar[bool] = False  # four fixed rotations: step 0's objective is every step's

    def score(self, adapter: TaskAdapter, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Minus the per-image rotation-prediction loss ``[B]`` (differentiable in x); ``step`` is unused."""
        art = self.artifact(adapter)
        return -rotation_loss(self._feature_fn(adapter, art), self._head_fn(art), x)


@DEFENSES.register("contrastive", modules=CONTRASTIVE_MODULES)
@dataclass(frozen=True)
class ContrastiveDefense(SelfSupervisedDefense, ViewOptimizingDefense):
    """Mao et al. (ICCV 2021): restore the SimCLR structure between an image and its augmented views.

    ``views``: a view-set name (default ``simclr``, K=4) or a list of transform specs; their parameters come from
    ``view_seed`` (re-drawn every step when ``resample_views``). ``batched``/``max_batch_pixels`` as in the
    equivariance defense. The InfoNCE temperature is the head's own (recorded at training).
    """

    views: ViewSpec = "simclr"

    name = "contrastive"
    kind: ClassVar[str] = "contrastive"

    def score(self, adapter: TaskAdapter, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Minus the per-image InfoNCE ``[B]`` of x and its views against the head's negative bank."""
        art = self.artifact(adapter)
        z = contrastive_embeddings(
            self._feature_fn(adapter, art),
            self._head_fn(art),
            x,
            self._views,
            self.view_params(step, tuple(x.shape[-2:])),
            batched=self.batched,
            max_batch_pixels=self.max_batch_pixels,
        )
        bank = art.on(z.device, z.dtype)[1]
        assert bank is not None  # read_head guarantees a bank for contrastive heads
        return -info_nce(z, bank, art.meta.temperature)
