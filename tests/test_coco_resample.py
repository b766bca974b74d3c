"""Mask AP of image multisets from one COCO matching equals COCOeval run on those images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from equicore.metrics.coco_resample import ImageMatches, mask_ap
from tests.test_instance import coco_direct, fed, metric_dataset


def renumbered(targets: list[dict], preds: list[dict], positions: list[int]) -> tuple[list[dict], list[dict]]:
    """The picked images as new, distinct images (ids 1..k), as a resample means them."""
    ts = [{**targets[i], "image_id": k + 1} for k, i in enumerate(positions)]
    return ts, [preds[i] for i in positions]


def test_all_images_give_cocoevals_ap() -> None:
    targets, preds = metric_dataset()
    state = fed(targets, preds, list(range(len(targets))))
    matches = ImageMatches(state)
    order = np.argsort([t["image_id"] for t in targets])  # the state's canonical order
    assert mask_ap([(matches, i) for i in range(len(targets))]) == pytest.approx(state.compute()["mask_ap"], abs=1e-12)
    assert matches.image_ids == [targets[i]["image_id"] for i in order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_resample_with_repeats_equals_cocoeval_on_the_repeated_images(seed: int) -> None:
    targets, preds = metric_dataset()
    n = len(targets)
    state = fed(targets, preds, list(range(n)))
    matches = ImageMatches(state)
    by_id = {t["image_id"]: k for k, t in enumerate(targets)}
    positions = np.random.default_rng(seed).integers(0, n, size=n).tolist()
    originals = [by_id[matches.image_ids[p]] for p in positions]
    expected = coco_direct(*renumbered(targets, preds, originals))[0]
    assert mask_ap([(matches, p) for p in positions]) == pytest.approx(expected, abs=1e-12)


def test_no_ground_truth_is_nan_and_no_detection_is_zero() -> None:
    targets, preds = metric_dataset()
    empty_preds = [{**p, "masks": p["masks"][:0], "scores": p["scores"][:0], "labels": p["labels"][:0]} for p in preds]
    n = len(targets)
    state = fed(targets, empty_preds, list(range(n)))
    assert mask_ap([(ImageMatches(state), i) for i in range(n)]) == 0.0
    no_gt = [{**t, "masks": t["masks"][:0], "labels": t["labels"][:0]} for t in targets]
    no_gt_matches = ImageMatches(fed(no_gt, preds, list(range(n))))
    assert math.isnan(mask_ap([(no_gt_matches, i) for i in range(n)]))
