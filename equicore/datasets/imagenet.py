"""ImageNet validation images in the usual class-folder layout ``root/<split>/<wnid>/*.JPEG``.

Class indices are the sorted wnid order (torchvision's ``ImageFolder`` / the standard 1000-class order) unless a
``class_index`` JSON gives them: either ``{"n01440764": 0, ...}`` or Keras' ``{"0": ["n01440764", "tench"], ...}``.
Images are resized (bilinear, shorter side ``resize``) and centre-cropped to ``crop`` like the paper's models expect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from equicore.datasets.base import (
    Sample,
    SampleDataset,
    array_digest,
    files_digest,
    image_to_tensor,
    read_image,
    require_dir,
)
from equicore.errors import DatasetError
from equicore.registry import DATASETS

# Where this dataset's loading code lives besides this module (for its code identity).
_MODULES = ("equicore.datasets.base",)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def read_class_index(path: Path) -> dict[str, int]:
    """wnid -> index from either JSON form; DatasetError naming the file when it is neither."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read class-index JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not data:
        raise DatasetError(f"{path}: expected a JSON object mapping wnid -> index")
    mapping: dict[str, int] = {}
    for key, value in data.items():
        if isinstance(value, int):
            mapping[str(key)] = value
        elif isinstance(value, list) and value and isinstance(value[0], str) and str(key).isdigit():
            mapping[value[0]] = int(key)
        else:
            raise DatasetError(f"{path}: entry {key!r}: expected wnid -> int or index -> [wnid, name]")
    return mapping


def deterministic_subset(n: int, fraction: float) -> np.ndarray:
    """Evenly spaced ``round(n * fraction)`` of ``range(n)`` (every 20th for 5%), starting at 0."""
    if not 0 < fraction <= 1:
        raise DatasetError(f"imagenet: fraction must be in (0, 1], got {fraction}")
    m = max(1, int(round(n * fraction))) if n else 0
    return np.floor(np.arange(m) * (n / m)).astype(np.int64) if m else np.zeros(0, dtype=np.int64)


def resize_center_crop(img: Image.Image, resize: int, crop: int) -> Image.Image:
    """Shorter side to ``resize`` (bilinear) then the central ``crop`` x ``crop`` square (torchvision rounding)."""
    w, h = img.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    top = int(round((nh - crop) / 2.0))
    left = int(round((nw - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


class ImageNetFolder(SampleDataset):
    task = "classification"
    ignore_index = None
    name = "imagenet"

    def __init__(
        self,
        root: Path,
        split: str,
        files: list[Path],
        labels: list[int],
        class_names: tuple[str, ...],
        options: dict[str, Any],
    ) -> None:
        self.root = root
        self.split = split
        self.class_names = class_names
        self.num_classes = len(class_names)
        self._files = files
        self._labels = labels
        self._opts = options
        self._digest = files_digest(files, root)

    def __len__(self) -> int:
        return len(self._files)

    def sample_id(self, index: int) -> str:
        f = self._files[index]
        return f"{self.split}/{f.parent.name}/{f.stem}"

    def _load(self, index: int) -> Sample:
        img = read_image(self._files[index], "RGB", root=self.root)
        img = resize_center_crop(img, self._opts["resize"], self._opts["crop"])
        return Sample(self.sample_id(index), image_to_tensor(img), self._labels[index])

    def _options(self) -> dict[str, Any]:
        return self._opts


@DATASETS.register("imagenet", task="classification", modules=_MODULES, test_split="val")
def imagenet(
    root: str,
    split: str = "val",
    fraction: float = 0.05,
    class_index: str | None = None,
    resize: int = 256,
    crop: int = 224,
) -> ImageNetFolder:
    """ImageNet ``root/<split>/<wnid>/*.JPEG``; 3 x ``crop`` x ``crop`` after a bilinear resize of the shorter side
    to ``resize`` and a centre crop (defaults 256 / 224, as the paper's models expect).

    ``fraction`` keeps an evenly spaced deterministic subset of the sorted file list (0.05 = every 20th file, the
    paper's 5% evaluation subset; 1.0 = all). ``class_index``: a JSON file giving each wnid folder its class index,
    either ``{"n01440764": 0, ...}`` or Keras' ``imagenet_class_index.json`` (``{"0": ["n01440764", "tench"],
    ...}``, whose names then label the classes); without it, classes are the sorted wnid folders (torchvision's
    order, the one its checkpoints use). Needed when ``<split>/`` holds only some classes: the sorted order of a
    subset would renumber them.
    """
    base = require_dir(root, "ImageNet")
    split_dir = base / split
    if not split_dir.is_dir():
        raise DatasetError(f"{base}: expected folder {split}/ holding one folder per class (<wnid>/*.JPEG)")
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
    if not class_dirs:
        raise DatasetError(f"{split_dir}: expected one folder per class (<wnid>/*.JPEG), found none")
    if class_index is not None:
        mapping = read_class_index(Path(class_index))
        unknown = [d.name for d in class_dirs if d.name not in mapping]
        if unknown:
            raise DatasetError(f"{class_index}: no class index for folder {unknown[0]!r} under {split_dir}")
        num_classes = max(mapping.values()) + 1
        names = [""] * num_classes
        for wnid, k in mapping.items():
            if k < 0:
                raise DatasetError(f"{class_index}: class index {k} for {wnid!r} out of range (expected >= 0)")
            names[k] = wnid
    else:
        mapping = {d.name: k for k, d in enumerate(class_dirs)}
        names = [d.name for d in class_dirs]
    files: list[Path] = []
    labels: list[int] = []
    for d in class_dirs:
        for f in sorted(d.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(mapping[d.name])
    if not files:
        raise DatasetError(f"{split_dir}: no images (*.JPEG, *.jpg, *.png) in the class folders")
    keep = deterministic_subset(len(files), float(fraction))
    # The mapping's content (not the JSON's path) is what changes the labels.
    index_digest = array_digest(np.asarray(sorted(mapping.items()), dtype=str)) if class_index else None
    opts = {"fraction": float(fraction), "resize": int(resize), "crop": int(crop), "class_index": index_digest}
    return ImageNetFolder(base, split, [files[i] for i in keep], [labels[i] for i in keep], tuple(names), opts)
