"""Datasets: built-in offline benchmarks (Fashion-MNIST, MNIST, Fashion scenes) and loaders for the paper's
formats (ImageNet, Cityscapes, PASCAL VOC, COCO). Importing this package registers every factory in ``DATASETS``.

Build one by name: ``DATASETS.build("fashion_scenes", split="test")``; batch with ``collate``.
"""

from equicore.datasets import (  # noqa: F401  (imports register the factories)
    builtin,
    cityscapes,
    coco,
    fashion_mnist,
    folders,
    imagenet,
    mnist,
    scenes,
    voc,
)
from equicore.datasets.base import (
    IGNORE_INDEX,
    Sample,
    SampleDataset,
    collate,
    default_data_dir,
    masks_to_boxes,
)
from equicore.datasets.builtin import prepare

__all__ = [
    "IGNORE_INDEX",
    "Sample",
    "SampleDataset",
    "collate",
    "default_data_dir",
    "masks_to_boxes",
    "prepare",
]
