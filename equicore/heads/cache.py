"""Finding, checking and caching the head a defense reads: the given file or the shipped head of the adapter's model,
checked against the model's weights digest and feature layer, loaded once per (file, model)."""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from equicore.adapters import TaskAdapter
from equicore.errors import CheckpointError, InvalidInputError
from equicore.heads.format import (
    HeadArtifact,
    backbone_digest,
    feature_layer_of,
    read_head,
    shipped_head_path,
    train_head_command,
)

# model -> {(path, mtime, size, kind, model name, feature layer): checked artefact}, and model -> backbone digest.
# Keyed weakly on the model object: the digest is computed once per model (weights are frozen while a defense runs)
# and the entries go away with the model.
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], HeadArtifact]] = weakref.WeakKeyDictionary()
_DIGESTS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def record_backbone_digest(model: nn.Module, digest: str) -> None:
    """Check heads against ``digest`` for ``model``: an inference-optimised copy of a model (BatchNorm folded into
    its convolutions, :mod:`equicore.models.inference_graph`) holds other tensors than the weights it was made from,
    but it is their backbone, and heads trained on them fit it."""
    _DIGESTS[model] = digest


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
