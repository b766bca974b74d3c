"""``train(name)``: run a recipe, save the checkpoint and write its model card.

The card beside the checkpoint (``<file>.card.json``) records the recipe, data, machine, timings and the clean
metric ``evaluate_clean`` measures on the TEST split (never the training split). Training into the shipped weights
folder re-renders ``MODEL_CARDS.md``.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import equicore.models  # noqa: F401  (registers the models)
from equicore.errors import InvalidInputError
from equicore.models.checkpoint import read_card, save_checkpoint
from equicore.models.common import WEIGHTS_DIR
from equicore.registry import MODELS
from training.augment import describe_augmentation
from training.cards import write_model_cards
from training.data import build_split, count, describe_data
from training.evaluate import evaluate_clean
from training.loop import Log, apply_overrides, fit_epochs
from training.provenance import library_versions, machine_info
from training.recipes import Recipe, get_recipe, pretrain_recipe


def training_command(name: str, out_dir: Path | None, epochs: int | None, seed: int | None, limit: int | None) -> str:
    """The arguments of ``scripts/train.py`` / ``equi train`` that reproduce a run."""
    parts = [name]
    if out_dir is not None:
        parts += ["--out", str(out_dir)]
    if epochs is not None:
        parts += ["--epochs", str(epochs)]
    if seed is not None:
        parts += ["--seed", str(seed)]
    if limit is not None:
        parts += ["--limit", str(limit)]
    return " ".join(parts)


def train(
    name: str,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    epochs: int | None = None,
    seed: int | None = None,
    limit: int | None = None,
    eval_limit: int | None = None,
    threads: int | None = 2,
    log: Log = print,
) -> dict[str, Any]:
    """Train recipe ``name``, save ``<out_dir>/<recipe.output>`` and its card, return the card.

    ``epochs``/``seed`` override the recipe; ``limit`` trains on the first ``limit`` training images only;
    ``eval_limit`` scores the first ``eval_limit`` test images only (default: the whole test split; the card
    records ``n``). ``threads`` sets torch's intra-op threads for the run (restored afterwards).
    """
    recipe = get_recipe(name)
    n_epochs = recipe.epochs if epochs is None else int(epochs)
    run_seed = recipe.seed if seed is None else int(seed)
    if n_epochs < 1:
        raise InvalidInputError(f"epochs: expected >= 1, got {n_epochs}")
    out = Path(out_dir).expanduser() if out_dir is not None else WEIGHTS_DIR
    path = out / recipe.output
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        t0 = time.perf_counter()
        torch.manual_seed(run_seed)
        g = torch.Generator().manual_seed(run_seed)
        model = MODELS.build(recipe.model, **dict(recipe.model_options))
        apply_overrides(model, recipe.train_overrides)
        train_ds = build_split(recipe, recipe.train_split)
        n = count(train_ds, limit)
        data = describe_data(train_ds, n)
        log(f"[{name}] {data['description']}; {n_epochs} epoch(s), batch {recipe.batch_size}, seed {run_seed}")
        pretrain = _run_pretrain(recipe, model, limit, g, log)
        epoch_times, loads = fit_epochs(recipe, model, train_ds, n, n_epochs, g, log)
        train_time = time.perf_counter() - t0
        model.eval()
        save_checkpoint(model, path)
        t1 = time.perf_counter()
        metric = evaluate_clean(name, checkpoint=path, limit=eval_limit, log=log)
        eval_time = time.perf_counter() - t1
        cmd = training_command(name, out_dir if out_dir is not None else None, epochs, seed, limit)
        card = {
            "name": name,
            "model": recipe.model,
            "model_options": dict(recipe.model_options),
            "task": recipe.task,
            "commands": {"script": f"python scripts/train.py {cmd}", "cli": f"equi train {cmd}"},
            "seed": run_seed,
            "data": data,
            "augmentation": {
                **dict(recipe.augmentation),
                "description": describe_augmentation(recipe.task, recipe.augmentation),
            },
            "recipe": recipe.to_dict(),
            **({"pretrain": pretrain} if pretrain is not None else {}),
            "epochs": n_epochs,
            "epoch_times_s": [round(t, 1) for t in epoch_times],
            "wall_time_s": round(train_time, 3),
            "eval_time_s": round(eval_time, 3),
            "machine": {**machine_info(), "load_average_at_epoch_ends": loads},
            "versions": library_versions(),
            "torch_version": torch.__version__,
            "clean_test_metric": metric,
            "acceptance": {
                "metric": recipe.metric,
                "threshold": recipe.acceptance,
                "met": bool(metric["value"] >= recipe.acceptance),
            },
            "checkpoint": recipe.output,
            "checkpoint_bytes": path.stat().st_size,
            "created": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
        }
        save_checkpoint(model, path, meta=card)
        log(
            f"[{name}] wrote {path} ({path.stat().st_size / 1e6:.2f} MB); clean {metric['metric']} "
            f"{metric['value']:.4f} on {metric['split']} split, n={metric['n']}; train {train_time:.0f} s"
        )
        if out == WEIGHTS_DIR:
            write_model_cards(WEIGHTS_DIR)
        return read_card(path) or card
    finally:
        torch.set_num_threads(old_threads)


def _run_pretrain(
    recipe: Recipe, model: nn.Module, limit: int | None, g: torch.Generator, log: Log
) -> dict[str, Any] | None:
    """Run ``recipe``'s first stage on ``model`` (``limit`` caps its data too); what the card records of it."""
    stage = pretrain_recipe(recipe)
    if stage is None:
        return None
    t0 = time.perf_counter()
    ds = build_split(stage, stage.train_split)
    n = count(ds, limit)
    data = describe_data(ds, n)
    log(f"[{stage.name}] {data['description']}; {stage.epochs} epoch(s), batch {stage.batch_size}, lr {stage.lr}")
    times, loads = fit_epochs(stage, model, ds, n, stage.epochs, g, log)
    return {
        "data": data,
        "epochs": stage.epochs,
        "batch_size": stage.batch_size,
        "lr": stage.lr,
        "epoch_times_s": [round(t, 1) for t in times],
        "load_average_at_epoch_ends": loads,
        "wall_time_s": round(time.perf_counter() - t0, 3),
    }
