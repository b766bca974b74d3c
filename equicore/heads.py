"""Self-supervised heads for the rotation (Shi et al., ICLR 2021) and contrastive (Mao et al., ICCV 2021) defenses.

A head sits on ``adapter.features(x)`` (a dense ``B x C x h x w`` map, or a ``B x D`` vector), with the backbone
frozen: adaptive average pooling to a ``grid x grid`` map (``grid`` 0: vector features, no pooling), a fixed
per-dimension standardisation (training-set statistics) and a two-layer MLP. Every step is per sample, so a head's
output for one image never depends on its batch-mates.

- rotation: 4 logits (0/90/180/270 degrees, ``torch.rot90``); the defense minimises the mean cross-entropy of the
  four rotated copies of an image against their rotation labels.
- contrastive: a SimCLR projection to unit vectors; the defense minimises InfoNCE between an image and its
  augmented views (positives), with a FIXED bank of embeddings of training images as negatives (stored in the
  artefact), never the other images of the batch.

The artefact is one ``weights_only``-loadable state_dict of tensors: the head's ``mean``/``std``/``net.*``, the
contrastive ``bank`` (M x d unit vectors) and ``meta``, the head's description as UTF-8 JSON in a uint8 tensor (kind,
model, backbone weights digest, feature layer, channels, grid, temperature), so the file alone says what it belongs
to. Shipped heads live at ``equicore/models/weights/heads/<model>.<kind>.pt`` with a ``.card.json`` beside them.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equicore.adapters import TaskAdapter
from equicore.equivariance import view_features
from equicore.errors import CheckpointError, InvalidInputError
from equicore.models.checkpoint import load_checkpoint, weights_digest
from equicore.models.common import WEIGHTS_DIR
from equicore.transforms.base import InvertibleTransform, Params

HEAD_KINDS = ("rotation", "contrastive")
HEADS_DIR = WEIGHTS_DIR / "heads"
ROTATIONS = 4
HEAD_FORMAT = 1
_META_KEY = "meta"
_BANK_KEY = "bank"

FeatureFn = Callable[[Tensor], Tensor]


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


# ------------------------------------------------------------------------------------ resolution, checks, cache

# model -> {(path, mtime, size, kind, model name, feature layer): checked artefact}, and model -> backbone digest.
# Keyed weakly on the model object: the digest is computed once per model (weights are frozen while a defense runs)
# and the entries go away with the model.
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], HeadArtifact]] = weakref.WeakKeyDictionary()
_DIGESTS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def resolve_head_path(
    kind: str,
    head: str | os.PathLike[str] | None,
    model_name: str | None,
    who: str,
    feature_layer: str | None = None,
) -> Path:
    """The file a defense reads: ``head`` when given, else the shipped head of the adapter's model. Errors name the
    ``equi train-head`` command that creates the missing file (with the adapter's ``feature_layer`` when known)."""
    if head is not None:
        p = Path(head).expanduser()
        if not p.is_file():
            cmd = train_head_command(kind, model_name or "MODEL", p, feature_layer)
            raise CheckpointError(f"{who}: head file {p} not found; create it with `{cmd}`")
        return p
    if not model_name:
        raise CheckpointError(
            f"{who}.head is unset and the adapter does not name its model (adapter.model_name is None): pass "
            f"head=PATH, a file written by `{train_head_command(kind, 'MODEL', 'PATH', feature_layer)}`"
        )
    p = shipped_head_path(model_name, kind)
    if not p.is_file():
        raise CheckpointError(
            f"{who}: no {kind} head for model {model_name!r} at {p}; train it with "
            f"`{train_head_command(kind, model_name, feature_layer=feature_layer)}` (or set the defense's head: PATH)"
        )
    return p


def check_head_fits(art: HeadArtifact, adapter: TaskAdapter, digest: str, who: str) -> None:
    """The head must belong to this model (name and weights digest) and to the adapter's feature layer."""
    m = art.meta
    name = adapter.model_name
    if name and name != m.model:
        raise CheckpointError(
            f"{who}: head {art.path} was trained for model {m.model!r} (weights digest {m.backbone_digest[:12]}) but "
            f"the defense runs model {name!r} (weights digest {digest[:12]}); train one with "
            f"`{train_head_command(m.kind, name, feature_layer=feature_layer_of(adapter))}`"
        )
    if digest != m.backbone_digest:
        shown = repr(name) if name else "this model"
        raise CheckpointError(
            f"{who}: head {art.path} was trained for {m.model!r} weights digest {m.backbone_digest[:12]} but "
            f"{shown} has weights digest {digest[:12]} (another checkpoint or a retrained model); retrain the head "
            f"with `{train_head_command(m.kind, name or m.model, feature_layer=feature_layer_of(adapter))}`"
        )
    layer = feature_layer_of(adapter)
    if layer != m.feature_layer:
        raise CheckpointError(
            f"{who}: head {art.path} was trained on feature layer {m.feature_layer!r} of {m.model!r} but the "
            f"adapter's features are {layer!r}; use feature layer {m.feature_layer!r} or train a head with "
            f"`{train_head_command(m.kind, m.model, 'PATH', layer)}`"
        )


def load_head_for(adapter: TaskAdapter, kind: str, head: str | os.PathLike[str] | None, who: str) -> HeadArtifact:
    """The checked head for ``adapter``'s model, loaded once per (file, model) and cached."""
    layer = feature_layer_of(adapter)
    path = resolve_head_path(kind, head, adapter.model_name, who, layer)
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, kind, adapter.model_name, layer)
    per_model = _CACHE.setdefault(adapter.model, {})
    if key not in per_model:
        art = read_head(path, expected_kind=kind, who=who)
        digest = _DIGESTS.get(adapter.model)
        if digest is None:
            digest = _DIGESTS[adapter.model] = backbone_digest(adapter.model)
        check_head_fits(art, adapter, digest, who)
        per_model[key] = art
    return per_model[key]


def clear_head_cache() -> None:
    _CACHE.clear()
    _DIGESTS.clear()


def check_channels(art: HeadArtifact, features: Tensor, who: str) -> None:
    c = int(features.shape[1])
    if c != art.meta.in_channels or (features.ndim == 2) != (art.meta.grid == 0):
        shape = "vector" if features.ndim == 2 else "dense"
        raise InvalidInputError(
            f"{who}: head {art.path} expects {art.meta.in_channels}-channel "
            f"{'vector' if art.meta.grid == 0 else 'dense'} features ({art.meta.feature_layer} of "
            f"{art.meta.model!r}) but the adapter's features are {c}-channel {shape} ({tuple(features.shape)})"
        )


# -------------------------------------------------------------------------------------------------- objectives


def rotated_copies(x: Tensor) -> list[Tensor]:
    """``x`` rotated by 0, 90, 180 and 270 degrees (counter-clockwise, ``torch.rot90`` on H, W)."""
    return [torch.rot90(x, r, dims=(-2, -1)) if r else x for r in range(ROTATIONS)]


def rotation_logits(feature_fn: FeatureFn, head: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``ROTATIONS x B x 4`` logits of the rotated copies of ``x``. Copies of equal shape run in one forward pass
    (all four for square images; 0/180 and 90/270 otherwise)."""
    b = x.shape[0]
    copies = rotated_copies(x)
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, c in enumerate(copies):
        groups.setdefault(tuple(c.shape[-2:]), []).append(r)
    out: list[Tensor | None] = [None] * ROTATIONS
    for rs in groups.values():
        logits = head(feature_fn(torch.cat([copies[r] for r in rs]) if len(rs) > 1 else copies[rs[0]]))
        for j, r in enumerate(rs):
            out[r] = logits[j * b : (j + 1) * b]
    return torch.stack(out)  # type: ignore[arg-type]


def rotation_loss_from_logits(logits: Tensor) -> Tensor:
    """Per-sample mean cross-entropy ``[B]`` of ``ROTATIONS x B x 4`` logits against their rotation labels."""
    r, b = logits.shape[:2]
    labels = torch.arange(r, device=logits.device).repeat_interleave(b)
    ce = F.cross_entropy(logits.reshape(r * b, -1), labels, reduction="none")
    return ce.view(r, b).mean(0)


def rotation_loss(feature_fn: FeatureFn, head: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    return rotation_loss_from_logits(rotation_logits(feature_fn, head, x))


def embed(head: Callable[[Tensor], Tensor], features: Tensor) -> Tensor:
    return F.normalize(head(features), dim=-1, eps=1e-8)


def contrastive_embeddings(
    feature_fn: FeatureFn,
    head: Callable[[Tensor], Tensor],
    x: Tensor,
    views: Sequence[InvertibleTransform],
    params: Sequence[Params],
    *,
    batched: bool = True,
    max_batch_pixels: int | None = None,
) -> Tensor:
    """``B x (1 + K) x d`` unit embeddings of ``x`` and its K views (views of equal size share a forward pass)."""
    vf = view_features(feature_fn, x, views, params, batched=batched, max_batch_pixels=max_batch_pixels)
    return torch.stack([embed(head, f) for f in (vf.reference, *vf.transformed)], dim=1)


def info_nce(z: Tensor, bank: Tensor, temperature: float) -> Tensor:
    """Per-image InfoNCE ``[B]`` of ``z`` (``B x V x d`` unit embeddings of V views of each image).

    For every ordered pair (a, p) of distinct views of one image: ``-log exp(z_a.z_p / t) / (sum over the image's
    other views v != a of exp(z_a.z_v / t) + sum over the bank of exp(z_a.b_m / t))`` (NT-Xent with the fixed bank
    as negatives), averaged over the V(V-1) pairs. Only the image's own views and the bank enter: batch-mates never.
    """
    b, v, _ = z.shape
    if v < 2:
        raise InvalidInputError("contrastive: InfoNCE needs at least two views of each image")
    pos = torch.einsum("bvd,bwd->bvw", z, z) / temperature  # B x V x V
    neg = torch.einsum("bvd,md->bvm", z, bank) / temperature  # B x V x M
    eye = torch.eye(v, dtype=torch.bool, device=z.device)
    pos_masked = pos.masked_fill(eye, float("-inf"))
    denom = torch.logsumexp(torch.cat([pos_masked, neg], dim=2), dim=2)  # B x V
    terms = denom.unsqueeze(2) - pos  # B x V(anchor) x V(positive)
    return terms.masked_fill(eye, 0.0).sum((1, 2)) / (v * (v - 1))
