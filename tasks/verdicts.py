"""Verdicts built from the per-sample rows of finished shards (no attack is re-run for any of them):

* a 95% bootstrap interval over images for every main cell (``ci_low``/``ci_high``);
* the mean over a randomised defense's evaluation draws, and its all-draws worst (``<metric>_all_draws``: an image
  counts only if it is correct under every draw);
* the per-image worst case over the run's attacks (attack ``worst``): AutoAttack's robust flags for classification
  (robust only if correct under every attack, including clean, and every draw); for segmentation each image keeps
  one attack and draw, chosen as in SEA (its lowest image mIoU) and then refined image by image to lower the dataset
  mIoU, rebuilt from those images' pixel counts (:func:`worst_assignment`);
* the paired difference to vanilla on the same images (``delta``, ``delta_ci_low``, ``delta_ci_high``);
* the Square check: a defense on which the score-based Square attack does better than every gradient attack has
  gradients that mislead, and is flagged ``gradient masking suspected``.

Images are put in canonical order (sorted by sample id) before resampling, so any sharding gives the same
intervals. Mask AP is recomputed with COCOeval per resample (200 resamples: it is the slow one), its worst case is
per image by single-image AP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from equicore.metrics.bootstrap import (
    Interval,
    accuracy_stat,
    bootstrap_interval,
    canonical_order,
    mean_stat,
    miou_stat,
    paired_delta_interval,
    percentile_interval,
    resample_indices,
    weighted_stat,
)
from equicore.metrics.coco_resample import ImageMatches, mask_ap

N_RESAMPLES = 1000
SCORE_COLUMNS = ("equivariance_before", "equivariance_after")  # per-image means with an interval too
N_RESAMPLES_INSTANCE = 200  # mask AP runs COCOeval per resample
LEVEL = 0.95
WORST = "worst"  # attack name of the per-image worst-case rows
SQUARE_MASKING = (
    "gradient masking suspected: the score-based Square attack found more adversarial examples than every gradient "
    "attack"
)


@dataclass
class UnitSamples:
    """One (attack, defense) unit's per-image data in canonical order; ``[n, draws]`` arrays."""

    ids: np.ndarray
    correct: np.ndarray | None  # classification: 1.0 where the draw's prediction is right
    image_miou: np.ndarray | None  # segmentation
    counts: np.ndarray | None  # segmentation: [n, draws, 3, C] true-positive, predicted, ground-truth pixels
    instances: list[Picks] | None = None  # instance segmentation: per draw, what image i is
    scores: dict[str, np.ndarray] | None = None  # per-image real-valued columns (equivariance before / after)
    target_counts: np.ndarray | None = None  # targeted segmentation: counts against the attack's target map


def unit_samples(rows: Sequence[Mapping[str, Any]], task: str) -> UnitSamples:
    """A unit's per-image data from its shards' per-sample rows (any order: they are put in canonical order)."""
    order = canonical_order([r["sample_id"] for r in rows])
    rows = [rows[i] for i in order]
    ids = np.array([r["sample_id"] for r in rows])

    def per_draw(column: str, single: str) -> np.ndarray:
        # Shards written before evaluation draws existed hold one draw, in the single-value column.
        return np.array([r.get(column) or [r[single]] for r in rows], dtype=float)

    scores = {c: np.array([r.get(c, math.nan) for r in rows], dtype=float) for c in SCORE_COLUMNS}
    if task == "classification":
        return UnitSamples(ids, per_draw("draw_correct", "correct"), None, None, scores=scores)
    if task == "segmentation" and rows[0].get("draw_class_counts"):
        counts = np.array([r["draw_class_counts"] for r in rows], dtype=float)
        # Shards written before the target counts existed have none: their mIoU to target gets no interval.
        has_target = all(r.get("draw_target_class_counts") for r in rows)
        target = np.array([r["draw_target_class_counts"] for r in rows], dtype=float) if has_target else None
        return UnitSamples(
            ids, None, per_draw("draw_image_miou", "image_miou"), counts, scores=scores, target_counts=target
        )
    return UnitSamples(ids, None, None, None, scores=scores)


@weighted_stat
def miou_over_draws(counts: np.ndarray, *, weights: np.ndarray | None = None):
    """Mean over evaluation draws of the dataset mIoU; ``counts`` is ``[n, draws, 3, C]``."""
    values = [miou_stat(*(counts[:, r, k] for k in range(3)), weights=weights) for r in range(counts.shape[1])]
    mean = np.mean(values, axis=0)
    return mean if weights is not None else float(mean)


def worst_draw_counts(s: UnitSamples) -> np.ndarray:
    """Per image, the pixel counts of its worst draw (lowest image mIoU) as a one-draw ``[n, 1, 3, C]`` array."""
    assert s.counts is not None and s.image_miou is not None
    pick = np.nanargmin(np.where(np.isnan(s.image_miou), np.inf, s.image_miou), axis=1)
    return s.counts[np.arange(len(pick)), pick][:, None]


Picks = list[tuple[ImageMatches, int]]  # image i of a unit -> (one draw's COCO matching, that image's position)


def instance_samples(merged_draws: Sequence[Any], rows: UnitSamples | None = None) -> UnitSamples:
    """Per draw, COCO's matching of every image, run once (mask AP of any resample is accumulated from it); the
    per-image score columns come from the unit's rows."""
    matches = [ImageMatches(st) for st in merged_draws]
    ids = np.array(matches[0].image_ids)
    scores = rows.scores if rows is not None else None
    return UnitSamples(ids, None, None, None, [[(m, i) for i in range(len(ids))] for m in matches], scores)


def _instance_values(s: UnitSamples, resamples: np.ndarray) -> np.ndarray:
    draws = s.instances or []
    return np.array([np.nanmean([mask_ap([d[int(i)] for i in idx]) for d in draws]) for idx in resamples])


def instance_interval(s: UnitSamples, seed: int, base: UnitSamples | None = None) -> Interval | None:
    """Mask AP (mean over draws) with its bootstrap interval over images, or with ``base`` the paired difference
    ``s - base``; COCOeval runs once per resample, so fewer resamples (:data:`N_RESAMPLES_INSTANCE`)."""
    if not s.instances or (base is not None and (not base.instances or not np.array_equal(base.ids, s.ids))):
        return None
    n = len(s.ids)
    every = np.arange(n)[None]
    resamples = resample_indices(n, N_RESAMPLES_INSTANCE, seed) if n else np.zeros((0, 0), dtype=int)
    value, values = _instance_values(s, every)[0], _instance_values(s, resamples)
    if base is not None:
        value, values = value - _instance_values(base, every)[0], values - _instance_values(base, resamples)
    if n == 0:
        return Interval(float(value), math.nan, math.nan, 0, 0, LEVEL)
    return percentile_interval(float(value), values, n, N_RESAMPLES_INSTANCE, LEVEL)


def instance_worst(units: Sequence[UnitSamples]) -> UnitSamples | None:
    """Per image the (attack, draw) with the lowest single-image mask AP; if every image taking one same attack and
    draw gives a lower dataset AP, that assignment instead (so the worst is never above a single attack's)."""
    if not units or any(not u.instances or not np.array_equal(u.ids, units[0].ids) for u in units):
        return None
    candidates = [d for u in units for d in u.instances or []]
    n = len(units[0].ids)

    def image_ap(d: Picks, i: int) -> float:
        v = mask_ap([d[i]])
        return math.inf if math.isnan(v) else v

    per_image = [min(candidates, key=lambda d, i=i: image_ap(d, i))[i] for i in range(n)]
    assignments = [per_image] + [list(d) for d in candidates]
    best = min(assignments, key=lambda a: np.nan_to_num(mask_ap(a), nan=np.inf))
    return UnitSamples(units[0].ids, None, None, None, [best])


def statistic(metric: str, s: UnitSamples) -> tuple[Any, tuple[np.ndarray, ...]] | None:
    """(stat, data) whose bootstrap gives the cell's interval, or None where the metric has none."""
    if metric == "accuracy" and s.correct is not None:
        return mean_stat, (s.correct.mean(axis=1),)
    if metric == "accuracy_all_draws" and s.correct is not None:
        return accuracy_stat, (s.correct.min(axis=1),)
    if metric == "miou" and s.counts is not None:
        return miou_over_draws, (s.counts,)
    if metric == "miou_all_draws" and s.counts is not None:
        return miou_over_draws, (worst_draw_counts(s),)
    if metric == "miou_to_target" and s.target_counts is not None:
        return miou_over_draws, (s.target_counts,)
    if metric in SCORE_COLUMNS and s.scores is not None and not np.isnan(s.scores[metric]).any():
        return mean_stat, (s.scores[metric],)
    return None


def interval(metric: str, s: UnitSamples, seed: int) -> Interval | None:
    if metric == "mask_ap":
        return instance_interval(s, seed)
    found = statistic(metric, s)
    if found is None:
        return None
    stat, data = found
    return bootstrap_interval(stat, data, n_resamples=N_RESAMPLES, level=LEVEL, seed=seed)


def delta_interval(metric: str, vanilla: UnitSamples, other: UnitSamples, seed: int) -> Interval | None:
    """Paired: the same resampled images for both (they must be the same images)."""
    if not np.array_equal(vanilla.ids, other.ids):
        return None
    if metric == "mask_ap":
        return instance_interval(other, seed, base=vanilla)
    a, b = statistic(metric, vanilla), statistic(metric, other)
    if a is None or b is None or a[0] is not b[0]:
        return None
    # Paired resampling needs one stat over aligned data of the same form.
    return paired_delta_interval(a[0], a[1], b[1], n_resamples=N_RESAMPLES, level=LEVEL, seed=seed)


def _dataset_miou(totals: np.ndarray) -> float:
    """mIoU of summed ``[3, C]`` counts (true positive, predicted, ground truth)."""
    return miou_stat(*(t[None] for t in totals))


def worst_assignment(counts: np.ndarray, image_miou: np.ndarray, passes: int = 3) -> np.ndarray:
    """For ``counts`` ``[n, K, 3, C]`` (K candidate outcomes per image: each attack under each draw), one candidate
    per image whose pixel counts give the lowest dataset mIoU found.

    It starts from the better of SEA's per-image choice (each image's lowest image mIoU) and the best single
    candidate for every image, then moves one image at a time to the candidate that lowers the dataset mIoU most,
    so the result is never above any single attack's (a dataset mIoU is not monotone in per-image mIoUs, so SEA's
    choice alone can be)."""
    n, k = counts.shape[:2]
    rows = np.arange(n)
    starts = [np.argmin(np.where(np.isnan(image_miou), np.inf, image_miou), axis=1)]
    starts += [np.full(n, j) for j in range(k)]
    pick = min(starts, key=lambda p: _dataset_miou(counts[rows, p].sum(axis=0)))
    totals = counts[rows, pick].sum(axis=0)
    best = _dataset_miou(totals)
    for _ in range(passes):
        moved = False
        for i in range(n):
            base = totals - counts[i, pick[i]]
            values = [_dataset_miou(base + counts[i, j]) for j in range(k)]
            j = int(np.nanargmin(values)) if not all(math.isnan(v) for v in values) else pick[i]
            if values[j] < best - 1e-15:
                totals, best, pick[i], moved = base + counts[i, j], values[j], j, True
        if not moved:
            break
    return pick


def per_image_worst(units: Sequence[UnitSamples]) -> UnitSamples | None:
    """The per-image worst over attacks (and evaluation draws), as one-draw samples of the same images."""
    if not units or any(not np.array_equal(u.ids, units[0].ids) for u in units):
        return None
    first = units[0]
    if first.correct is not None:
        robust = np.stack([u.correct.min(axis=1) for u in units]).min(axis=0)  # type: ignore[union-attr]
        return UnitSamples(first.ids, robust[:, None], None, None)
    if first.instances is not None:
        return instance_worst(units)
    if first.counts is not None:
        miou = np.concatenate([u.image_miou for u in units], axis=1)  # type: ignore[arg-type]
        counts = np.concatenate([u.counts for u in units], axis=1)  # type: ignore[arg-type]
        pick = worst_assignment(counts, miou)
        rows = np.arange(len(pick))
        return UnitSamples(first.ids, None, miou[rows, pick][:, None], counts[rows, pick][:, None])
    return None


def point_value(metric: str, s: UnitSamples) -> float:
    if metric == "mask_ap" and s.instances:
        return float(_instance_values(s, np.arange(len(s.ids))[None])[0])
    found = statistic(metric, s)
    return float(found[0](*found[1])) if found is not None else math.nan


def add_interval_columns(row: dict[str, Any], iv: Interval | None) -> None:
    row["ci_low"] = iv.low if iv is not None else None
    row["ci_high"] = iv.high if iv is not None else None
    row["ci_level"] = LEVEL if iv is not None else None


def add_delta_columns(row: dict[str, Any], iv: Interval | None) -> None:
    row["delta"] = iv.value if iv is not None else None
    row["delta_ci_low"] = iv.low if iv is not None else None
    row["delta_ci_high"] = iv.high if iv is not None else None


def square_masking(rows: Sequence[Mapping[str, Any]], square_attacks: set[int], metric: str) -> dict[int, str]:
    """defense index -> the Square warning, where a Square attack's value is below every gradient attack's on that
    defense entry (the comparison of AutoAttack's ``checks``). Rows carry ``attack_index``/``defense_index``."""
    out: dict[int, str] = {}
    by_defense: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r["metric"] == metric and r["attack"] not in ("clean", WORST) and r.get("attack_index", -1) >= 0:
            by_defense.setdefault(int(r["defense_index"]), []).append(r)
    for di, cell in by_defense.items():
        square = [r["value"] for r in cell if r["attack_index"] in square_attacks]
        gradient = [r["value"] for r in cell if r["attack_index"] not in square_attacks]
        if square and gradient and min(square) < min(gradient):
            out[di] = SQUARE_MASKING
    return out
