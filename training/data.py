"""A recipe's data: building its splits, capping them, describing what a run used, and loading it into tensors."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

import equicore.datasets  # noqa: F401  (registers the datasets)
from equicore.datasets.scenes import BACKGROUNDS
from equicore.errors import InvalidInputError
from equicore.registry import DATASETS
from training.recipes import Recipe

# Dataset name -> (title in descriptions and cards, what one item is called).
DATASET_TITLES: dict[str, tuple[str, str]] = {
    "fashion_mnist": ("Fashion-MNIST", "images"),
    "mnist": ("MNIST", "images"),
    "fashion_scenes": ("Fashion scenes (semantic segmentation)", "scenes"),
    "fashion_scenes_instances": ("Fashion scenes (instance segmentation)", "scenes"),
}


def build_split(recipe: Recipe, split: str) -> Any:
    """``recipe``'s dataset split; the training split takes ``train_dataset_options`` over ``dataset_options``."""
    options = dict(recipe.dataset_options)
    if split == recipe.train_split:
        options.update(recipe.train_dataset_options)
    return DATASETS.build(recipe.dataset, split=split, **options)


def count(ds: Any, limit: int | None) -> int:
    """How many items of ``ds`` a run uses: all, or the first ``limit`` (>= 1)."""
    n = len(ds)
    if limit is not None:
        if int(limit) < 1:
            raise InvalidInputError(f"limit: expected >= 1, got {limit}")
        n = min(n, int(limit))
    return n


def describe_data(ds: Any, n: int) -> dict[str, Any]:
    """Which images a run used: dataset, split, count and a readable sentence."""
    title, unit = DATASET_TITLES.get(ds.name, (ds.name, "images"))
    total = len(ds)
    which = f"{total} {unit}" if n == total else f"the first {n} of {total} {unit} (indices 0..{n - 1})"
    text = f"{title} {ds.split} split, {which}"
    extra: dict[str, Any] = {}
    cfg = getattr(ds, "cfg", None)
    if cfg is not None:  # Fashion scenes: say where the scenes come from
        text += (
            f" (scene seed {cfg.seed}, {cfg.height}x{cfg.width}, {cfg.min_items}-{cfg.max_items} Fashion-MNIST "
            f"{ds.source_split} items on crops of {', '.join(BACKGROUNDS[ds.source_split])})"
        )
        extra["scene_config"] = asdict(cfg)
    if getattr(ds, "split_note", ""):
        text += f"; {ds.split_note}"
    return {
        "dataset": ds.name,
        "split": ds.split,
        "n": n,
        "of": total,
        "unit": unit,
        "description": text,
        "fingerprint": ds.fingerprint(),
        **extra,
    }


def materialize(ds: Any, n: int) -> tuple[Tensor, Tensor]:
    """Images as uint8 ``N x C x H x W`` (exact: the datasets hold 8-bit pixels) and targets as a LongTensor."""
    first = ds[0]
    images = torch.empty((n, *first.image.shape), dtype=torch.uint8)
    targets: list[Any] = []
    for i in range(n):
        s = first if i == 0 else ds[i]
        images[i] = s.image.mul(255.0).round_().to(torch.uint8)
        targets.append(s.target)
    if isinstance(first.target, Tensor):
        return images, torch.stack(targets).long()
    return images, torch.tensor([int(t) for t in targets], dtype=torch.long)
