"""Training the self-supervised heads of the rotation and contrastive defenses (``equi train-head KIND MODEL``).

- ``training.heads.settings``: ``HeadSettings`` per kind (the ``HEAD_SETTINGS`` registry) and the defaults.
- ``training.heads.backbone``: the frozen model, its training data and pooled features.
- ``training.heads.fit``: fitting and scoring rotation and contrastive heads.
- ``training.heads.train``: ``train_head``, ``fit_head`` and ``write_head``.

The artefacts' format and the defenses that load them are the engine's (``equicore.heads``).
"""

from training.heads.backbone import build_backbone, build_head_adapter, head_data, load_images, pooled_features
from training.heads.fit import (
    FittedHead,
    contrastive_eval,
    defense_view_features,
    rotation_accuracy,
    rotation_features,
)
from training.heads.settings import (
    DEFAULT_EVAL_LIMIT,
    DEFAULT_FEATURE_LAYERS,
    DEFAULT_TRAIN_LIMIT,
    HEAD_SETTINGS,
    HeadSettings,
    head_settings,
)
from training.heads.train import fit_head, held_out_figures, train_head, write_head

__all__ = [
    "DEFAULT_EVAL_LIMIT",
    "DEFAULT_FEATURE_LAYERS",
    "DEFAULT_TRAIN_LIMIT",
    "HEAD_SETTINGS",
    "FittedHead",
    "HeadSettings",
    "build_backbone",
    "build_head_adapter",
    "contrastive_eval",
    "defense_view_features",
    "fit_head",
    "head_data",
    "head_settings",
    "held_out_figures",
    "load_images",
    "pooled_features",
    "rotation_accuracy",
    "rotation_features",
    "train_head",
    "write_head",
]
