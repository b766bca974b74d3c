"""Mask AP of any multiset of images without re-running COCO's matching: what bootstrap intervals over images and
per-image worst cases need.

COCO's matching (``COCOeval.evaluate``) is per image and category; only the accumulation over images (sorting all
detections by score, then precision over recall) couples them. :class:`ImageMatches` runs the matching once per
draw, and :func:`mask_ap` accumulates the picked images exactly as ``COCOeval.accumulate`` and ``summarize`` do for
the AP over IoU 0.50:0.95 (area "all", 100 detections): an image picked twice counts as two images.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from equicore.metrics.coco import MaskAPState


class ImageMatches:
    """COCO's per-image matching of one ``MaskAPState`` (images in its canonical, image-id order)."""

    def __init__(self, state: MaskAPState) -> None:
        self.image_ids = [int(im["id"]) for im in state.images]
        self.has_gt = {int(a["image_id"]) for a in state.annotations}
        # category id -> one evaluateImg record (or None) per image, for area "all" and the largest maxDet.
        self.records: dict[int, list[dict[str, Any] | None]] = {}
        self.iou_thresholds = np.linspace(0.5, 0.95, 10)
        self.recall_thresholds = np.linspace(0.0, 1.0, 101)
        self.max_det = 100
        if not state.images or not state.annotations or not state.detections:
            return  # AP is NaN (no ground truth) or 0 (no detection): see mask_ap
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        dataset, dets = state.coco_inputs()
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = copy.deepcopy(dataset)
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), iouType="segm")
            ev.evaluate()
        p = ev.params
        self.iou_thresholds, self.recall_thresholds, self.max_det = p.iouThrs, p.recThrs, p.maxDets[-1]
        n_img, n_area = len(p.imgIds), len(p.areaRng)
        position = {image_id: i for i, image_id in enumerate(p.imgIds)}
        order = [position[i] for i in self.image_ids]
        for k, cat in enumerate(p.catIds):
            base = k * n_area * n_img  # area index 0 is "all"
            self.records[int(cat)] = [ev.evalImgs[base + i] for i in order]


def mask_ap(picks: Sequence[tuple[ImageMatches, int]]) -> float:
    """AP over IoU 0.50:0.95 of the picked ``(matches, image position)`` pairs, as COCOeval would report it for
    those images (NaN when none has a ground-truth instance; 0 when there are instances and no detection)."""
    if not any(m.image_ids[i] in m.has_gt for m, i in picks):
        return math.nan
    if not any(m.records for m, _ in picks):
        return 0.0
    first = next(m for m, _ in picks if m.records)
    thresholds, rec_thrs, max_det = first.iou_thresholds, first.recall_thresholds, first.max_det
    categories = sorted({c for m, _ in picks for c in m.records})
    precisions = []
    for cat in categories:
        records = [r for m, i in picks if (r := m.records.get(cat, [None] * len(m.image_ids))[i]) is not None]
        if not records:
            continue
        gt_ignore = np.concatenate([r["gtIgnore"] for r in records])
        n_gt = int(np.count_nonzero(gt_ignore == 0))
        if n_gt == 0:
            continue
        scores = np.concatenate([r["dtScores"][:max_det] for r in records])
        order = np.argsort(-scores, kind="mergesort")
        matched = np.concatenate([r["dtMatches"][:, :max_det] for r in records], axis=1)[:, order]
        ignored = np.concatenate([r["dtIgnore"][:, :max_det] for r in records], axis=1)[:, order]
        tp_sum = np.cumsum(np.logical_and(matched, ~ignored), axis=1).astype(float)
        fp_sum = np.cumsum(np.logical_and(~matched.astype(bool), ~ignored), axis=1).astype(float)
        for t in range(len(thresholds)):
            tp, fp = tp_sum[t], fp_sum[t]
            recall = tp / n_gt
            precision = (tp / (fp + tp + np.spacing(1))).tolist()
            for i in range(len(precision) - 1, 0, -1):  # precision envelope, as COCOeval.accumulate
                if precision[i] > precision[i - 1]:
                    precision[i - 1] = precision[i]
            q = np.zeros(len(rec_thrs))
            found = np.searchsorted(recall, rec_thrs, side="left")
            for ri, pi in enumerate(found):
                if pi >= len(precision):
                    break
                q[ri] = precision[pi]
            precisions.append(q)
    return float(np.mean(precisions)) if precisions else math.nan
