"""Your own images: ``image_folder`` (classification) and ``segmentation_folder`` (semantic segmentation).

``image_folder``: torchvision's ImageFolder layout ``root/<class>/<image>`` (classes in sorted folder order, or in
the order of ``class_names``), or a ``list_file`` (CSV ``path,label`` rows, an optional header, or JSON: a list of
``[path, label]`` pairs or ``{"path": ..., "label": ...}`` objects) of paths relative to ``root`` whose labels are
class names from ``class_names`` or indices into it.

``segmentation_folder``: ``root/images/<stem>.<ext>`` and ``root/masks/<stem>.png`` with the same stems; masks are
palette or single-channel PNGs whose values are class indices (``ignore_index``, default 255, marks unlabelled
pixels). The class count comes from ``class_names`` or ``num_classes``; a mask value above it names the file.

Both: ``size`` resizes every image (and mask, by nearest neighbour) to a fixed (height, width); ``resize`` scales
the shorter side and ``crop`` takes the central square, as torchvision's Resize + CenterCrop. Without them every
image must have the size of the first one (a different one is named). Files must stay inside ``root``.
The fingerprint holds the file names and sizes, the labels, the class names and the options.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from equicore.datasets.base import (
    IGNORE_INDEX,
    Sample,
    SampleDataset,
    array_digest,
    as_hw,
    check_inside,
    check_label_values,
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

_MODULES = ("equicore.datasets.base",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MAX_LIST_BYTES = 64 << 20  # a list file larger than this is not a list of images


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class _Geometry:
    """``size`` (fixed H x W) or ``resize`` (shorter side) + ``crop`` (central square); else the first image's."""

    def __init__(self, what: str, size: Any, resize: int | None, crop: int | None) -> None:
        if size is not None and (resize is not None or crop is not None):
            raise DatasetError(f"{what}: size conflicts with resize/crop; give size, or resize and/or crop")
        for name, v in (("resize", resize), ("crop", crop)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise DatasetError(f"{what}: {name} must be a positive integer, got {v!r}")
        self.what = what
        self.hw = as_hw(size, what) if size is not None else None
        self.resize, self.crop = resize, crop

    def options(self) -> dict[str, Any]:
        return {"size": list(self.hw) if self.hw else None, "resize": self.resize, "crop": self.crop}

    def _plan(self, w: int, h: int) -> tuple[tuple[int, int] | None, tuple[int, int, int, int] | None]:
        """(resize to (w, h) or None, crop box or None) for an image of w x h."""
        if self.hw is not None:
            return (self.hw[1], self.hw[0]), None
        target = (w, h)
        if self.resize is not None:
            s = self.resize
            target = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        box = None
        if self.crop is not None:
            c = self.crop
            if target[0] < c or target[1] < c:
                raise DatasetError(f"{self.what}: crop {c} is larger than the image ({target[0]}x{target[1]})")
            top, left = int(round((target[1] - c) / 2.0)), int(round((target[0] - c) / 2.0))
            box = (left, top, left + c, top + c)
        return (target if target != (w, h) else None), box

    def output_hw(self, w: int, h: int) -> tuple[int, int]:
        size, box = self._plan(w, h)
        if box is not None:
            return box[3] - box[1], box[2] - box[0]
        return (size[1], size[0]) if size is not None else (h, w)

    def image(self, img: Image.Image, path: Path, expected: tuple[int, int]) -> Image.Image:
        size, box = self._plan(*img.size)
        if size is not None:
            img = resize_image(img, (size[1], size[0]))
        if box is not None:
            img = img.crop(box)
        got = (img.size[1], img.size[0])
        if got != expected:
            raise DatasetError(
                f"{path}: image is {got[1]}x{got[0]} but the dataset's images are {expected[1]}x{expected[0]} (the "
                f"first image's size, after resizing); set size (or resize and crop) in the {self.what} parameters"
            )
        return img

    def mask(self, label: np.ndarray) -> np.ndarray:
        size, box = self._plan(label.shape[1], label.shape[0])
        if size is not None:
            label = resize_labels(label, (size[1], size[0]))
        if box is not None:
            label = label[box[1] : box[3], box[0] : box[2]]
        return label


def _header_size(path: Path, root: Path) -> tuple[int, int]:
    """(width, height) from the image's header (the image is decoded, and checked, when it is loaded)."""
    check_inside(path, root)
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None


class _FolderBase(SampleDataset):
    """Every image comes out at the size of the first one (after the geometry): batches need one size."""

    _geo: _Geometry
    _first: Path
    _expected: tuple[int, int] | None = None

    def expected_hw(self) -> tuple[int, int]:
        if self._expected is None:
            self._expected = self._geo.output_hw(*_header_size(self._first, self.root))
        return self._expected


# ------------------------------------------------------------------------------------------------ classification
class ImageFolderDataset(_FolderBase):
    name = "image_folder"
    task = "classification"
    ignore_index = None

    def __init__(self, root: Path, files: list[Path], labels: list[int], names: list[str], geo: _Geometry, mode: str):
        self.root = root
        self.split = ""
        self.class_names = tuple(names)
        self.num_classes = len(names)
        self._files, self._labels, self._geo, self._mode = files, labels, geo, mode
        self._first = files[0]
        self._digest = files_digest(files, root) + array_digest(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self._files)

    def sample_id(self, index: int) -> str:
        return self._files[index].relative_to(self.root).with_suffix("").as_posix()

    def _load(self, index: int) -> Sample:
        path = self._files[index]
        img = self._geo.image(read_image(path, self._mode, root=self.root), path, self.expected_hw())
        return Sample(self.sample_id(index), image_to_tensor(np.array(img)), self._labels[index])  # writable copy

    def _options(self) -> dict[str, Any]:
        return {**self._geo.options(), "mode": self._mode, "classes": list(self.class_names)}


def _read_list(path: Path, root: Path) -> list[tuple[str, Any]]:
    """(path, label) rows of a CSV or JSON list file."""
    check_inside(path, None)
    if not path.is_file():
        raise DatasetError(f"{path}: list file not found")
    if path.stat().st_size > MAX_LIST_BYTES:
        raise DatasetError(f"{path}: list file over {MAX_LIST_BYTES} bytes")
    text = path.read_text(encoding="utf-8", errors="strict")
    rows: list[tuple[str, Any]] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DatasetError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of [path, label] pairs or {{path, label}} objects")
        for i, item in enumerate(data):
            if isinstance(item, dict) and set(item) >= {"path", "label"}:
                rows.append((item["path"], item["label"]))
            elif isinstance(item, list) and len(item) == 2:
                rows.append((item[0], item[1]))
            else:
                raise DatasetError(f"{path}: entry {i}: expected [path, label] or {{path, label}}, got {item!r:.60}")
    else:
        for i, row in enumerate(csv.reader(io.StringIO(text))):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise DatasetError(f"{path}: line {i + 1}: expected 'path,label', got {len(row)} fields")
            if i == 0 and [c.strip().lower() for c in row] == ["path", "label"]:
                continue  # header
            rows.append((row[0].strip(), row[1].strip()))
    return rows


def _label_index(label: Any, names: list[str], where: str) -> int:
    if isinstance(label, bool):
        raise DatasetError(f"{where}: label {label!r} is neither a class name nor an index")
    if isinstance(label, str) and label in names:
        return names.index(label)
    if isinstance(label, int) or (isinstance(label, str) and label.isdigit()):
        k = int(label)
        if not 0 <= k < len(names):
            raise DatasetError(f"{where}: label {k} out of range (expected 0..{len(names) - 1})")
        return k
    raise DatasetError(f"{where}: label {label!r} is not one of the class names {names[:10]}")


# Evaluated: the folder a config names as root (a held-out folder of yours is the validation set for `equi tune`).
ROOT_SPLIT = "the folder given as root"


@DATASETS.register("image_folder", task="classification", modules=_MODULES, test_split=ROOT_SPLIT)
def image_folder(
    root: str,
    list_file: str | None = None,
    class_names: list[str] | None = None,
    size: int | list[int] | None = None,
    resize: int | None = None,
    crop: int | None = None,
    mode: str = "RGB",
) -> ImageFolderDataset:
    """Images under ``root`` in class folders (ImageFolder), or listed with labels in ``list_file`` (CSV/JSON, paths
    relative to ``root``; needs ``class_names``). ``mode``: RGB (3 channels) or L (grey)."""
    base = require_dir(root, "image_folder")
    if mode not in ("RGB", "L"):
        raise DatasetError(f"image_folder: mode must be RGB or L, got {mode!r}")
    geo = _Geometry("image_folder", size, resize, crop)
    if class_names is not None and (not class_names or len(set(class_names)) != len(class_names)):
        raise DatasetError(f"image_folder: class_names must be distinct names, got {class_names!r:.80}")
    files: list[Path] = []
    labels: list[int] = []
    if list_file is not None:
        if class_names is None:
            raise DatasetError("image_folder: a list_file needs class_names (the classes its labels name)")
        names = list(class_names)
        lst = Path(list_file) if Path(list_file).is_absolute() else base / list_file
        for i, (rel, label) in enumerate(_read_list(lst, base)):
            f = check_inside(base / str(rel), base)
            if not f.is_file():
                raise DatasetError(f"{lst}: entry {i + 1}: {f} not found")
            files.append(f)
            labels.append(_label_index(label, names, f"{lst}: entry {i + 1}"))
        where = str(lst)
    else:
        folders = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
        names = list(class_names) if class_names is not None else folders
        if class_names is not None and sorted(class_names) != folders:
            raise DatasetError(
                f"{base}: class folders {folders[:10]} do not match class_names {list(class_names)[:10]}"
            )
        for k, name in enumerate(names):
            for f in _images_in(base / name):
                files.append(check_inside(f, base))
                labels.append(k)
        where = f"{base}/<class>/"
    if not files:
        raise DatasetError(f"{where}: no images ({', '.join(IMAGE_EXTENSIONS)}); expected {base}/<class>/<image>")
    return ImageFolderDataset(base, files, labels, names, geo, mode)


# ------------------------------------------------------------------------------------------------ segmentation
class SegmentationFolderDataset(_FolderBase):
    name = "segmentation_folder"
    task = "segmentation"

    def __init__(self, root: Path, pairs: list[tuple[Path, Path]], names: list[str], ignore: int, geo: _Geometry):
        self.root = root
        self.split = ""
        self.class_names = tuple(names)
        self.num_classes = len(names)
        self.ignore_index = ignore
        self._pairs, self._geo = pairs, geo
        self._first = pairs[0][0]
        self._digest = files_digest([p for pair in pairs for p in pair], root)

    def __len__(self) -> int:
        return len(self._pairs)

    def sample_id(self, index: int) -> str:
        return self._pairs[index][0].stem

    def _load(self, index: int) -> Sample:
        image_path, mask_path = self._pairs[index]
        img = read_image(image_path, "RGB", root=self.root)
        label = read_label_map(mask_path, root=self.root)
        check_same_size(img, label, mask_path)
        check_label_values(label, self.num_classes - 1, mask_path, self.ignore_index)
        img = self._geo.image(img, image_path, self.expected_hw())
        label = self._geo.mask(label)
        image = image_to_tensor(np.array(img))  # a writable copy: torch warns on read-only arrays
        return Sample(self.sample_id(index), image, torch.from_numpy(label.astype(np.int64)))

    def _options(self) -> dict[str, Any]:
        return {**self._geo.options(), "ignore_index": self.ignore_index, "classes": list(self.class_names)}


@DATASETS.register("segmentation_folder", task="segmentation", modules=_MODULES, test_split=ROOT_SPLIT)
def segmentation_folder(
    root: str,
    class_names: list[str] | None = None,
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    images: str = "images",
    masks: str = "masks",
    size: int | list[int] | None = None,
    resize: int | None = None,
    crop: int | None = None,
) -> SegmentationFolderDataset:
    """``root/images/<stem>.<ext>`` with ``root/masks/<stem>.png`` (class-index or palette PNGs); give
    ``class_names`` or ``num_classes``."""
    base = require_dir(root, "segmentation_folder")
    geo = _Geometry("segmentation_folder", size, resize, crop)
    if class_names is not None:
        if not class_names or len(set(class_names)) != len(class_names):
            raise DatasetError(f"segmentation_folder: class_names must be distinct names, got {class_names!r:.80}")
        if num_classes is not None and num_classes != len(class_names):
            raise DatasetError(f"segmentation_folder: num_classes {num_classes} but {len(class_names)} class_names")
        names = list(class_names)
    elif num_classes is not None:
        if isinstance(num_classes, bool) or num_classes < 1:
            raise DatasetError(f"segmentation_folder: num_classes must be >= 1, got {num_classes!r}")
        names = [str(k) for k in range(num_classes)]
    else:
        raise DatasetError("segmentation_folder: give class_names or num_classes (masks hold class indices)")
    if not 0 <= ignore_index <= 255 or ignore_index < len(names):
        raise DatasetError(
            f"segmentation_folder: ignore_index {ignore_index} must lie in {len(names)}..255 (after the class indices)"
        )
    image_dir, mask_dir = base / images, base / masks
    for d, what in ((image_dir, "images"), (mask_dir, "masks")):
        if not d.is_dir():
            raise DatasetError(f"{base}: expected folder {d.name}/ ({what} parameter) with the {what}")
    image_files = _images_in(image_dir)
    if not image_files:
        raise DatasetError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    by_stem: dict[str, Path] = {}
    for f in image_files:
        if f.stem in by_stem:
            raise DatasetError(f"{f}: two images with stem {f.stem!r} ({by_stem[f.stem].name} and {f.name})")
        by_stem[f.stem] = f
    mask_stems = {f.stem: f for f in mask_dir.iterdir() if f.is_file() and f.suffix.lower() == ".png"}
    no_mask = sorted(set(by_stem) - set(mask_stems))
    if no_mask:
        raise DatasetError(
            f"{by_stem[no_mask[0]]}: no mask {mask_dir / (no_mask[0] + '.png')} for it "
            f"({len(no_mask)} image(s) without a mask; images and masks pair by file stem)"
        )
    no_image = sorted(set(mask_stems) - set(by_stem))
    if no_image:
        raise DatasetError(
            f"{mask_stems[no_image[0]]}: no image {no_image[0]}.* in {image_dir} for this mask "
            f"({len(no_image)} mask(s) without an image; images and masks pair by file stem)"
        )
    pairs = [(check_inside(by_stem[s], base), check_inside(mask_stems[s], base)) for s in sorted(by_stem)]
    return SegmentationFolderDataset(base, pairs, names, int(ignore_index), geo)
