"""The training loop: optimiser, learning-rate schedule, shuffled batches and one loss step per task.

``fit_epochs(recipe, model, ds, n, epochs, g, log)`` trains ``model`` in place on the first ``n`` items of ``ds``
with the recipe's loss and augmentation. Every random draw (shuffling, augmentation) comes from the generator
``g``, in a fixed order, so a seeded run gives the same weights on the same machine and thread count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equicore.errors import InvalidInputError
from training.augment import augment_classification, augment_instance, augment_segmentation
from training.data import materialize
from training.provenance import load_average
from training.recipes import Recipe

Log = Callable[[str], None]
# Wall time of every epoch, and the 1-min load average at its end.
EpochTimes = tuple[list[float], list[float | None]]


def make_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``model``'s trainable parameters, without weight decay on 1-d ones."""
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on BatchNorm parameters and biases (1-d tensors).
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr)
    raise InvalidInputError(f"recipe {recipe.name!r}: unknown optimizer {recipe.optimizer!r}")


def lr_factor(recipe: Recipe, step: int, total: int) -> float:
    """Multiplier of ``recipe.lr`` at ``step`` of ``total``: linear warm-up, then cosine down to final_lr_frac."""
    if recipe.schedule != "warmup_cosine":
        raise InvalidInputError(f"recipe {recipe.name!r}: unknown schedule {recipe.schedule!r}")
    warm = max(1, int(round(recipe.warmup_frac * total)))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return recipe.final_lr_frac + (1 - recipe.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def epoch_batches(n: int, batch_size: int, g: torch.Generator) -> list[Tensor]:
    """A shuffled epoch in batches; a trailing batch of one sample is dropped (BatchNorm needs two)."""
    perm = torch.randperm(n, generator=g)
    out = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return out


def apply_overrides(model: nn.Module, overrides: Mapping[str, Any]) -> None:
    """Set the recipe's training-time attributes (``"dotted.path": value``) on ``model``; a wrong path fails."""
    for path, value in overrides.items():
        *parents, attr = path.split(".")
        obj: Any = model
        for p in parents:
            obj = getattr(obj, p)
        if not hasattr(obj, attr):
            raise InvalidInputError(f"train_overrides: {type(obj).__name__} at {path!r} has no attribute {attr!r}")
        setattr(obj, attr, value)


def run_epochs(
    recipe: Recipe,
    model: nn.Module,
    n: int,
    epochs: int,
    g: torch.Generator,
    log: Log,
    step_fn: Callable[[Tensor], Tensor],
) -> EpochTimes:
    """The shared loop: shuffled batches of indices, ``step_fn(idx) -> loss``, optimiser and schedule. Returns the
    wall time of every epoch and the 1-min load average at its end (the CPUs may be shared with other jobs)."""
    opt = make_optimizer(recipe, model)
    bs = min(recipe.batch_size, n)
    steps_per_epoch = len(epoch_batches(n, bs, torch.Generator().manual_seed(0)))
    total = steps_per_epoch * epochs
    every = max(1, min(steps_per_epoch // 5, 50))
    params = [p for p in model.parameters() if p.requires_grad]
    step, times, loads = 0, [], []
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        running, seen = 0.0, 0
        for i, idx in enumerate(epoch_batches(n, bs, g), start=1):
            f = lr_factor(recipe, step, total)
            for group in opt.param_groups:
                group["lr"] = recipe.lr * f
            loss = step_fn(idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"[{recipe.name}] loss became {loss.item()} at epoch {epoch} step {i}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            opt.step()
            step += 1
            running += float(loss.detach())
            seen += 1
            if i % every == 0 or i == steps_per_epoch:
                log(
                    f"[{recipe.name}] epoch {epoch}/{epochs} step {i}/{steps_per_epoch} loss {running / seen:.4f} "
                    f"lr {recipe.lr * f:.2e} ({time.perf_counter() - t0:.0f} s)"
                )
                running, seen = 0.0, 0
        times.append(time.perf_counter() - t0)
        load = load_average()
        loads.append(load)
        log(f"[{recipe.name}] epoch {epoch} done in {times[-1]:.1f} s (1-min load average {load})")
    return times, loads


def _fit_classification(
    recipe: Recipe, model: nn.Module, ds: Any, n: int, epochs: int, g: torch.Generator, log: Log
) -> EpochTimes:
    images, labels = materialize(ds, n)

    def step(idx: Tensor) -> Tensor:
        x = augment_classification(images[idx].float().div_(255.0), g, recipe.augmentation)
        return F.cross_entropy(model(x), labels[idx])

    return run_epochs(recipe, model, n, epochs, g, log, step)


def _fit_segmentation(
    recipe: Recipe, model: nn.Module, ds: Any, n: int, epochs: int, g: torch.Generator, log: Log
) -> EpochTimes:
    images, labels = materialize(ds, n)
    ignore = ds.ignore_index if ds.ignore_index is not None else 255

    def step(idx: Tensor) -> Tensor:
        x, y = augment_segmentation(images[idx].float().div_(255.0), labels[idx], g, recipe.augmentation, ignore)
        return F.cross_entropy(model(x), y, ignore_index=ignore)

    return run_epochs(recipe, model, n, epochs, g, log, step)


def _fit_instance(
    recipe: Recipe, model: nn.Module, ds: Any, n: int, epochs: int, g: torch.Generator, log: Log
) -> EpochTimes:
    def step(idx: Tensor) -> Tensor:
        samples = [ds[int(i)] for i in idx]
        imgs = [s.image for s in samples]
        tgts = [{k: s.target[k] for k in ("boxes", "labels", "masks")} for s in samples]
        imgs, tgts = augment_instance(imgs, tgts, g, recipe.augmentation)
        losses = model(imgs, tgts)
        return sum(losses.values())

    return run_epochs(recipe, model, n, epochs, g, log, step)


def fit_epochs(
    recipe: Recipe, model: nn.Module, ds: Any, n: int, epochs: int, g: torch.Generator, log: Log
) -> EpochTimes:
    """Train ``model`` for ``epochs`` on the first ``n`` items of ``ds`` with ``recipe.task``'s loss (cross-entropy
    for classification and segmentation, torchvision's summed losses otherwise) and augmentation."""
    if recipe.task == "classification":
        return _fit_classification(recipe, model, ds, n, epochs, g, log)
    if recipe.task == "segmentation":
        return _fit_segmentation(recipe, model, ds, n, epochs, g, log)
    return _fit_instance(recipe, model, ds, n, epochs, g, log)
