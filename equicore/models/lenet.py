"""LeNet5 for MNIST, with the parameter names of advertorch's ``advertorch.test_utils.LeNet5``.

The two shipped checkpoints (``weights/mnist_lenet5_{cln,adv}trained.pt``, from advertorch 0.2.3) load into it
strictly. Inputs are 1x28x28 in [0, 1]; the network was trained without normalisation, so there is none.
"""

from __future__ import annotations

import os

from torch import Tensor, nn

from equicore.models.common import MODEL_MODULES, WEIGHTS_DIR, finish
from equicore.registry import MODELS

CLEAN_WEIGHTS = WEIGHTS_DIR / "mnist_lenet5_clntrained.pt"
ADV_WEIGHTS = WEIGHTS_DIR / "mnist_lenet5_advtrained.pt"

# Spatial layers a defense can take features from (hook names), earliest first.
LENET_FEATURE_LAYERS = ("relu1", "maxpool1", "relu2", "maxpool2", "relu3")


class LeNet5(nn.Module):
    """conv(1->32, 3x3, pad 1) - ReLU - maxpool 2 - conv(32->64, 3x3, pad 1) - ReLU - maxpool 2 - fc 3136->200 -
    ReLU - fc 200->10. Names match advertorch's state_dict (conv1, conv2, linear1, linear2)."""

    feature_layers = LENET_FEATURE_LAYERS

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        # Not in-place (unlike advertorch): a forward hook on a conv must see its own output, unmodified.
        self.relu1 = nn.ReLU()
        self.maxpool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.maxpool2 = nn.MaxPool2d(2)
        self.linear1 = nn.Linear(7 * 7 * 64, 200)
        self.relu3 = nn.ReLU()
        self.linear2 = nn.Linear(200, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The last spatial feature map, B x 64 x 7 x 7."""
        x = self.maxpool1(self.relu1(self.conv1(x)))
        return self.maxpool2(self.relu2(self.conv2(x)))

    def forward(self, x: Tensor) -> Tensor:
        out = self.features(x).flatten(1)
        return self.linear2(self.relu3(self.linear1(out)))


_META = dict(
    task="classification", dataset="mnist", input_shape=(1, 28, 28), num_classes=10, feature_layers=LENET_FEATURE_LAYERS
)


@MODELS.register("lenet5", modules=MODEL_MODULES, **_META, weights=None)
def lenet5(checkpoint: str | os.PathLike[str] | None = None) -> nn.Module:
    """LeNet5, randomly initialised or loaded from ``checkpoint``."""
    return finish(LeNet5(), checkpoint, "lenet5")


@MODELS.register(
    "lenet5_mnist_clean",
    modules=MODEL_MODULES,
    **_META,
    weights=CLEAN_WEIGHTS.name,
    source="advertorch==0.2.3 (LGPL-3.0)",
)
def lenet5_mnist_clean(checkpoint: str | os.PathLike[str] | None = None) -> nn.Module:
    """LeNet5 with advertorch's cleanly trained MNIST weights (or ``checkpoint`` instead)."""
    return finish(LeNet5(), checkpoint if checkpoint is not None else CLEAN_WEIGHTS, "lenet5_mnist_clean")


@MODELS.register(
    "lenet5_mnist_adv",
    modules=MODEL_MODULES,
    **_META,
    weights=ADV_WEIGHTS.name,
    source="advertorch==0.2.3 (LGPL-3.0)",
    training="PGD Linf eps=0.3, 40 steps of 0.01",
)
def lenet5_mnist_adv(checkpoint: str | os.PathLike[str] | None = None) -> nn.Module:
    """LeNet5 with advertorch's PGD-adversarially trained MNIST weights (or ``checkpoint`` instead)."""
    return finish(LeNet5(), checkpoint if checkpoint is not None else ADV_WEIGHTS, "lenet5_mnist_adv")
