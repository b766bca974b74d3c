"""COCO-format annotations (``annotations/instances_<split>.json`` + ``<split>/`` images) as semantic masks
(``coco``) or instance targets (``coco_instances``), resized to 400 x 400 like the paper.

Class mapping: by default every category of the JSON in increasing id order becomes class 1..C (0 = background;
a category literally named "background"/"_background_" is skipped, since class 0 already is background). The
``categories`` option (a list of names) restricts and orders the classes; annotations of other categories are
then treated as background.

Masks come from pycocotools exactly like ``COCO.annToMask`` (polygons merged, RLE compressed or not), at the
image's size, then are resized by nearest neighbour. Semantic masks: crowd regions are painted 255 (ignore) first,
then the non-crowd annotations in file order, a later annotation overwriting an earlier one where they overlap.
Instance targets skip crowd annotations (as COCO evaluation treats them) unless ``include_crowd``; an instance whose
resized mask is empty is dropped; boxes are recomputed from the resized masks.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equicore.datasets.base import (
    IGNORE_INDEX,
    Sample,
    SampleDataset,
    array_digest,
    as_hw,
    files_digest,
    image_to_tensor,
    masks_to_boxes,
    read_image,
    require_dir,
    resize_image,
    resize_labels,
)
from equicore.errors import DatasetError
from equicore.registry import DATASETS

# Where this dataset's loading code lives besides this module (for its code identity).
_MODULES = ("equicore.datasets.base",)

BACKGROUND_NAMES = {"background", "_background_", "__background__"}


def decode_segmentation(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """``H x W`` uint8 mask of one annotation's ``segmentation`` (the same steps as ``COCO.annToRLE``)."""
    from pycocotools import mask as mask_utils  # lazy: only COCO users need it

    try:
        if isinstance(segmentation, list):
            polys = [p for p in segmentation if len(p) >= 6]  # fewer than 3 points encloses no area
            if not polys:
                return np.zeros((height, width), dtype=np.uint8)
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            rle = segmentation
        else:
            raise TypeError(f"unsupported segmentation of type {type(segmentation).__name__}")
        with warnings.catch_warnings():
            # pycocotools' C decoder trips numpy 2's __array__(copy=) deprecation; harmless, and not ours.
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            mask = mask_utils.decode(rle)
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise DatasetError(f"{where}: cannot decode segmentation ({type(exc).__name__}: {exc})") from None
    if mask.shape != (height, width):
        raise DatasetError(f"{where}: decoded mask is {mask.shape}, expected ({height}, {width})")
    return mask.astype(np.uint8)


class CocoIndex:
    """The parsed annotation file: images in id order, annotations per image, category -> class mapping."""

    def __init__(self, ann_file: Path, categories: Sequence[str] | None) -> None:
        if not ann_file.is_file():
            raise DatasetError(f"{ann_file}: COCO annotation file not found")
        try:
            data = json.loads(ann_file.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{ann_file}: cannot parse JSON ({type(exc).__name__}: {exc})") from None
        if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
            raise DatasetError(f"{ann_file}: expected a COCO JSON object with images, annotations and categories")
        self.path = ann_file
        json_cats = sorted(((int(c["id"]), str(c["name"])) for c in data["categories"]), key=lambda c: c[0])
        by_name = {name: cid for cid, name in json_cats}
        if categories is None:
            chosen = [(cid, name) for cid, name in json_cats if name.lower() not in BACKGROUND_NAMES]
        else:
            unknown = [n for n in categories if n not in by_name]
            if unknown:
                raise DatasetError(f"{ann_file}: unknown categor(y/ies) {unknown} (known: {sorted(by_name)})")
            chosen = [(by_name[n], n) for n in categories]
        if not chosen:
            raise DatasetError(f"{ann_file}: no categories to map to classes")
        self.class_names = ("background", *(name for _, name in chosen))
        self.cat_to_class = {cid: k + 1 for k, (cid, _) in enumerate(chosen)}
        self.mapping = [(cid, name) for cid, name in chosen]
        known_cats = {cid for cid, _ in json_cats}
        self.images = sorted(data["images"], key=lambda im: int(im["id"]))
        image_ids = {int(im["id"]) for im in self.images}
        self.anns: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ann in data["annotations"]:
            cid = int(ann["category_id"])
            if cid not in known_cats:
                raise DatasetError(
                    f"{ann_file}: annotation {ann.get('id')}: category_id {cid} out of range "
                    f"(not among the file's categories {sorted(known_cats)})"
                )
            if int(ann["image_id"]) not in image_ids:
                raise DatasetError(f"{ann_file}: annotation {ann.get('id')}: unknown image_id {ann['image_id']}")
            self.anns[int(ann["image_id"])].append(ann)


class CocoDataset(SampleDataset):
    """COCO images with semantic (``task="segmentation"``) or instance (``task="instance"``) targets."""

    def __init__(
        self,
        index: CocoIndex,
        image_dir: Path,
        split: str,
        task: str,
        hw: tuple[int, int],
        include_crowd: bool,
    ) -> None:
        self.index = index
        self.image_dir = image_dir
        self.split = split
        self.task = task
        self.name = "coco" if task == "segmentation" else "coco_instances"
        self.class_names = index.class_names
        # Instance datasets count the background too (torchvision Mask R-CNN convention): labels are 1..C.
        self.num_classes = len(index.class_names)
        self.ignore_index = IGNORE_INDEX if task == "segmentation" else None
        self._hw = hw
        self._include_crowd = include_crowd
        self._digest = (
            files_digest([index.path])
            + ":"
            + files_digest([image_dir / im["file_name"] for im in index.images], image_dir)
        )

    def __len__(self) -> int:
        return len(self.index.images)

    def sample_id(self, index: int) -> str:
        return f"{self.split}/{int(self.index.images[index]['id'])}"

    def _load(self, index: int) -> Sample:
        info = self.index.images[index]
        path = self.image_dir / info["file_name"]
        # file_name comes from the annotation file: "../../x" or a symlink must not read outside the image folder.
        img = read_image(path, "RGB", root=self.image_dir)
        h, w = int(info["height"]), int(info["width"])
        if img.size != (w, h):
            raise DatasetError(f"{path}: image is {img.size[0]}x{img.size[1]}, annotations say {w}x{h}")
        anns = self.index.anns.get(int(info["id"]), [])
        image = image_to_tensor(resize_image(img, self._hw))
        if self.task == "segmentation":
            target: Any = torch.from_numpy(self._semantic(anns, h, w))
        else:
            target = self._instances(anns, h, w, int(info["id"]))
        return Sample(self.sample_id(index), image, target)

    def _where(self, ann: dict[str, Any]) -> str:
        return f"{self.index.path} annotation {ann.get('id')}"

    def _semantic(self, anns: list[dict[str, Any]], h: int, w: int) -> np.ndarray:
        label = np.zeros((h, w), dtype=np.int64)
        crowd = [a for a in anns if a.get("iscrowd", 0) and int(a["category_id"]) in self.index.cat_to_class]
        for ann in crowd:
            label[decode_segmentation(ann["segmentation"], h, w, self._where(ann)) > 0] = IGNORE_INDEX
        for ann in anns:
            cls = self.index.cat_to_class.get(int(ann["category_id"]))
            if cls is None or ann.get("iscrowd", 0):
                continue
            label[decode_segmentation(ann["segmentation"], h, w, self._where(ann)) > 0] = cls
        return resize_labels(label, self._hw)

    def _instances(self, anns: list[dict[str, Any]], h: int, w: int, image_id: int) -> dict[str, Any]:
        masks, labels = [], []
        for ann in anns:
            cls = self.index.cat_to_class.get(int(ann["category_id"]))
            if cls is None or (ann.get("iscrowd", 0) and not self._include_crowd):
                continue
            mask = resize_labels(decode_segmentation(ann["segmentation"], h, w, self._where(ann)), self._hw)
            if mask.any():
                masks.append(mask.astype(np.uint8))
                labels.append(cls)
        hh, ww = self._hw
        m = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, hh, ww), dtype=torch.uint8)
        return {
            "boxes": masks_to_boxes(m),
            "labels": torch.tensor(labels, dtype=torch.long),
            "masks": m,
            "image_id": image_id,
        }

    def _options(self) -> dict[str, Any]:
        mapping = array_digest(np.asarray(self.index.mapping, dtype=str))
        return {"size": list(self._hw), "include_crowd": self._include_crowd, "classes": mapping}


def _open(
    root: str,
    split: str,
    annotation_file: str | None,
    image_dir: str | None,
    categories: Sequence[str] | None,
) -> tuple[CocoIndex, Path]:
    base = require_dir(root, "COCO")
    ann = Path(annotation_file) if annotation_file else base / "annotations" / f"instances_{split}.json"
    imgs = Path(image_dir) if image_dir else base / split
    if not ann.is_file() or not imgs.is_dir():
        raise DatasetError(
            f"{base}: expected annotations/instances_{split}.json and {split}/ (images) "
            f"(missing: {', '.join(str(p) for p, ok in ((ann, ann.is_file()), (imgs, imgs.is_dir())) if not ok)})"
        )
    return CocoIndex(ann, categories), imgs


@DATASETS.register("coco", task="segmentation", modules=_MODULES, test_split="val2017")
def coco(
    root: str,
    split: str = "val2017",
    annotation_file: str | None = None,
    image_dir: str | None = None,
    categories: Sequence[str] | None = None,
    size: int | tuple[int, int] = 400,
) -> CocoDataset:
    """COCO semantic masks (0 = background, 1..C, 255 = crowd/ignore), 3 x 400 x 400.

    ``annotation_file`` / ``image_dir`` override ``root/annotations/instances_<split>.json`` / ``root/<split>/``
    (image paths are ``image_dir / file_name``); ``categories`` restricts and orders the classes.
    """
    index, imgs = _open(root, split, annotation_file, image_dir, categories)
    return CocoDataset(index, imgs, split, "segmentation", as_hw(size, "coco"), include_crowd=False)


@DATASETS.register("coco_instances", task="instance", modules=_MODULES, test_split="val2017")
def coco_instances(
    root: str,
    split: str = "val2017",
    annotation_file: str | None = None,
    image_dir: str | None = None,
    categories: Sequence[str] | None = None,
    size: int | tuple[int, int] = 400,
    include_crowd: bool = False,
) -> CocoDataset:
    """COCO instance targets (boxes xyxy from masks, labels 1..C, masks, image_id), images 3 x 400 x 400."""
    index, imgs = _open(root, split, annotation_file, image_dir, categories)
    return CocoDataset(index, imgs, split, "instance", as_hw(size, "coco_instances"), include_crowd=include_crowd)
