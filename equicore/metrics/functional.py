"""Pure metric functions. Segmentation IoU comes from a dataset-level confusion matrix, never a mean of per-image
IoUs (which over-weights small images and is not what mIoU means)."""

from __future__ import annotations

import torch

from equicore.errors import InvalidInputError


def confusion_matrix(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """int64 ``C x C`` matrix, rows = ground truth, columns = prediction; ``ignore_index`` pixels skipped."""
    if preds.shape != target.shape:
        raise InvalidInputError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
    p, t = preds.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise InvalidInputError(f"target labels must lie in [0, {num_classes}) or be ignore_index={ignore_index}")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise InvalidInputError(f"predicted labels must lie in [0, {num_classes})")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """float64 IoU per class; NaN for classes absent from both ground truth and predictions."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(cm: torch.Tensor) -> float:
    """Mean over classes that occur (in ground truth or predictions); NaN if none does."""
    iou = iou_per_class(cm)
    present = ~torch.isnan(iou)
    return float(iou[present].mean()) if bool(present.any()) else float("nan")


def pixel_accuracy(cm: torch.Tensor) -> float:
    total = int(cm.sum())
    return float(cm.diag().sum()) / total if total else float("nan")


def per_image_iou(preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None) -> list[float]:
    """Per-image mIoU, only for per-sample rows (dataset mIoU always comes from the merged matrix)."""
    return [mean_iou(confusion_matrix(p, t, num_classes, ignore_index)) for p, t in zip(preds, target, strict=True)]
