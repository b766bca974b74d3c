"""Self-supervised heads for the rotation (Shi et al., ICLR 2021) and contrastive (Mao et al., ICCV 2021) defenses.

- :mod:`equicore.heads.format`: the head network, its description (:class:`HeadMeta`) and its artefact file;
- :mod:`equicore.heads.cache`: which file a defense reads, the checks that it fits the model, a per-model cache;
- :mod:`equicore.heads.losses`: the rotation and contrastive (InfoNCE) objectives.

Every public name of the three is importable from ``equicore.heads``.
"""

from equicore.heads.cache import (
    check_channels,
    check_head_fits,
    clear_head_cache,
    load_head_for,
    resolve_head_path,
)
from equicore.heads.format import (
    HEAD_FORMAT,
    HEAD_KINDS,
    HEADS_DIR,
    HeadArtifact,
    HeadMeta,
    SelfSupHead,
    backbone_digest,
    build_head,
    check_kind,
    decode_meta,
    encode_meta,
    feature_layer_of,
    file_sha256,
    head_state,
    pool_features,
    read_head,
    shipped_head_path,
    train_head_command,
)
from equicore.heads.losses import (
    ROTATIONS,
    FeatureFn,
    contrastive_embeddings,
    embed,
    info_nce,
    rotated_copies,
    rotation_logits,
    rotation_loss,
    rotation_loss_from_logits,
)

__all__ = [
    "HEADS_DIR",
    "HEAD_FORMAT",
    "HEAD_KINDS",
    "ROTATIONS",
    "FeatureFn",
    "HeadArtifact",
    "HeadMeta",
    "SelfSupHead",
    "backbone_digest",
    "build_head",
    "check_channels",
    "check_head_fits",
    "check_kind",
    "clear_head_cache",
    "contrastive_embeddings",
    "decode_meta",
    "embed",
    "encode_meta",
    "feature_layer_of",
    "file_sha256",
    "head_state",
    "info_nce",
    "load_head_for",
    "pool_features",
    "read_head",
    "resolve_head_path",
    "rotated_copies",
    "rotation_logits",
    "rotation_loss",
    "rotation_loss_from_logits",
    "shipped_head_path",
    "train_head_command",
]
