"""Model definitions. Importing this package registers every built-in model in ``equicore.registry.MODELS``.

``MODELS.build(name, checkpoint=None, **opts)`` returns an ``nn.Module`` in eval mode that takes images in [0, 1]
(it owns its normalisation). Segmentation models expose ``logits_lowres(x)`` and ``output_stride``.
"""

from __future__ import annotations

from equicore.models import drn, fashion_cnn, lenet, zoo
from equicore.models.checkpoint import (
    card_path,
    load_checkpoint,
    load_into,
    load_state_into,
    read_card,
    save_checkpoint,
    weights_digest,
)
from equicore.models.common import IMAGENET_MEAN, IMAGENET_STD, Normalize

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalize",
    "card_path",
    "drn",
    "fashion_cnn",
    "lenet",
    "load_checkpoint",
    "load_into",
    "load_state_into",
    "read_card",
    "save_checkpoint",
    "weights_digest",
    "zoo",
]
