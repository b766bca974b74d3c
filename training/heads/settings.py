"""Per-kind head settings (the ``HEAD_SETTINGS`` registry) and the head-training defaults."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from equicore.heads import ROTATIONS, check_kind
from equicore.registry import Registry

# The feature layer a head sits on when ``feature_layer`` is not given: the one the demo configs use for the model.
DEFAULT_FEATURE_LAYERS: Final = MappingProxyType(
    {"fashion_cnn": "features.block2", "lenet5_mnist_adv": "relu2", "lenet5_mnist_clean": "relu2"}
)
DEFAULT_TRAIN_LIMIT: Final = 10000
DEFAULT_EVAL_LIMIT: Final = 2000
EXTRACT_BATCH: Final = 256


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


# Head kind -> factory of its settings.
HEAD_SETTINGS: Registry[HeadSettings] = Registry("head kind")


def register_head_settings(kind: str, settings: HeadSettings) -> HeadSettings:
    """Add ``settings`` to ``HEAD_SETTINGS`` for head ``kind`` (one of ``equicore.heads.HEAD_KINDS``)."""
    HEAD_SETTINGS.register(check_kind(kind))(lambda: settings)
    return settings


# A 2x2 pooled grid keeps where things are, which is what tells rotations apart.
register_head_settings("rotation", HeadSettings(grid=2, hidden=128, out_dim=ROTATIONS, epochs=20))
register_head_settings(
    "contrastive",
    HeadSettings(
        grid=1, hidden=256, out_dim=64, epochs=20, temperature=0.2, bank_size=512, augmentations=4, views="simclr"
    ),
)


def head_settings(kind: str) -> HeadSettings:
    """The default settings of head ``kind``; another kind fails like ``equicore.heads.check_kind``."""
    return HEAD_SETTINGS.build(check_kind(kind))
