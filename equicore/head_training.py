"""Training the self-supervised heads of the rotation and contrastive defenses (``equi train-head KIND MODEL``).

The backbone is frozen: features are computed once (``torch.no_grad``), pooled to the head's grid, and only the small
head is fitted, so a head trains in about a minute on a CPU. Data: the TRAINING split of the model's dataset (the
training recipe's dataset, or the model's registered one, e.g. MNIST's 5000 training digits for advertorch's LeNet5);
the card's held-out figures are measured on the TEST split.

- rotation: every training image in its 4 rotations (``torch.rot90``), a 4-way cross-entropy.
- contrastive: every training image as itself plus ``augmentations`` views drawn from the defense's view set
  (``simclr``), NT-Xent (SimCLR) between two random views of each image with the other images of the minibatch as
  negatives; afterwards a FIXED bank of ``bank_size`` embeddings of a seeded sample of the training split is stored
  in the artefact: at test time the defense uses it as its negatives, never the batch.

Pure torch: no prefect/dask/zarr imports. Randomness comes from generators seeded by ``seed``.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import equicore.datasets  # noqa: F401  (registers the datasets)
import equicore.models  # noqa: F401  (registers the models)
from equicore.adapters import TaskAdapter, build_adapter
from equicore.errors import InvalidInputError
from equicore.heads import (
    HEADS_DIR,
    ROTATIONS,
    HeadMeta,
    SelfSupHead,
    backbone_digest,
    check_kind,
    embed,
    feature_layer_of,
    head_state,
    info_nce,
    pool_features,
    rotated_copies,
    shipped_head_path,
)
from equicore.models.checkpoint import read_card, save_checkpoint
from equicore.models.common import WEIGHTS_DIR, resolve_checkpoint
from equicore.registry import DATASETS, MODELS
from equicore.seeding import derive_seed
from equicore.seeding import generator as make_generator
from equicore.transforms import InvertibleTransform, build_views

Log = Callable[[str], None]

# The feature layer a head sits on when ``feature_layer`` is not given: the one the demo configs use for the model.
DEFAULT_FEATURE_LAYERS = {"fashion_cnn": "features.block2", "lenet5_mnist_adv": "relu2", "lenet5_mnist_clean": "relu2"}
DEFAULT_TRAIN_LIMIT = 10000
DEFAULT_EVAL_LIMIT = 2000
EXTRACT_BATCH = 256


@dataclass(frozen=True)
class HeadSettings:
    """Architecture and optimisation of one head kind (the CLI's defaults)."""

    grid: int
    hidden: int
    out_dim: int
    epochs: int
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.0
    bank_size: int = 0
    augmentations: int = 0
    views: str = ""


HEAD_SETTINGS: dict[str, HeadSettings] = {
    # A 2x2 pooled grid keeps where things are, which is what tells rotations apart.
    "rotation": HeadSettings(grid=2, hidden=128, out_dim=ROTATIONS, epochs=20),
    "contrastive": HeadSettings(
        grid=1, hidden=256, out_dim=64, epochs=20, temperature=0.2, bank_size=512, augmentations=4, views="simclr"
    ),
}


# --------------------------------------------------------------------------------------------- model and data


@dataclass(frozen=True)
class HeadData:
    dataset: str
    options: Mapping[str, Any]
    train_split: str
    test_split: str


def head_data(model: str) -> HeadData:
    """The dataset whose TRAINING split trains ``model``'s heads: its training recipe's, else its registered one."""
    from equicore.training import TRAINING_RECIPES

    recipe = TRAINING_RECIPES.get(model)
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
    from equicore.training import TRAINING_RECIPES

    recipe = TRAINING_RECIPES.get(model)
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


# ----------------------------------------------------------------------------------------------- features


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


def _standardise(head: SelfSupHead, pooled: Tensor) -> None:
    head.mean.copy_(pooled.mean(0))
    head.std.copy_(pooled.std(0).clamp_min(1e-4))


def _minibatches(n: int, batch_size: int, g: torch.Generator) -> list[Tensor]:
    perm = torch.randperm(n, generator=g)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


# ------------------------------------------------------------------------------------------------- rotation


def rotation_features(adapter: TaskAdapter, images: Tensor, grid: int) -> Tensor:
    """``ROTATIONS x N x D`` pooled features of every image rotated by 0/90/180/270 degrees."""
    return torch.stack(
        [pooled_features(adapter, images, grid, lambda x, _k, r=r: rotated_copies(x)[r]) for r in range(ROTATIONS)]
    )


def fit_rotation_head(
    feats: Tensor, settings: HeadSettings, grid: int, seed: int, log: Log = print
) -> tuple[SelfSupHead, dict[str, float]]:
    """Fit a rotation head on ``ROTATIONS x N x D`` pooled features; returns it and its final training figures."""
    r, n, d = feats.shape
    x = feats.reshape(r * n, d)
    y = torch.arange(r).repeat_interleave(n)
    torch.manual_seed(derive_seed(seed, "rotation-head-init"))
    head = SelfSupHead(d, settings.hidden, ROTATIONS, grid)
    _standardise(head, x)
    opt = torch.optim.Adam(head.net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    g = make_generator(derive_seed(seed, "rotation-head-batches"))
    stats: dict[str, float] = {}
    for epoch in range(1, settings.epochs + 1):
        loss_sum, correct, seen = 0.0, 0, 0
        for idx in _minibatches(r * n, settings.batch_size, g):
            logits = head.forward_pooled(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            seen += len(idx)
        stats = {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}
        if epoch == 1 or epoch == settings.epochs or epoch % 5 == 0:
            log(
                f"[rotation head] epoch {epoch}/{settings.epochs} loss {stats['train_loss']:.4f} "
                f"accuracy {stats['train_accuracy']:.4f}"
            )
    return head.eval(), stats


@torch.no_grad()
def rotation_accuracy(head: SelfSupHead, feats: Tensor) -> dict[str, Any]:
    """Rotation-prediction accuracy of ``head`` on ``ROTATIONS x N x D`` pooled features (chance 1/4)."""
    r, n, _ = feats.shape
    pred = head.forward_pooled(feats.reshape(r * n, -1)).argmax(1)
    y = torch.arange(r).repeat_interleave(n)
    per = [(pred[k * n : (k + 1) * n] == k).float().mean().item() for k in range(r)]
    return {
        "metric": "rotation_accuracy",
        "value": float((pred == y).float().mean()),
        "chance": 1.0 / r,
        "per_rotation": [round(v, 4) for v in per],
        "predictions": r * n,
    }


# ---------------------------------------------------------------------------------------------- contrastive


def augmented_features(
    adapter: TaskAdapter,
    images: Tensor,
    views: Sequence[InvertibleTransform],
    grid: int,
    augmentations: int,
    seed: int,
) -> Tensor:
    """``(1 + A) x N x D``: slot 0 the images themselves, slots 1..A a random view per chunk of images (view and its
    parameters drawn from a generator seeded by ``seed``)."""
    g = make_generator(derive_seed(seed, "contrastive-augment"))
    in_size = (int(images.shape[-2]), int(images.shape[-1]))

    def augment(x: Tensor, _k: int) -> Tensor:
        v = views[int(torch.randint(len(views), (), generator=g))]
        return v.forward(x, v.sample(g, in_size))

    slots = [pooled_features(adapter, images, grid)]
    slots += [pooled_features(adapter, images, grid, augment) for _ in range(augmentations)]
    return torch.stack(slots)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent over 2B unit embeddings (positives: the same row of z1 and z2)."""
    b = z1.shape[0]
    z = torch.cat([z1, z2])
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(b) + b, torch.arange(b)])
    return F.cross_entropy(sim, targets)


def fit_contrastive_head(
    feats: Tensor, settings: HeadSettings, grid: int, seed: int, log: Log = print
) -> tuple[SelfSupHead, dict[str, float]]:
    """Fit a projection head on ``S x N x D`` pooled features of S views per image (NT-Xent, two random views of
    each image per step)."""
    s, n, d = feats.shape
    torch.manual_seed(derive_seed(seed, "contrastive-head-init"))
    head = SelfSupHead(d, settings.hidden, settings.out_dim, grid)
    _standardise(head, feats.reshape(s * n, d))
    opt = torch.optim.Adam(head.net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    g = make_generator(derive_seed(seed, "contrastive-head-batches"))
    stats: dict[str, float] = {}
    for epoch in range(1, settings.epochs + 1):
        loss_sum, seen = 0.0, 0
        for idx in _minibatches(n, settings.batch_size, g):
            if len(idx) < 2:
                continue
            a = torch.randint(s, (len(idx),), generator=g)
            b = (a + torch.randint(1, s, (len(idx),), generator=g)) % s
            z1 = embed(head.forward_pooled, feats[a, idx])
            z2 = embed(head.forward_pooled, feats[b, idx])
            loss = nt_xent(z1, z2, settings.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
        stats = {"train_nt_xent": loss_sum / max(1, seen)}
        if epoch == 1 or epoch == settings.epochs or epoch % 5 == 0:
            log(f"[contrastive head] epoch {epoch}/{settings.epochs} NT-Xent {stats['train_nt_xent']:.4f}")
    return head.eval(), stats


@torch.no_grad()
def contrastive_eval(head: SelfSupHead, feats: Tensor, bank: Tensor, temperature: float) -> dict[str, Any]:
    """Held-out figures of a projection head on ``(1 + K) x N x D`` pooled features (slot 0: the images, slots 1..K:
    the defense's K views): for every (image, view) pair, whether the view's embedding is closer to the image's than
    every bank negative (chance 1/(M+1)) and than every other held-out image's view (chance 1/N); and the mean
    InfoNCE the defense minimises."""
    s, n, _ = feats.shape
    z = torch.stack([embed(head.forward_pooled, feats[k]) for k in range(s)], dim=1)  # N x S x d
    anchor = z[:, 0]
    neg_best = (anchor @ bank.t()).max(1).values  # N
    vs_bank, within = [], []
    for k in range(1, s):
        pos = (anchor * z[:, k]).sum(1)
        vs_bank.append((pos > neg_best).float())
        within.append(((anchor @ z[:, k].t()).argmax(1) == torch.arange(n)).float())
    return {
        "metric": "view_vs_bank_top1",
        "value": float(torch.cat(vs_bank).mean()),
        "chance": 1.0 / (bank.shape[0] + 1),
        "within_test_top1": float(torch.cat(within).mean()),
        "within_test_chance": 1.0 / n,
        "info_nce": float(info_nce(z, bank, temperature).mean()),
        "pairs": n * (s - 1),
    }


@torch.no_grad()
def make_bank(head: SelfSupHead, pooled: Tensor) -> Tensor:
    """``M x d`` unit embeddings of the bank images' pooled features: the contrastive defense's fixed negatives."""
    return embed(head.forward_pooled, pooled)


def defense_view_features(
    adapter: TaskAdapter, images: Tensor, views: Sequence[InvertibleTransform], grid: int, view_seed: int = 0
) -> Tensor:
    """``(1 + K) x N x D``: the images and the K views the contrastive defense uses at step 0 of ``view_seed``."""
    from equicore.equivariance import sample_view_params

    params = sample_view_params(
        views, derive_seed(view_seed, "views", 0), (int(images.shape[-2]), int(images.shape[-1]))
    )
    slots = [pooled_features(adapter, images, grid)]
    for v, p in zip(views, params, strict=True):
        slots.append(pooled_features(adapter, images, grid, lambda x, _k, v=v, p=p: v.forward(x, p)))
    return torch.stack(slots)


# ---------------------------------------------------------------------------------------------- the command


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
    check_kind(kind)
    n_epochs = HEAD_SETTINGS[kind].epochs if epochs is None else int(epochs)
    if n_epochs < 1:
        raise InvalidInputError(f"epochs: expected >= 1, got {n_epochs}")
    settings = replace(HEAD_SETTINGS[kind], epochs=n_epochs)
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


@dataclass
class FittedHead:
    meta: HeadMeta
    head: SelfSupHead
    bank: Tensor | None
    train_figures: dict[str, float]
    feature_time_s: float
    bank_indices: list[int] | None = None

    def state(self) -> dict[str, Tensor]:
        return head_state(self.meta, self.head, self.bank)


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
    settings = settings or HEAD_SETTINGS[kind]
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
    views = build_views(HEAD_SETTINGS["contrastive"].views)
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
    from equicore.training import _versions, describe_data, machine_info

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
        "feature_time_s": round(fitted.feature_time_s, 1),
        "wall_time_s": round(train_time, 1),
        "eval_time_s": round(eval_time, 1),
        "held_out": held_out,
        **extra,
        "machine": machine_info(),
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
    }
    write_head(path, fitted, card)
    log(f"[{model}.{kind}] wrote {path} ({path.stat().st_size / 1e3:.1f} kB)")
    if path.parent.resolve() == HEADS_DIR.resolve():
        from equicore.training import write_model_cards

        write_model_cards(WEIGHTS_DIR)
    return read_card(path) or card


# ------------------------------------------------------------------------------------------------ head cards


def load_head_cards(folder: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    folder = Path(folder) if folder is not None else HEADS_DIR
    cards = []
    for p in sorted(folder.glob("*.pt")):
        card = read_card(p)
        if card is not None:
            cards.append(card)
    return cards


def _fmt_held_out(h: Mapping[str, Any]) -> str:
    if h["metric"] == "rotation_accuracy":
        return (
            f"rotation accuracy **{100 * h['value']:.2f}%** (chance 25%; {h['predictions']} predictions, "
            f"{h['split']} split, n={h['n']})"
        )
    return (
        f"view closer than every bank negative **{100 * h['value']:.2f}%** (chance {100 * h['chance']:.2f}%); "
        f"view retrieval among the held-out images {100 * h['within_test_top1']:.2f}% (chance "
        f"{100 * h['within_test_chance']:.2f}%); InfoNCE {h['info_nce']:.3f} ({h['split']} split, n={h['n']})"
    )


def render_head_cards(folder: str | os.PathLike[str] | None = None) -> list[str]:
    """Markdown lines for the heads section of ``MODEL_CARDS.md`` (empty when there is no head card)."""
    cards = load_head_cards(folder)
    if not cards:
        return []
    lines = [
        "",
        "## Self-supervised defense heads",
        "",
        "Heads of the `rotation` and `contrastive` defenses (`equicore/heads.py`), trained by `equi train-head KIND "
        "MODEL` on the frozen model's features (its TRAINING split) and stored in `heads/<model>.<kind>.pt`. A "
        "defense refuses a head whose recorded backbone weights digest or feature layer differs from the model's. "
        "Held-out figures are measured on the **test** split.",
        "",
        "| head | feature layer | data (train) | epochs | wall time | held-out figure | file |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cards:
        lines.append(
            f"| `{c['name']}` | `{c['head']['feature_layer']}` | {c['data']['dataset']} {c['data']['split']}, "
            f"n={c['data']['n']} | {c['epochs']} | {c['wall_time_s']:.0f} s | {_fmt_held_out(c['held_out'])} | "
            f"`heads/{c['checkpoint']}` ({c['checkpoint_bytes'] / 1e3:.1f} kB) |"
        )
    for c in cards:
        mach = c["machine"]
        opt = c["optimisation"]
        lines += [
            "",
            f"### `{c['name']}`",
            "",
            f"- **Backbone:** `{c['model']}` ({c['backbone']['weights']}, frozen), weights digest "
            f"`{c['backbone']['weights_digest']}`; features `{c['head']['feature_layer']}` "
            f"({c['head']['in_channels']} channels).",
            f"- **Head:** {c['architecture']}.",
            f"- **Train data:** {c['data']['description']}.",
        ]
        if c["kind"] == "contrastive":
            lines.append(
                f"- **Views and negatives:** each image plus {c['views']['augmentations_per_image']} views from the "
                f"`{c['views']['name']}` view set, NT-Xent at temperature {c['temperature']}; negative bank: "
                f"{c['bank']['description']}."
            )
        else:
            lines.append("- **Task:** predict which of 0/90/180/270 degrees (`torch.rot90`) an image was rotated by.")
        lines += [
            f"- **Optimisation:** {opt['optimizer']} lr {opt['lr']} (weight decay {opt['weight_decay']}), batch "
            f"{opt['batch_size']}, {c['epochs']} epochs, seed {c['seed']}; final training figures "
            f"{', '.join(f'{k} {v}' for k, v in c['train_figures'].items())}.",
            f"- **Held-out ({c['held_out']['description']}):** {_fmt_held_out(c['held_out'])}.",
            f"- **Time:** {c['wall_time_s']:.0f} s training ({c['feature_time_s']:.0f} s of it computing backbone "
            f"features) + {c['eval_time_s']:.0f} s evaluation, on {mach['cpu']} with {mach['torch_threads']} torch "
            f"thread(s) ({mach['cpu_count']} cores, shared), no GPU.",
            f"- **Reproduce:** `{c['commands']['cli']}`.",
            f"- **File:** `heads/{c['checkpoint']}`, {c['checkpoint_bytes']:,} B, weights digest "
            f"`{c['weights_digest']}`; trained {c['created']}.",
        ]
    return lines
