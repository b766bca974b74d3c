"""COCO mask AP as a mergeable metric state.

AP is not a sum over images, so the state keeps the evaluation inputs themselves (ground truth and detections in
COCO's JSON form, masks as RLE) and runs ``COCOeval(iouType="segm")`` once in ``compute``. Images, annotations and
detections are kept sorted by image id (detections by descending score within an image, stably), so the state and
its AP are the same for any split of the data and any merge order.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from equicore.errors import InvalidInputError
from equicore.metrics.base import DERIVED, RECORDS, MetricState, batch_input
from equicore.registry import METRICS


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Binary masks ``N x H x W`` -> COCO RLEs with ``counts`` as str (JSON-able)."""
    from pycocotools import mask as mask_utils

    if masks.shape[0] == 0:
        return []
    arr = np.asfortranarray(masks.detach().cpu().to(torch.uint8).permute(1, 2, 0).numpy())
    out = []
    for r in mask_utils.encode(arr):
        out.append({"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")})
    return out


def _as_masks(masks: Any, what: str, threshold: float) -> torch.Tensor:
    m = torch.as_tensor(masks)
    if m.ndim == 4 and m.shape[1] == 1:  # torchvision's raw N x 1 x H x W
        m = m[:, 0]
    if m.ndim != 3:
        raise InvalidInputError(f"{what}: expected masks N x H x W, got {tuple(m.shape)}")
    if m.is_floating_point():
        m = m > threshold
    return m.to(torch.uint8)


def _image_id(target: Mapping[str, Any], what: str) -> int:
    if "image_id" not in target or target["image_id"] is None:
        raise InvalidInputError(f"{what}: needs an 'image_id' (COCO matches detections to images by id)")
    v = target["image_id"]
    return int(v.item() if isinstance(v, torch.Tensor) else v)


@METRICS.register("mask_ap", tasks=("instance",), modules=("equicore.metrics.base",))
class MaskAPState(MetricState):
    """COCO mask AP / AP50 / AP75 (fractions in [0, 1]) over every image seen.

    ``update`` reads ``preds`` (one dict per image: ``masks`` uint8 N x H x W, or N x 1 x H x W probabilities
    thresholded at ``mask_threshold``; ``scores``; ``labels``) and ``labels`` (one target dict per image:
    ``masks``, ``labels``, ``image_id``). Image ids must be unique across everything merged.
    """

    name = "mask_ap"
    inputs = ("preds", "labels")
    config_fields = ("mask_threshold",)
    fields = {"images": RECORDS, "annotations": RECORDS, "detections": RECORDS, "n": DERIVED}

    def __init__(
        self,
        mask_threshold: float = 0.5,
        images: Sequence[Mapping[str, Any]] | None = None,
        annotations: Sequence[Mapping[str, Any]] | None = None,
        detections: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        if not 0.0 <= float(mask_threshold) <= 1.0:
            raise InvalidInputError(f"{self.name}.mask_threshold: expected a value in [0, 1], got {mask_threshold!r}")
        self.mask_threshold = float(mask_threshold)
        # Deep copies: a state never shares mutable lists with another state or a caller's dict.
        self.images: list[dict[str, Any]] = copy.deepcopy([dict(i) for i in images or []])
        self.annotations: list[dict[str, Any]] = copy.deepcopy([dict(a) for a in annotations or []])
        self.detections: list[dict[str, Any]] = copy.deepcopy([dict(d) for d in detections or []])
        self._ids = {int(i["id"]) for i in self.images}
        if len(self._ids) != len(self.images):
            raise InvalidInputError(f"{self.name}: duplicate image ids in the state")
        self._canonicalize()

    def _canonicalize(self) -> None:
        """Sort by image id (detections by descending score within an image). The sorts are stable and one image's
        entries all come from one ``update``, so the state (and ``to_dict``) is the same for any split of the data
        and any update or merge order."""
        self.images.sort(key=lambda im: im["id"])
        self.annotations.sort(key=lambda a: a["image_id"])
        self.detections.sort(key=lambda d: (d["image_id"], -d["score"]))

    @property
    def n(self) -> int:
        return len(self.images)

    def update(self, batch: Mapping[str, Any]) -> None:
        preds, labels = batch_input(batch, "preds", self.name), batch_input(batch, "labels", self.name)
        if isinstance(preds, (torch.Tensor, Mapping)) or isinstance(labels, (torch.Tensor, Mapping)):
            raise InvalidInputError(f"{self.name}: preds and labels must be lists of per-image dicts")
        if len(preds) != len(labels):
            raise InvalidInputError(f"{self.name}: {len(preds)} predictions but {len(labels)} targets")
        images, anns, dets = [], [], []
        seen = set(self._ids)
        for i, (p, t) in enumerate(zip(preds, labels, strict=True)):
            image_id = _image_id(t, f"{self.name}: labels[{i}]")
            if image_id in seen:
                raise InvalidInputError(f"{self.name}: image_id {image_id} seen twice (ids must be unique)")
            seen.add(image_id)
            gt_masks = _as_masks(t["masks"], f"{self.name}: labels[{i}]", 0.5)
            gt_labels = torch.as_tensor(t["labels"]).reshape(-1).tolist()
            if len(gt_labels) != gt_masks.shape[0]:
                n_masks = gt_masks.shape[0]
                raise InvalidInputError(f"{self.name}: labels[{i}] has {len(gt_labels)} labels but {n_masks} masks")
            h, w = int(gt_masks.shape[-2]), int(gt_masks.shape[-1])
            images.append({"id": image_id, "height": h, "width": w})
            anns += self._annotations(image_id, gt_masks, gt_labels)
            dets += self._detections(image_id, p, (h, w), i)
        self.images += images
        self.annotations += anns
        self.detections += dets
        self._ids = seen
        self._canonicalize()

    @staticmethod
    def _annotations(image_id: int, masks: torch.Tensor, labels: list[int]) -> list[dict[str, Any]]:
        from pycocotools import mask as mask_utils

        out = []
        for rle, lab in zip(encode_masks(masks), labels, strict=True):
            out.append(
                {
                    "image_id": image_id,
                    "category_id": int(lab),
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
        return out

    def _detections(self, image_id: int, p: Mapping[str, Any], hw: tuple[int, int], i: int) -> list[dict[str, Any]]:
        what = f"{self.name}: preds[{i}]"
        if not isinstance(p, Mapping) or any(k not in p for k in ("masks", "scores", "labels")):
            raise InvalidInputError(f"{what}: expected a dict with masks, scores and labels")
        masks = _as_masks(p["masks"], what, self.mask_threshold)
        scores = torch.as_tensor(p["scores"]).detach().reshape(-1).double().tolist()
        labels = torch.as_tensor(p["labels"]).reshape(-1).tolist()
        if not len(scores) == len(labels) == masks.shape[0]:
            raise InvalidInputError(f"{what}: {masks.shape[0]} masks, {len(scores)} scores, {len(labels)} labels")
        if masks.shape[0] and tuple(masks.shape[-2:]) != hw:
            raise InvalidInputError(f"{what}: masks are {tuple(masks.shape[-2:])}, the image is {hw}")
        if not all(math.isfinite(s) for s in scores):
            raise InvalidInputError(f"{what}: scores contain NaN or Inf")
        return [
            {"image_id": image_id, "category_id": int(lab), "segmentation": rle, "score": float(s)}
            for rle, s, lab in zip(encode_masks(masks), scores, labels, strict=True)
        ]

    def _check_mergeable(self, other: MetricState) -> None:
        assert isinstance(other, MaskAPState)
        clash = self._ids & other._ids
        if clash:
            raise InvalidInputError(f"{self.name}: cannot merge states that share image ids {sorted(clash)[:10]}")

    def coco_inputs(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(ground-truth COCO dataset dict, detection list) in canonical order, as fresh copies."""
        images, anns, dets = self.images, self.annotations, self.detections
        cat_ids = sorted({a["category_id"] for a in anns} | {d["category_id"] for d in dets})
        gt_anns = []
        for k, a in enumerate(anns, start=1):
            seg = a["segmentation"]
            gt_anns.append({**a, "id": k, "segmentation": {"size": list(seg["size"]), "counts": seg["counts"]}})
        dataset = {
            "images": copy.deepcopy(images),
            "annotations": gt_anns,
            "categories": [{"id": c, "name": str(c)} for c in cat_ids],
        }
        return dataset, copy.deepcopy(dets)

    def compute(self) -> dict[str, float]:
        nan = float("nan")
        if not self.images or not self.annotations:
            # No image, or no ground-truth instance anywhere: AP is undefined (COCOeval reports -1).
            return {"mask_ap": nan, "mask_ap50": nan, "mask_ap75": nan}
        if not self.detections:
            # pycocotools' loadRes fails on an empty list; with ground truth and no detection every AP is 0.
            return {"mask_ap": 0.0, "mask_ap50": 0.0, "mask_ap75": 0.0}
        stats = coco_mask_stats(*self.coco_inputs())
        return {"mask_ap": stats[0], "mask_ap50": stats[1], "mask_ap75": stats[2]}


def coco_mask_stats(dataset: dict[str, Any], detections: list[dict[str, Any]]) -> list[float]:
    """The 12 ``COCOeval(iouType="segm")`` stats of ``detections`` against ``dataset`` (ground truth), with -1
    (undefined) mapped to NaN. ``detections`` must be non-empty; both are copied (``loadRes`` mutates its input;
    pycocotools' RLE routines take ``counts`` as str or bytes)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict, dets = copy.deepcopy(dataset), copy.deepcopy(detections)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) if v >= 0 else float("nan") for v in ev.stats]
