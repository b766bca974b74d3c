"""Worker-side state: the dataset, model and adapter a config names, built once per worker process.

Dask workers run many shard tasks; rebuilding the model for each would dominate small shards, so the runtime is
cached per process, keyed by the canonical config JSON.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import equicore  # noqa: F401  (registrations)
from equicore.adapters import TaskAdapter, build_adapter
from equicore.datasets import collate
from equicore.errors import InvalidInputError
from equicore.heads.cache import record_backbone_digest
from equicore.heads.format import backbone_digest
from equicore.models.checkpoint import weights_digest
from equicore.models.common import RANDOM_INIT, resolve_checkpoint
from equicore.models.inference_graph import build_graph
from equicore.models.user import check_dynamic_shapes, check_output
from equicore.registry import DATASETS, MODELS
from equicore.seeding import derive_seed
from storage.keys import code_version as _code_version
from tasks.config import RunConfig
from tasks.config_model import DEFAULT_GRAPH
from tasks.user_code import build_user_model


@functools.cache
def code_version() -> str:
    """Package version + digest of the engine's sources: a code change invalidates cached attacks and results."""
    return _code_version([Path(equicore.__file__).resolve().parent])


def pick_device(requested: str) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InvalidInputError("device: 'cuda' requested but no CUDA device is available")
    # One GPU per Dask worker: LocalCluster names workers 0..n-1.
    index = 0
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) % torch.cuda.device_count() if str(name).isdigit() else 0
    except (ImportError, ValueError):
        pass
    return torch.device("cuda", index)


@dataclass
class Runtime:
    cfg: RunConfig
    dataset: Any
    indices: list[int]
    model: torch.nn.Module
    adapter: TaskAdapter
    device: torch.device
    model_digest: str
    dataset_fingerprint: str

    @property
    def task(self) -> str:
        return self.dataset.task

    def shard_sizes(self) -> list[int]:
        """Images per shard, in shard order (:func:`plan_shards`)."""
        return [len(s) for s in plan_shards(self.indices, self.cfg.shard_size)]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, Any, list[str]]:
        images, targets, ids = collate([self.dataset[i] for i in indices])
        if isinstance(targets, torch.Tensor):
            targets = targets.to(self.device)
        else:  # instance targets: one dict per image
            targets = [
                {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets
            ]
        return images.to(self.device), targets, ids


def build_runtime(cfg: RunConfig, device: torch.device | None = None) -> Runtime:
    dataset = DATASETS.build(cfg.dataset.name, **cfg.dataset.params)
    task = dataset.task
    label = cfg.model.label
    model_task = cfg.model.task_name
    if model_task and model_task != task:
        raise InvalidInputError(
            f"model {label!r} is a {model_task} model but dataset {cfg.dataset.name!r} is a {task} dataset"
        )
    if cfg.model.num_classes is not None and cfg.model.num_classes != dataset.num_classes:
        raise InvalidInputError(
            f"model.num_classes is {cfg.model.num_classes} but dataset {cfg.dataset.name!r} has "
            f"{dataset.num_classes} classes"
        )
    n = len(dataset)
    if cfg.dataset.indices is not None:
        bad = [i for i in cfg.dataset.indices if not 0 <= i < n]
        if bad:
            raise InvalidInputError(f"dataset.indices: {bad[:5]} out of range for {n} samples")
        indices = list(cfg.dataset.indices)
    else:
        indices = list(range(min(n, cfg.dataset.limit or n)))
    if not indices:
        raise InvalidInputError(
            f"dataset.indices/limit: the selection from dataset {cfg.dataset.name!r} ({n} samples) is empty; "
            "expected at least one sample"
        )
    device = device or pick_device(cfg.device)
    if cfg.model.checkpoint == RANDOM_INIT or cfg.model.kind == "factory":
        torch.manual_seed(derive_seed(cfg.seed, "model-init"))  # an untrained model must still be reproducible
    model, options = _build_model(cfg)
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)  # attacks and defenses differentiate w.r.t. inputs only
    if task == "segmentation":
        options.setdefault("ignore_index", dataset.ignore_index if dataset.ignore_index is not None else 255)
    digest = weights_digest(model)  # of the weights as loaded, whatever the graph (the manifest and keys name it)
    if cfg.model.graph != DEFAULT_GRAPH:
        plain = model
        keep = (str(options["feature_layer"]),) if "feature_layer" in options else ()  # a hooked conv keeps its output
        model = build_graph(plain, cfg.model.graph, keep)
        record_backbone_digest(model, backbone_digest(plain))  # the shipped heads still fit the optimised copy
        del plain
    x, _, ids = collate([dataset[indices[0]]])
    if cfg.model.kind != "name":  # a user's model: its output must fit the task and classes, its file any shape
        check_output(model, x.to(device), task, dataset.num_classes, repr(label))
        if cfg.model.kind == "file":
            check_dynamic_shapes(model, x.to(device), repr(label))
    adapter = build_adapter(task, model, num_classes=dataset.num_classes, **options)
    adapter.model_name = cfg.model.name  # self-supervised defenses find the model's shipped head by this name
    # Fail now, naming both sides, if the model's classes do not match the dataset's, and naming the model if its
    # features or logits are not finite (broken weights would otherwise surface deep inside an attack).
    try:
        with torch.no_grad():
            out = adapter.forward(x.to(device))
    except InvalidInputError as exc:
        raise InvalidInputError(f"model {label!r} on dataset {cfg.dataset.name!r}: {exc}") from None
    for what in ("features", "logits"):
        value = getattr(out, what, None)
        if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
            raise InvalidInputError(
                f"model {label!r} (checkpoint {cfg.model.checkpoint or 'default'}): its {what} for sample "
                f"{ids[0]} contain NaN/Inf (expected finite values; are the weights broken?)"
            )
    return Runtime(cfg, dataset, indices, model, adapter, device, digest, dataset.fingerprint())


def _build_model(cfg: RunConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The config's model (built-in, factory or file) and its adapter options."""
    if cfg.model.kind != "name":
        return build_user_model(cfg.model, cfg.plugins)
    name = cfg.model.name or ""
    checkpoint = resolve_checkpoint(name, cfg.model.checkpoint, "set model.checkpoint")
    kwargs = dict(cfg.model.params)
    if checkpoint is not None:
        kwargs["checkpoint"] = checkpoint
    return MODELS.build(name, **kwargs), dict(cfg.model.adapter)


@functools.lru_cache(maxsize=2)
def get_runtime(cfg_json: str, torch_threads: int | None = None) -> Runtime:
    if torch_threads:
        torch.set_num_threads(torch_threads)
    return build_runtime(RunConfig.model_validate(json.loads(cfg_json)))


def plan_shards(indices: list[int], shard_size: int) -> list[list[int]]:
    """Consecutive slices: the same shards for the same config whatever the worker count."""
    return [indices[i : i + shard_size] for i in range(0, len(indices), shard_size)]


def to_numpy_images(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()
