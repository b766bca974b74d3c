"""PASCAL VOC 2012 semantic segmentation: ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNGs whose
pixel values are class indices 0..20, 255 = boundary/ignore) and ``ImageSets/Segmentation/<split>.txt``.

Images are resized bilinearly and labels by nearest neighbour to 480 x 480, the paper's resolution. Label PNGs that
were re-saved as RGB are mapped back through the VOC colour map.
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
    check_label_values,
    check_layout,
    check_same_size,
    files_digest,
    image_to_tensor,
    label_array,
    read_image,
    read_label_raw,
    require_dir,
    resize_image,
    resize_labels,
)
from equicore.errors import DatasetError
from equicore.registry import DATASETS

# Where this dataset's loading code lives besides this module (for its code identity).
_MODULES = ("equicore.datasets.base",)

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
VOC_LAYOUT = ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")


def voc_colormap(n: int = 256) -> np.ndarray:
    """The VOC palette: class ``c``'s colour spreads c's bits over the high bits of R, G, B."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for c in range(n):
        r = g = b = 0
        v = c
        for shift in range(7, -1, -1):
            r |= (v & 1) << shift
            g |= ((v >> 1) & 1) << shift
            b |= ((v >> 2) & 1) << shift
            v >>= 3
        cmap[c] = (r, g, b)
    return cmap


def read_voc_label(path: Path, root: Path | None = None) -> np.ndarray:
    """Class-index map of a VOC label PNG (palette/grey as is; RGB through the VOC colour map)."""
    mode, arr = read_label_raw(path, root)
    if mode != "RGB":
        return label_array(mode, arr, path)
    rgb = arr.astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    cmap = voc_colormap().astype(np.int64)
    lut = {int((c[0] << 16) | (c[1] << 8) | c[2]): k for k, c in enumerate(cmap) if k < len(VOC_CLASSES) or k == 255}
    values, inverse = np.unique(code, return_inverse=True)
    out = np.empty(values.shape, dtype=np.int64)
    for i, v in enumerate(values):
        if int(v) not in lut:
            colour = ((int(v) >> 16) & 255, (int(v) >> 8) & 255, int(v) & 255)
            raise DatasetError(f"{path}: label colour {colour} is not a VOC class colour")
        out[i] = lut[int(v)]
    return out[inverse.reshape(code.shape)]


class VOCSegmentation(SampleDataset):
    name = "voc"
    task = "segmentation"
    class_names = VOC_CLASSES
    num_classes = len(VOC_CLASSES)
    ignore_index = IGNORE_INDEX

    def __init__(self, root: Path, split: str, ids: list[str], hw: tuple[int, int]) -> None:
        self.root = root
        self.split = split
        self._ids = ids
        self._hw = hw
        files = [root / "JPEGImages" / f"{i}.jpg" for i in ids] + [root / "SegmentationClass" / f"{i}.png" for i in ids]
        self._digest = files_digest(files, root)

    def __len__(self) -> int:
        return len(self._ids)

    def sample_id(self, index: int) -> str:
        return f"{self.split}/{self._ids[index]}"

    def _load(self, index: int) -> Sample:
        stem = self._ids[index]
        # Image ids come from the ImageSets list: one naming "../x" must not reach outside the dataset root.
        img = read_image(self.root / "JPEGImages" / f"{stem}.jpg", "RGB", root=self.root)
        lab_path = self.root / "SegmentationClass" / f"{stem}.png"
        label = read_voc_label(lab_path, root=self.root)
        check_same_size(img, label, lab_path)
        check_label_values(label, len(VOC_CLASSES) - 1, lab_path)
        img = resize_image(img, self._hw)
        label = resize_labels(label, self._hw)
        return Sample(self.sample_id(index), image_to_tensor(img), torch.from_numpy(label.astype(np.int64)))


@DATASETS.register("voc", task="segmentation", modules=_MODULES, test_split="val")
def voc(root: str, split: str = "val", size: int | tuple[int, int] = 480) -> VOCSegmentation:
    """VOC ``root`` (the VOC2012 folder); 21 classes, ignore 255, 3 x 480 x 480; ``split`` names the ImageSets list."""
    base = require_dir(root, "PASCAL VOC")
    check_layout(base, VOC_LAYOUT, "PASCAL VOC segmentation")
    list_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise DatasetError(f"{list_file}: split list not found (expected one image id per line)")
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{list_file}: split list is empty")
    for stem in ids:
        for f in (base / "JPEGImages" / f"{stem}.jpg", base / "SegmentationClass" / f"{stem}.png"):
            if not f.is_file():
                raise DatasetError(f"{f}: listed in {list_file.name} but missing")
    return VOCSegmentation(base, split, ids, as_hw(size, "voc"))
