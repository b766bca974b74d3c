"""The instance segmentation adapter, over torchvision Mask R-CNN models.

The equivariance representation is the FPN: the model's own normalisation and ``model.backbone`` run directly on
the images at their own size (no ``GeneralizedRCNNTransform`` resize), so feature maps follow the input geometry
and flips/resizes invert onto the reference grid. Predictions and the task loss go through the whole model, as
torchvision runs it (resize, RPN, ROI heads).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from equicore.adapters.base import ADAPTERS, AdapterOutput, TaskAdapter
from equicore.errors import InvalidInputError
from equicore.seeding import derive_seed

FEATURE_LEVELS = ("0", "1", "2", "3", "pool", "all")
LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
# Modules whose training mode changes state or outputs: they stay in eval while the training losses are computed.
_KEEP_EVAL = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)

InstanceTargets = Sequence[Mapping[str, Any]]


@contextmanager
def _modes(model: nn.Module, train: bool) -> Iterator[None]:
    """Put ``model`` in eval mode, or in train mode with normalisation and dropout layers in eval; restore every
    module's own flag afterwards (not ``model.train(flag)``, which would overwrite the children's flags)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m in model.modules():
            m.training = train and not isinstance(m, _KEEP_EVAL)
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Fork torch's global RNG (CPU, plus ``device`` when CUDA) and seed it: torchvision's RPN/ROI samplers draw
    from it (``torch.randperm``), and the caller's stream must neither be consumed nor depend on batch-mates."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _target_key(target: Mapping[str, Any]) -> str:
    """Stable identity of a target: its ``image_id``, or a digest of its boxes and labels when it has none."""
    if "image_id" in target and target["image_id"] is not None:
        image_id = target["image_id"]
        return str(int(image_id.item() if isinstance(image_id, torch.Tensor) else image_id))
    h = hashlib.blake2b(digest_size=8)
    for k in ("boxes", "labels"):
        h.update(torch.as_tensor(target[k]).detach().cpu().contiguous().numpy().tobytes())
    return "content:" + h.hexdigest()


@ADAPTERS.register("instance", modules=("equicore.adapters.base", "equicore.seeding"))
class InstanceAdapter(TaskAdapter):
    """Adapter for torchvision Mask R-CNN (``model.transform``, ``backbone``, ``rpn``, ``roi_heads``).

    ``feature_level``: the FPN level used as features, ``"0"`` (stride 4, default) .. ``"3"``, ``"pool"``, or
    ``"all"`` (every level bilinearly upsampled to level 0's grid and concatenated along channels).
    ``mask_threshold``: probability above which predicted mask pixels are foreground.
    ``loss_seed``: base seed of the RPN/ROI sampling in ``task_loss`` (per sample, combined with its image_id).
    """

    task = "instance"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int | None = None,
        feature_level: str = "0",
        mask_threshold: float = 0.5,
        loss_seed: int = 0,
    ) -> None:
        missing = [a for a in ("transform", "backbone", "rpn", "roi_heads") if not hasattr(model, a)]
        if missing:
            raise InvalidInputError(
                f"instance adapter: expected a torchvision Mask R-CNN, {type(model).__name__} lacks {missing}"
            )
        if not getattr(model.roi_heads, "has_mask", lambda: False)():
            raise InvalidInputError(f"instance adapter: {type(model).__name__} has no mask head (not a Mask R-CNN)")
        if str(feature_level) not in FEATURE_LEVELS:
            raise InvalidInputError(f"feature_level: expected one of {FEATURE_LEVELS}, got {feature_level!r}")
        if not 0.0 <= float(mask_threshold) <= 1.0:
            raise InvalidInputError(f"mask_threshold: expected a probability in [0, 1], got {mask_threshold!r}")
        super().__init__(model, num_classes)
        self.feature_level = str(feature_level)
        self.mask_threshold = float(mask_threshold)
        self.loss_seed = int(loss_seed)

    # ---------------------------------------------------------------------------------------------- features

    def fpn(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All FPN levels of ``x`` (B x C x H x W in [0, 1]) computed at the input's own size."""
        if x.ndim != 4:
            raise InvalidInputError(f"images: expected shape B x C x H x W, got {tuple(x.shape)}")
        feats = self.model.backbone(self.model.transform.normalize(x))
        if isinstance(feats, torch.Tensor):  # a backbone without FPN returns one map
            feats = {"0": feats}
        return dict(feats)

    def forward(self, x: torch.Tensor) -> AdapterOutput:
        """Features only: detection has no logit map, so ``logits`` carries the features (``logits()`` raises)."""
        feats = self.fpn(x)
        if self.feature_level == "all":
            size = feats["0"].shape[-2:] if "0" in feats else next(iter(feats.values())).shape[-2:]
            maps = [
                f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                for f in feats.values()
            ]
            out = torch.cat(maps, dim=1)
        else:
            if self.feature_level not in feats:
                raise InvalidInputError(f"feature_level {self.feature_level!r}: the backbone gives {list(feats)}")
            out = feats[self.feature_level]
        return AdapterOutput(out, out)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise InvalidInputError(
            "the instance task has no logits: use predict() for detections, task_loss() for the training loss"
        )

    # ---------------------------------------------------------------------------------------------- predictions

    def predict(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:  # type: ignore[override]
        """One dict per image: boxes [N,4] xyxy, labels [N], scores [N], masks uint8 [N,H,W] (binary)."""
        if x.ndim != 4:
            raise InvalidInputError(f"images: expected shape B x C x H x W, got {tuple(x.shape)}")
        with torch.no_grad(), _modes(self.model, train=False):
            outs = self.model(list(x))
        return [
            {
                "boxes": o["boxes"],
                "labels": o["labels"],
                "scores": o["scores"],
                "masks": (o["masks"][:, 0] > self.mask_threshold).to(torch.uint8),
            }
            for o in outs
        ]

    # ---------------------------------------------------------------------------------------------- loss

    def _model_target(self, target: Mapping[str, Any], i: int, size: tuple[int, int], device: torch.device):
        if not isinstance(target, Mapping):
            raise InvalidInputError(f"targets[{i}]: expected a dict with boxes, labels, masks; got {type(target)}")
        missing = [k for k in ("boxes", "labels", "masks") if k not in target]
        if missing:
            raise InvalidInputError(f"targets[{i}]: missing {missing}")
        boxes = torch.as_tensor(target["boxes"]).to(device=device, dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(target["labels"]).to(device=device, dtype=torch.int64).reshape(-1)
        masks = torch.as_tensor(target["masks"]).to(device=device, dtype=torch.uint8)
        if masks.ndim != 3 or masks.shape[0] != labels.shape[0] or tuple(masks.shape[-2:]) != size:
            raise InvalidInputError(
                f"targets[{i}].masks: expected {labels.shape[0]} x {size[0]} x {size[1]}, got {tuple(masks.shape)}"
            )
        if boxes.shape[0] != labels.shape[0]:
            raise InvalidInputError(f"targets[{i}]: {boxes.shape[0]} boxes but {labels.shape[0]} labels")
        return {"boxes": boxes, "labels": labels, "masks": masks}

    def loss_terms(self, x: torch.Tensor, targets: InstanceTargets) -> list[dict[str, torch.Tensor]]:
        """torchvision's training losses of each image, computed alone (per sample), with its own seeded sampling,
        without touching BatchNorm statistics or dropout."""
        if x.ndim != 4:
            raise InvalidInputError(f"images: expected shape B x C x H x W, got {tuple(x.shape)}")
        if isinstance(targets, (torch.Tensor, Mapping)) or len(targets) != x.shape[0]:
            n = "a tensor/dict" if isinstance(targets, (torch.Tensor, Mapping)) else str(len(targets))
            raise InvalidInputError(f"targets: expected a list of {x.shape[0]} instance dicts, got {n}")
        size = (int(x.shape[-2]), int(x.shape[-1]))
        out = []
        with _modes(self.model, train=True):
            for i, target in enumerate(targets):
                t = self._model_target(target, i, size, x.device)
                seed = derive_seed(self.loss_seed, "instance-task-loss", _target_key(target))
                with _seeded_rng(seed, x.device):
                    out.append(self.model([x[i]], [t]))
        return out

    def task_loss(self, x: torch.Tensor, y: InstanceTargets) -> torch.Tensor:  # type: ignore[override]
        """Per-sample sum of Mask R-CNN's training losses (classifier, box_reg, mask, objectness, rpn_box_reg)."""
        terms = self.loss_terms(x, y)
        return torch.stack([sum(d[k] for k in LOSS_KEYS if k in d) for d in terms])  # type: ignore[misc]
