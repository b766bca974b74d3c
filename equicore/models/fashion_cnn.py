"""A small BatchNorm CNN for Fashion-MNIST (1x28x28, 10 classes), trained by the project itself.

Submodules are named so a defense can pick a spatial feature layer by name: ``features.block1`` (32x14x14),
``features.block2`` (64x7x7) and ``features.block3`` (128x7x7), or any layer inside them
(``features.block2.conv2``, ...).
"""

from __future__ import annotations

import os
from collections import OrderedDict

from torch import Tensor, nn

from equicore.models.common import MODEL_MODULES, Normalize, finish
from equicore.registry import MODELS

# Fashion-MNIST training-set pixel statistics.
FASHION_MEAN = (0.2860,)
FASHION_STD = (0.3530,)

FASHION_FEATURE_LAYERS = ("features.block1", "features.block2", "features.block3")


def _conv_bn(cin: int, cout: int) -> list[tuple[str, nn.Module]]:
    return [("conv", nn.Conv2d(cin, cout, 3, padding=1, bias=False)), ("bn", nn.BatchNorm2d(cout)), ("relu", nn.ReLU())]


def _block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    """Two conv-BN-ReLU layers (named conv1/bn1/relu1, conv2/bn2/relu2), then an optional 2x2 max-pool."""
    layers: list[tuple[str, nn.Module]] = []
    for i, (a, b) in enumerate(((cin, cout), (cout, cout)), start=1):
        layers += [(f"{n}{i}", m) for n, m in _conv_bn(a, b)]
    if pool:
        layers.append(("pool", nn.MaxPool2d(2)))
    return nn.Sequential(OrderedDict(layers))


class FashionCNN(nn.Module):
    """block1 (1->32, /2) - block2 (32->64, /2) - block3 (64->128) - global average pool - dropout - fc 128->10.

    About 290k parameters. Owns its normalisation (Fashion-MNIST mean/std): inputs are in [0, 1].
    """

    feature_layers = FASHION_FEATURE_LAYERS

    def __init__(self, num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        self.normalize = Normalize(FASHION_MEAN, FASHION_STD)
        self.features = nn.Sequential(
            OrderedDict(
                block1=_block(1, 32, pool=True),
                block2=_block(32, 64, pool=True),
                block3=_block(64, 128, pool=False),
            )
        )
        self.head = nn.Sequential(
            OrderedDict(
                pool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(1),
                dropout=nn.Dropout(dropout),
                fc=nn.Linear(128, num_classes),
            )
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        """The last spatial feature map, B x 128 x 7 x 7."""
        return self.features(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


@MODELS.register(
    "fashion_cnn",
    modules=MODEL_MODULES,
    task="classification",
    dataset="fashion_mnist",
    input_shape=(1, 28, 28),
    num_classes=10,
    feature_layers=FASHION_FEATURE_LAYERS,
    weights="fashion_cnn.pt",  # trained by `equi train fashion_cnn`
)
def fashion_cnn(checkpoint: str | os.PathLike[str] | None = None) -> nn.Module:
    """FashionCNN, randomly initialised or loaded from ``checkpoint`` (trained by the project's train command)."""
    return finish(FashionCNN(), checkpoint, "fashion_cnn")
