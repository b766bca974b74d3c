"""The self-supervised head and its artefact: the network (pool, standardise, two-layer MLP), its description
(:class:`HeadMeta`) and the ``weights_only``-loadable file that holds both.

A head sits on ``adapter.features(x)`` (a dense ``B x C x h x w`` map, or a ``B x D`` vector), with the backbone
frozen: adaptive average pooling to a ``grid x grid`` map (``grid`` 0: vector features, no pooling), a fixed
per-dimension standardisation (training-set statistics) and a two-layer MLP. Every step is per sample, so a head's
output for one image never depends on its batch-mates.

The artefact is one ``weights_only``-loadable state_dict of tensors: the head's ``mean``/``std``/``net.*``, the
contrastive ``bank`` (M x d unit vectors) and ``meta``, the head's description as UTF-8 JSON in a uint8 tensor (kind,
model, backbone weights digest, feature layer, channels, grid, temperature), so the file alone says what it belongs
to. Shipped heads live at ``equicore/models/weights/heads/<model>.<kind>.pt`` with a ``.card.json`` beside them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equicore.adapters import TaskAdapter
from equicore.errors import CheckpointError, InvalidInputError
from equicore.models.checkpoint import load_checkpoint, weights_digest
from equicore.models.common import WEIGHTS_DIR

HEAD_KINDS = ("rotation", "contrastive")
HEADS_DIR = WEIGHTS_DIR / "heads"
HEAD_FORMAT = 1
_META_KEY = "meta"
_BANK_KEY = "bank"


# ----------------------------------------------------------------------------------------------- naming, digests


def check_kind(kind: str) -> str:
    if kind not in HEAD_KINDS:
        raise InvalidInputError(f"head kind: expected one of {list(HEAD_KINDS)}, got {kind!r}")
    return kind


def shipped_head_path(model: str, kind: str) -> Path:
    """Where the shipped ``kind`` head of ``model`` lives: ``weights/heads/<model>.<kind>.pt``."""
    return HEADS_DIR / f"{model}.{check_kind(kind)}.pt"


def train_head_command(
    kind: str, model: str, out: str | os.PathLike[str] | None = None, feature_layer: str | None = None
) -> str:
    return (
        f"equi train-head {kind} {model}"
        + (f" --feature-layer {feature_layer}" if feature_layer is not None else "")
        + (f" --out {out}" if out is not None else "")
    )


def backbone_digest(model: nn.Module) -> str:
    """``weights_digest`` of the model with floating-point tensors cast to float32: for a float32 model (every
    shipped one) exactly ``weights_digest(model)``; a float64 copy of the same weights gives the same digest."""
    sd = {k: (v.detach().float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return weights_digest(sd)


def feature_layer_of(adapter: TaskAdapter) -> str:
    """Which representation ``adapter.features`` returns: a classifier's ``feature_layer``, ``fpn.<level>`` for
    Mask R-CNN, ``logits_lowres`` (or ``logits``) for segmentation."""
    if hasattr(adapter, "feature_layer"):
        return str(adapter.feature_layer)
    if hasattr(adapter, "feature_level"):
        return f"fpn.{adapter.feature_level}"
    return "logits_lowres" if getattr(adapter, "_lowres", None) is not None else "logits"


# ---------------------------------------------------------------------------------------------------- the head


@dataclass(frozen=True)
class HeadMeta:
    """What a head belongs to and how it is built; stored in the artefact and in its card."""

    kind: str
    model: str
    backbone_digest: str
    feature_layer: str
    task: str
    in_channels: int
    grid: int  # pooled grid side; 0 = vector features (B x D), no pooling
    hidden: int
    out_dim: int
    temperature: float = 0.0  # contrastive only
    format: int = HEAD_FORMAT

    @property
    def in_features(self) -> int:
        return self.in_channels * max(1, self.grid) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pool_features(features: Tensor, grid: int) -> Tensor:
    """``B x C x h x w`` -> ``B x (C * grid * grid)`` by adaptive average pooling; ``B x D`` passes through."""
    if features.ndim == 2:
        return features
    if features.ndim != 4:
        raise InvalidInputError(f"features: expected B x D or B x C x h x w, got {tuple(features.shape)}")
    return F.adaptive_avg_pool2d(features, max(1, grid)).flatten(1)


class SelfSupHead(nn.Module):
    """Pool -> standardise (fixed ``mean``/``std`` buffers) -> Linear -> ReLU -> Linear."""

    def __init__(self, in_features: int, hidden: int, out_dim: int, grid: int) -> None:
        super().__init__()
        self.grid = int(grid)
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def standardised(self, pooled: Tensor) -> Tensor:
        return (pooled - self.mean) / self.std

    def forward_pooled(self, pooled: Tensor) -> Tensor:
        return self.net(self.standardised(pooled))

    def forward(self, features: Tensor) -> Tensor:
        return self.forward_pooled(pool_features(features, self.grid))


def build_head(meta: HeadMeta) -> SelfSupHead:
    return SelfSupHead(meta.in_features, meta.hidden, meta.out_dim, meta.grid)


# ------------------------------------------------------------------------------------------------ the artefact


def encode_meta(meta: Mapping[str, Any]) -> Tensor:
    return torch.tensor(list(json.dumps(dict(meta), sort_keys=True).encode()), dtype=torch.uint8)


def decode_meta(t: Tensor) -> dict[str, Any]:
    return json.loads(bytes(t.to(torch.uint8).tolist()).decode())


def head_state(meta: HeadMeta, head: SelfSupHead, bank: Tensor | None = None) -> dict[str, Tensor]:
    """The artefact's state_dict: head weights, the negative bank (contrastive) and the encoded meta."""
    sd = {k: v.detach().cpu().float().clone() for k, v in head.state_dict().items()}
    if bank is not None:
        sd[_BANK_KEY] = bank.detach().cpu().float().clone()
    sd[_META_KEY] = encode_meta(meta.to_dict())
    return sd


@dataclass
class HeadArtifact:
    """A loaded head (float32, CPU) with its meta; ``on(device, dtype)`` gives cached copies for computation."""

    path: Path
    meta: HeadMeta
    head: SelfSupHead
    bank: Tensor | None
    _copies: dict[tuple[str, torch.dtype], tuple[SelfSupHead, Tensor | None]] = field(default_factory=dict)

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[SelfSupHead, Tensor | None]:
        key = (str(device), dtype)
        if key not in self._copies:
            head = build_head(self.meta)
            head.load_state_dict(self.head.state_dict())
            head = head.to(device=device, dtype=dtype).eval()
            for p in head.parameters():
                p.requires_grad_(False)
            bank = self.bank.to(device=device, dtype=dtype) if self.bank is not None else None
            self._copies[key] = (head, bank)
        return self._copies[key]


def read_head(path: str | os.PathLike[str], *, expected_kind: str | None = None, who: str = "head") -> HeadArtifact:
    """Load a head file (``weights_only``) and check it is a well-formed head of ``expected_kind``."""
    p = Path(path)
    sd = load_checkpoint(p, expected=f"{expected_kind or 'self-supervised'} head")
    if _META_KEY not in sd:
        raise CheckpointError(
            f"{who}: {p} is not a self-supervised head (it has no {_META_KEY!r} entry); heads are written by "
            "`equi train-head`"
        )
    try:
        raw = decode_meta(sd.pop(_META_KEY))
        meta = HeadMeta(**raw)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{who}: {p} has an unreadable head description ({exc})") from None
    if meta.kind not in HEAD_KINDS:
        raise CheckpointError(f"{who}: {p} holds an unknown head kind {meta.kind!r}")
    if expected_kind is not None and meta.kind != expected_kind:
        raise CheckpointError(f"{who}: {p} is a {meta.kind} head, not a {expected_kind} head")
    bank = sd.pop(_BANK_KEY, None)
    if meta.kind == "contrastive" and (bank is None or bank.ndim != 2 or bank.shape[1] != meta.out_dim):
        raise CheckpointError(f"{who}: {p} is a contrastive head without a valid negative bank (M x {meta.out_dim})")
    head = build_head(meta)
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{who}: {p} does not fit its own description: {str(exc).splitlines()[0]}") from None
    return HeadArtifact(p, meta, head.eval(), bank)


def file_sha256(path: str | os.PathLike[str], length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]
