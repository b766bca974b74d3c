"""Cityscapes fine annotations: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
``gtFine/<split>/<city>/*_gtFine_labelIds.png``, mapped to the 19 evaluation classes (trainIds, 255 = ignore).

Images are resized bilinearly and labels by nearest neighbour to 340 x 680 (H x W), the paper's resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from equicore.datasets.base import (
    IGNORE_INDEX,
    Sample,
    SampleDataset,
    as_hw,
    check_layout,
    check_same_size,
    files_digest,
    image_to_tensor,
    read_image,
    read_label_map,
    require_dir,
    resize_image,
    resize_labels,
)
from equicore.errors import DatasetError
from equicore.registry import DATASETS

# Where this dataset's loading code lives besides this module (for its code identity).
_MODULES = ("equicore.datasets.base",)

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
# labelId -> trainId, from cityscapesScripts' labels.py (ids 0..33; every class not evaluated maps to 255).
_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
MAX_LABEL_ID = 33
LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.int64)
for _lid, _tid in _TRAIN_IDS.items():
    LABEL_TO_TRAIN[_lid] = _tid

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a labelIds array (values 0..33) to trainIds (0..18, 255 ignore)."""
    return LABEL_TO_TRAIN[label_ids]


class CityscapesDataset(SampleDataset):
    name = "cityscapes"
    task = "segmentation"
    class_names = CITYSCAPES_CLASSES
    num_classes = len(CITYSCAPES_CLASSES)
    ignore_index = IGNORE_INDEX

    def __init__(self, root: Path, split: str, pairs: list[tuple[Path, Path]], hw: tuple[int, int]) -> None:
        self.root = root
        self.split = split
        self._pairs = pairs
        self._hw = hw
        self._digest = files_digest([p for pair in pairs for p in pair], root)

    def __len__(self) -> int:
        return len(self._pairs)

    def sample_id(self, index: int) -> str:
        img = self._pairs[index][0]
        return f"{self.split}/{img.parent.name}/{img.name[: -len(IMAGE_SUFFIX)]}"

    def _load(self, index: int) -> Sample:
        img_path, lab_path = self._pairs[index]
        img = read_image(img_path, "RGB", root=self.root)
        label_ids = read_label_map(lab_path, root=self.root)
        check_same_size(img, label_ids, lab_path)
        img = resize_image(img, self._hw)
        if label_ids.size and (label_ids.min() < 0 or label_ids.max() > MAX_LABEL_ID):
            bad = int(label_ids.max() if label_ids.max() > MAX_LABEL_ID else label_ids.min())
            raise DatasetError(f"{lab_path}: label value {bad} out of range (expected labelIds 0..{MAX_LABEL_ID})")
        # Map before resizing: nearest-neighbour resize then only moves valid trainIds and 255 around.
        train_ids = resize_labels(label_ids_to_train_ids(label_ids), self._hw)
        return Sample(self.sample_id(index), image_to_tensor(img), torch.from_numpy(train_ids.astype(np.int64)))


@DATASETS.register("cityscapes", task="segmentation", modules=_MODULES, test_split="val")
def cityscapes(root: str, split: str = "val", size: int | tuple[int, int] = (340, 680)) -> CityscapesDataset:
    """Cityscapes ``root`` (holding leftImg8bit/ and gtFine/); 19 classes, ignore 255; ``size`` = (H, W)."""
    base = require_dir(root, "Cityscapes")
    check_layout(base, [f"leftImg8bit/{split}", f"gtFine/{split}"], f"the Cityscapes {split} split")
    img_root = base / "leftImg8bit" / split
    pairs: list[tuple[Path, Path]] = []
    for img in sorted(img_root.glob(f"*/*{IMAGE_SUFFIX}")):
        stem = img.name[: -len(IMAGE_SUFFIX)]
        lab = base / "gtFine" / split / img.parent.name / f"{stem}{LABEL_SUFFIX}"
        if not lab.is_file():
            raise DatasetError(f"{lab}: label file missing for image {img.name} (expected *{LABEL_SUFFIX})")
        pairs.append((img, lab))
    if not pairs:
        raise DatasetError(f"{img_root}: expected images <city>/*{IMAGE_SUFFIX}, found none")
    return CityscapesDataset(base, split, pairs, as_hw(size, "cityscapes"))
