"""``train_head(kind, model)`` (``equi train-head KIND MODEL``): fit a head on a frozen model, write it and its card.

Only the small head is fitted on features computed once, so a head trains in about a minute on a CPU. The card's
held-out figures are measured on the TEST split. A head written to the shipped ``weights/heads/`` folder re-renders
``MODEL_CARDS.md``.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from equicore.adapters import TaskAdapter
from equicore.errors import InvalidInputError
from equicore.heads import (
    HEADS_DIR,
    ROTATIONS,
    HeadMeta,
    backbone_digest,
    check_kind,
    feature_layer_of,
    shipped_head_path,
)
from equicore.models.checkpoint import read_card, save_checkpoint
from equicore.models.common import WEIGHTS_DIR
from equicore.registry import DATASETS
from equicore.seeding import derive_seed
from equicore.seeding import generator as make_generator
from equicore.transforms import build_views
from training.cards import write_model_cards
from training.data import describe_data
from training.heads.backbone import (
    build_backbone,
    build_head_adapter,
    head_data,
    load_images,
    pooled_features,
    probe_features,
)
from training.heads.fit import (
    FittedHead,
    Log,
    augmented_features,
    contrastive_eval,
    defense_view_features,
    fit_contrastive_head,
    fit_rotation_head,
    make_bank,
    rotation_accuracy,
    rotation_features,
)
from training.heads.settings import DEFAULT_EVAL_LIMIT, DEFAULT_TRAIN_LIMIT, HeadSettings, head_settings
from training.provenance import library_versions, machine_info


def head_command(
    kind: str,
    model: str,
    *,
    out: str | os.PathLike[str] | None,
    epochs: int,
    limit: int,
    eval_limit: int,
    feature_layer: str | None,
    checkpoint: str | os.PathLike[str] | None,
    seed: int,
    bank_size: int | None,
) -> str:
    """The ``equi train-head`` command line that reproduces a head."""
    parts = ["equi", "train-head", kind, model]
    if feature_layer is not None:
        parts += ["--feature-layer", feature_layer]
    if checkpoint is not None:
        parts += ["--checkpoint", os.fspath(checkpoint)]
    parts += ["--epochs", str(epochs), "--limit", str(limit), "--eval-limit", str(eval_limit), "--seed", str(seed)]
    if bank_size is not None:
        parts += ["--bank-size", str(bank_size)]
    if out is not None:
        parts += ["--out", os.fspath(out)]
    return shlex.join(parts)


def head_output_path(kind: str, model: str, out: str | os.PathLike[str] | None) -> Path:
    """``out`` ending in ``.pt`` is the file; another ``out`` is a folder; None is the shipped location."""
    if out is None:
        return shipped_head_path(model, kind)
    p = Path(out).expanduser()
    return p if p.suffix == ".pt" else p / f"{model}.{kind}.pt"


def train_head(
    kind: str,
    model: str,
    *,
    out: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    limit: int | None = DEFAULT_TRAIN_LIMIT,
    eval_limit: int | None = DEFAULT_EVAL_LIMIT,
    feature_layer: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    seed: int = 0,
    bank_size: int | None = None,
    threads: int | None = 2,
    log: Log = print,
) -> dict[str, Any]:
    """Train ``kind``'s head on ``model``'s frozen features, write the artefact and its card, return the card.

    ``limit``: the first ``limit`` training images (None: all); ``eval_limit``: the first ``eval_limit`` TEST images
    for the held-out figures (None: all). ``bank_size`` (contrastive): the negatives, a seeded sample of the whole
    training split. Without ``out`` the head goes to ``weights/heads/`` and ``MODEL_CARDS.md`` is re-rendered.
    """
    defaults = head_settings(kind)
    n_epochs = defaults.epochs if epochs is None else int(epochs)
    if n_epochs < 1:
        raise InvalidInputError(f"epochs: expected >= 1, got {n_epochs}")
    settings = replace(defaults, epochs=n_epochs)
    for label, value in (("limit", limit), ("eval_limit", eval_limit)):
        if value is not None and int(value) < 1:
            raise InvalidInputError(f"{label}: expected >= 1, got {value}")
    n_bank = None
    if kind == "contrastive":
        n_bank = settings.bank_size if bank_size is None else int(bank_size)
        if n_bank < 1:
            raise InvalidInputError(f"bank_size: expected >= 1, got {n_bank}")
    elif bank_size is not None:
        raise InvalidInputError("bank_size: only the contrastive head has a negative bank")
    path = head_output_path(kind, model, out)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _train_head(
            kind, model, settings, path, out, limit, eval_limit, feature_layer, checkpoint, seed, n_bank, log
        )
    finally:
        torch.set_num_threads(old_threads)


def fit_head(
    kind: str,
    adapter: TaskAdapter,
    images: Tensor,
    *,
    model: str,
    settings: HeadSettings | None = None,
    seed: int = 0,
    bank_images: Tensor | None = None,
    log: Log = print,
) -> FittedHead:
    """Fit ``kind``'s head on the frozen ``adapter.features`` of ``images`` (uint8 or [0, 1] floats, ``N x C x H x W``).

    ``model`` names the backbone in the head's description; its weights digest is taken from ``adapter.model``. The
    contrastive bank embeds ``bank_images`` (default: ``images`` themselves).
    """
    check_kind(kind)
    settings = settings or head_settings(kind)
    t0 = time.perf_counter()
    channels, dense = probe_features(adapter, images)
    grid = settings.grid if dense else 0
    meta = HeadMeta(
        kind=kind,
        model=model,
        backbone_digest=backbone_digest(adapter.model),
        feature_layer=feature_layer_of(adapter),
        task=adapter.task,
        in_channels=channels,
        grid=grid,
        hidden=settings.hidden,
        out_dim=settings.out_dim,
        temperature=settings.temperature,
    )
    if kind == "rotation":
        feats = rotation_features(adapter, images, grid)
        t_feat = time.perf_counter() - t0
        log(f"[{model}.{kind}] features of {images.shape[0]} images x {ROTATIONS} rotations in {t_feat:.0f} s")
        head, stats = fit_rotation_head(feats, settings, grid, seed, log)
        return FittedHead(meta, head, None, stats, t_feat)
    views = build_views(settings.views)
    feats = augmented_features(adapter, images, views, grid, settings.augmentations, seed)
    t_feat = time.perf_counter() - t0
    log(f"[{model}.{kind}] features of {images.shape[0]} images x {feats.shape[0]} views in {t_feat:.0f} s")
    head, stats = fit_contrastive_head(feats, settings, grid, seed, log)
    bank = make_bank(head, pooled_features(adapter, bank_images if bank_images is not None else images, grid))
    return FittedHead(meta, head, bank, stats, t_feat)


def write_head(path: str | os.PathLike[str], fitted: FittedHead, card: dict[str, Any] | None = None) -> Path:
    """Write the head artefact (``weights_only``-loadable) and, when given, its card beside it."""
    p = Path(path)
    state = fitted.state()
    save_checkpoint(state, p)
    if card is not None:
        save_checkpoint(state, p, meta={**card, "checkpoint": p.name, "checkpoint_bytes": p.stat().st_size})
    return p


def held_out_figures(kind: str, fitted: FittedHead, adapter: TaskAdapter, images: Tensor) -> dict[str, Any]:
    """Rotation accuracy, or the contrastive retrieval figures, of a fitted head on held-out ``images``."""
    grid = fitted.meta.grid
    if kind == "rotation":
        return rotation_accuracy(fitted.head, rotation_features(adapter, images, grid))
    assert fitted.bank is not None
    views = build_views(head_settings("contrastive").views)
    feats = defense_view_features(adapter, images, views, grid)
    return contrastive_eval(fitted.head, feats, fitted.bank, fitted.meta.temperature)


def _train_head(
    kind: str,
    model: str,
    settings: HeadSettings,
    path: Path,
    out: str | os.PathLike[str] | None,
    limit: int | None,
    eval_limit: int | None,
    feature_layer: str | None,
    checkpoint: str | os.PathLike[str] | None,
    seed: int,
    n_bank: int | None,
    log: Log,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = head_data(model)
    net, source = build_backbone(model, checkpoint, seed)
    adapter = build_head_adapter(model, net, feature_layer)
    train_ds = DATASETS.build(data.dataset, split=data.train_split, **dict(data.options))
    test_ds = DATASETS.build(data.dataset, split=data.test_split, **dict(data.options))
    if test_ds.split != "test":
        raise InvalidInputError(f"held-out figures must come from a test split, got {test_ds.split!r}")
    n = min(len(train_ds), int(limit)) if limit is not None else len(train_ds)
    n_test = min(len(test_ds), int(eval_limit)) if eval_limit is not None else len(test_ds)
    train_data = describe_data(train_ds, n)
    log(
        f"[{model}.{kind}] {train_data['description']}; frozen {model} ({source}), features "
        f"{feature_layer_of(adapter)!r}"
    )
    bank_idx: list[int] | None = None
    bank_images = None
    if kind == "contrastive":
        assert n_bank is not None
        g = make_generator(derive_seed(seed, "bank"))
        bank_idx = sorted(torch.randperm(len(train_ds), generator=g)[: min(n_bank, len(train_ds))].tolist())
        bank_images = load_images(train_ds, bank_idx)
    fitted = fit_head(
        kind,
        adapter,
        load_images(train_ds, range(n)),
        model=model,
        settings=settings,
        seed=seed,
        bank_images=bank_images,
        log=log,
    )
    train_time = time.perf_counter() - t0
    t1 = time.perf_counter()
    held_out = held_out_figures(kind, fitted, adapter, load_images(test_ds, range(n_test)))
    eval_time = time.perf_counter() - t1
    test_data = describe_data(test_ds, n_test)
    held_out = {**held_out, "split": test_ds.split, "n": n_test, "description": test_data["description"]}
    log(
        f"[{model}.{kind}] held-out {held_out['metric']} {held_out['value']:.4f} (chance {held_out['chance']:.4f}) "
        f"on {n_test} {test_ds.split} images; training {train_time:.0f} s"
    )
    meta = fitted.meta
    extra: dict[str, Any] = {}
    if kind == "contrastive":
        assert bank_idx is not None
        m = len(bank_idx)
        extra = {
            "bank": {
                "size": m,
                "split": train_ds.split,
                "sampled_from": len(train_ds),
                "seed": seed,
                "indices": bank_idx,
                "description": f"{m} images drawn with seed {seed} from all {len(train_ds)} images of the "
                f"{train_ds.split} split (each as itself, no view), unit embeddings",
            },
            "views": {"name": settings.views, "augmentations_per_image": settings.augmentations},
            "temperature": settings.temperature,
        }
    cmd = head_command(
        kind,
        model,
        out=out,
        epochs=settings.epochs,
        limit=n,
        eval_limit=n_test,
        feature_layer=meta.feature_layer if adapter.task != "segmentation" else None,
        checkpoint=checkpoint,
        seed=seed,
        bank_size=n_bank,
    )
    grid = meta.grid
    card = {
        "name": f"{model}.{kind}",
        "kind": kind,
        "model": model,
        "backbone": {"model": model, "weights": source, "weights_digest": meta.backbone_digest, "frozen": True},
        "head": meta.to_dict(),
        "architecture": (
            f"adaptive average pool to {grid}x{grid} ({meta.in_features} dims), standardised, Linear-ReLU-Linear "
            f"({settings.hidden} hidden, {settings.out_dim} out)"
            if grid
            else f"standardised {meta.in_channels}-dim vector, Linear-ReLU-Linear ({settings.hidden} hidden, "
            f"{settings.out_dim} out)"
        ),
        "commands": {"cli": cmd},
        "seed": seed,
        "data": train_data,
        "optimisation": {
            "optimizer": "adam",
            "lr": settings.lr,
            "weight_decay": settings.weight_decay,
            "batch_size": settings.batch_size,
        },
        "epochs": settings.epochs,
        "train_figures": {k: round(v, 4) for k, v in fitted.train_figures.items()},
        "feature_time_s": round(fitted.feature_time_s, 3),
        "wall_time_s": round(train_time, 3),
        "eval_time_s": round(eval_time, 3),
        "held_out": held_out,
        **extra,
        "machine": machine_info(),
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
    }
    write_head(path, fitted, card)
    log(f"[{model}.{kind}] wrote {path} ({path.stat().st_size / 1e3:.1f} kB)")
    if path.parent.resolve() == HEADS_DIR.resolve():
        write_model_cards(WEIGHTS_DIR)
    return read_card(path) or card
