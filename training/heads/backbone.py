"""A head's frozen backbone, its data and its pooled features.

The backbone is frozen: features are computed once (``torch.no_grad``) and pooled to the head's grid. Data: the
TRAINING split of the model's dataset (its training recipe's dataset, or the model's registered one, e.g. MNIST's
5000 training digits for advertorch's LeNet5).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import equicore.datasets  # noqa: F401  (registers the datasets)
import equicore.models  # noqa: F401  (registers the models)
from equicore.adapters import TaskAdapter, build_adapter
from equicore.errors import InvalidInputError
from equicore.heads import feature_layer_of, pool_features
from equicore.models.common import WEIGHTS_DIR, resolve_checkpoint
from equicore.registry import DATASETS, MODELS
from equicore.seeding import derive_seed
from training.heads.settings import DEFAULT_FEATURE_LAYERS, EXTRACT_BATCH
from training.recipes import find_recipe


@dataclass(frozen=True)
class HeadData:
    dataset: str
    options: Mapping[str, Any]
    train_split: str
    test_split: str


def head_data(model: str) -> HeadData:
    """The dataset whose TRAINING split trains ``model``'s heads: its training recipe's, else its registered one."""
    recipe = find_recipe(model)
    if recipe is not None:
        return HeadData(recipe.dataset, dict(recipe.dataset_options), recipe.train_split, recipe.test_split)
    name = MODELS.meta(model).get("dataset")
    if name in DATASETS:
        return HeadData(str(name), {}, "train", "test")
    raise InvalidInputError(
        f"model {model!r}: no built-in training split for its dataset {name!r}; heads train on the built-in "
        "benchmarks' datasets only"
    )


def build_backbone(model: str, checkpoint: str | os.PathLike[str] | None, seed: int) -> tuple[nn.Module, str]:
    """The frozen model: ``checkpoint`` (a file, or ``"none"`` for a seeded random init), else its shipped weights.
    Returns the model and a description of where its weights came from."""
    recipe = find_recipe(model)
    options = dict(recipe.model_options) if recipe is not None else {}
    MODELS.get(model)
    path = resolve_checkpoint(model, checkpoint, "pass --checkpoint")
    if path is None:
        # The same seeding as a run config's ``checkpoint: none`` with ``seed: <seed>`` (tasks/runtime.py).
        torch.manual_seed(derive_seed(seed, "model-init"))
        net, source = MODELS.build(model, **options), f"random init (seed {seed})"
    else:
        net = MODELS.build(model, checkpoint=path, **options)
        source = f"weights/{path.name}" if path.parent == WEIGHTS_DIR else str(path)
    net = net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, source


def build_head_adapter(model_name: str, net: nn.Module, feature_layer: str | None) -> TaskAdapter:
    """The adapter whose ``features`` the head sits on (``feature_layer``: a classifier's layer, or an FPN level
    ``fpn.N`` / ``N`` for Mask R-CNN; segmentation uses its low-resolution logits). None: the model's entry in
    ``DEFAULT_FEATURE_LAYERS``, else the adapter's default."""
    task = MODELS.meta(model_name).get("task")
    options: dict[str, Any] = {}
    feature_layer = feature_layer if feature_layer is not None else DEFAULT_FEATURE_LAYERS.get(model_name)
    if feature_layer is not None:
        if task == "classification":
            options["feature_layer"] = feature_layer
        elif task == "instance":
            options["feature_level"] = feature_layer.removeprefix("fpn.")
        else:
            probe = build_adapter(task, net)
            if feature_layer != feature_layer_of(probe):
                raise InvalidInputError(
                    f"feature_layer: a {task} model's features are {feature_layer_of(probe)!r}, got {feature_layer!r}"
                )
    adapter = build_adapter(task, net, **options)
    adapter.model_name = model_name
    return adapter


def load_images(ds: Any, indices: Sequence[int]) -> Tensor:
    """Images as uint8 ``N x C x H x W`` (exact: the datasets hold 8-bit pixels)."""
    first = ds[int(indices[0])].image
    out = torch.empty((len(indices), *first.shape), dtype=torch.uint8)
    for k, i in enumerate(indices):
        out[k] = (first if k == 0 else ds[int(i)].image).mul(255.0).round_().to(torch.uint8)
    return out


def _model_input(adapter: TaskAdapter, images: Tensor) -> Tensor:
    """uint8 or float images as [0, 1] floats of the model's dtype, on its device."""
    p = next(adapter.model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    x = images.to(adapter.device)
    return x.to(dtype).div_(255.0) if images.dtype == torch.uint8 else x.to(dtype)


@torch.no_grad()
def pooled_features(
    adapter: TaskAdapter,
    images: Tensor,
    grid: int,
    transform: Callable[[Tensor, int], Tensor] | None = None,
    batch: int = EXTRACT_BATCH,
) -> Tensor:
    """``N x D`` pooled features of ``transform(chunk, chunk_index)(images)`` (identity when None), in chunks."""
    out = []
    for k, i in enumerate(range(0, images.shape[0], batch)):
        x = _model_input(adapter, images[i : i + batch])
        if transform is not None:
            x = transform(x, k)
        out.append(pool_features(adapter.features(x), grid).float().cpu())
    return torch.cat(out)


def probe_features(adapter: TaskAdapter, images: Tensor) -> tuple[int, bool]:
    """(channels, dense?) of the adapter's features."""
    with torch.no_grad():
        f = adapter.features(_model_input(adapter, images[:2]))
    if f.ndim not in (2, 4):
        raise InvalidInputError(f"features: expected B x D or B x C x h x w, got {tuple(f.shape)}")
    return int(f.shape[1]), f.ndim == 4
