"""Bootstrap intervals over images: seeded, equal to a plain numpy reference, vectorised == loop, paired."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from equicore.errors import InvalidInputError
from equicore.metrics import functional as MF
from equicore.metrics.bootstrap import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    Interval,
    accuracy_stat,
    bootstrap_interval,
    canonical_order,
    mean_stat,
    miou_stat,
    paired_delta_interval,
    pixel_accuracy_stat,
    resample_counts,
    resample_indices,
    segmentation_counts,
    supports_weights,
    weighted_stat,
)

NUM_CLASSES = 5
IGNORE = 255


def _correct(n: int, p: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < p


def _label_maps(n: int, seed: int, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Random predictions / targets, with ignored pixels and class 4 absent from both."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, NUM_CLASSES - 1, (n, size, size), generator=g)
    noise = torch.randint(0, NUM_CLASSES - 1, target.shape, generator=g)
    preds = torch.where(torch.rand(n, size, size, generator=g) < 0.6, target, noise)
    target[torch.rand(n, size, size, generator=g) < 0.1] = IGNORE
    return preds, target


def _seg_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(per-image confusion matrices [n, C, C], tp, pred, gt)."""
    preds, target = _label_maps(n, seed)
    cms = np.stack([MF.confusion_matrix(p, t, NUM_CLASSES, IGNORE).numpy() for p, t in zip(preds, target, strict=True)])
    return (cms, *segmentation_counts(cms))


def _reference(stat, arrays, n_resamples: int, seed: int, q=(2.5, 97.5)) -> tuple[float, float]:
    """The naive definition: numpy indices, one stat call per resample, numpy's default percentile."""
    n = arrays[0].shape[0]
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, n, size=(n_resamples, n))
    vals = np.array([stat(*(a[i] for a in arrays)) for i in idx])
    low, high = np.percentile(vals, q)
    return float(low), float(high)


def _naive_accuracy(correct: np.ndarray) -> float:
    return float(np.mean(correct))


def _naive_miou(tp: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> float:
    stp, spred, sgt = tp.sum(0), pred.sum(0), gt.sum(0)
    union = sgt + spred - stp
    present = union > 0
    return float(np.mean(stp[present] / union[present])) if present.any() else math.nan


# ---------------------------------------------------------------------------------------------------------------
# resampling and reproducibility


def test_defaults() -> None:
    assert DEFAULT_RESAMPLES == 1000 and DEFAULT_LEVEL == 0.95
    iv = bootstrap_interval(accuracy_stat, _correct(50, 0.5, 0))
    assert (iv.n, iv.n_resamples, iv.level) == (50, 1000, 0.95)


def test_resample_indices_are_numpy_pcg64() -> None:
    idx = resample_indices(37, 11, 5)
    ref = np.random.Generator(np.random.PCG64(5)).integers(0, 37, size=(11, 37))
    assert idx.shape == (11, 37) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ref)
    assert resample_indices(0, 4, 0).shape == (4, 0)


def test_resample_counts_are_multiplicities() -> None:
    idx = resample_indices(9, 6, 1)
    counts = resample_counts(idx, 9)
    for r in range(6):
        np.testing.assert_array_equal(counts[r], np.bincount(idx[r], minlength=9))
    assert (counts.sum(1) == 9).all()


def test_same_seed_same_interval_different_seed_different_bounds() -> None:
    scores = np.random.default_rng(0).normal(size=300)
    a = bootstrap_interval(mean_stat, scores, seed=3)
    assert a == bootstrap_interval(mean_stat, scores, seed=3)
    b = bootstrap_interval(mean_stat, scores, seed=4)
    assert a.value == b.value and (a.low, a.high) != (b.low, b.high)
    # the generic (loop) path is seeded the same way
    median = lambda x: float(np.median(x))  # noqa: E731
    assert bootstrap_interval(median, scores, seed=3, n_resamples=200) == bootstrap_interval(
        median, scores, seed=3, n_resamples=200
    )


def test_interval_shrinks_with_n() -> None:
    small = bootstrap_interval(accuracy_stat, _correct(100, 0.7, 1))
    large = bootstrap_interval(accuracy_stat, _correct(1600, 0.7, 2))
    assert small.low <= small.value <= small.high and large.low <= large.value <= large.high
    # half-width ~ sqrt(p(1-p)/n): 4x smaller at 16x the images
    assert large.half_width < 0.5 * small.half_width
    assert 0.06 < small.half_width < 0.12 and 0.015 < large.half_width < 0.03


def test_half_width() -> None:
    assert Interval(0.5, 0.4, 0.7, 10, 100, 0.95).half_width == pytest.approx(0.15)


# ---------------------------------------------------------------------------------------------------------------
# equal to the plain numpy reference; vectorised == loop


@pytest.mark.parametrize("seed", [0, 7])
def test_accuracy_equals_numpy_reference(seed: int) -> None:
    correct = _correct(203, 0.63, seed)
    iv = bootstrap_interval(accuracy_stat, correct, n_resamples=500, seed=seed)
    assert iv.value == float(np.mean(correct))
    assert (iv.low, iv.high) == _reference(_naive_accuracy, (correct,), 500, seed)


def test_level_sets_the_percentiles() -> None:
    correct = _correct(150, 0.5, 3)
    iv = bootstrap_interval(accuracy_stat, correct, n_resamples=400, level=0.9, seed=2)
    assert (iv.low, iv.high) == _reference(_naive_accuracy, (correct,), 400, 2, q=(5.0, 95.0))
    wide = bootstrap_interval(accuracy_stat, correct, n_resamples=400, level=0.99, seed=2)
    assert wide.low <= iv.low and wide.high >= iv.high


def test_miou_equals_numpy_reference() -> None:
    _, tp, pred, gt = _seg_data(40, 0)
    iv = bootstrap_interval(miou_stat, (tp, pred, gt), n_resamples=300, seed=1)
    assert iv.value == pytest.approx(_naive_miou(tp, pred, gt), rel=1e-12)
    low, high = _reference(_naive_miou, (tp, pred, gt), 300, 1)
    assert iv.low == pytest.approx(low, rel=1e-12) and iv.high == pytest.approx(high, rel=1e-12)


def test_generic_stat_uses_the_loop_and_matches_reference() -> None:
    scores = np.random.default_rng(1).normal(size=(60, 3))
    stat = lambda x: float(np.median(x[:, 0]) - x[:, 2].mean())  # noqa: E731
    assert not supports_weights(stat)
    iv = bootstrap_interval(stat, (scores,), n_resamples=250, seed=9)
    assert iv.value == stat(scores)
    assert (iv.low, iv.high) == _reference(stat, (scores,), 250, 9)


@pytest.mark.parametrize("name", ["accuracy", "miou", "pixel_accuracy"])
def test_vectorised_equals_loop_exactly(name: str) -> None:
    if name == "accuracy":
        stat, data = accuracy_stat, (_correct(777, 0.4, 5),)
    else:
        _, tp, pred, gt = _seg_data(60, 2)
        stat, data = (miou_stat if name == "miou" else pixel_accuracy_stat), (tp, pred, gt)
    assert supports_weights(stat)
    fast = bootstrap_interval(stat, data, n_resamples=400, seed=11)
    slow = bootstrap_interval(stat, data, n_resamples=400, seed=11, vectorize=False)
    assert fast == slow
    # and resample by resample, not only at the two percentiles
    idx = resample_indices(data[0].shape[0], 50, 11)
    vec = stat(*data, weights=resample_counts(idx, data[0].shape[0]))
    loop = np.array([stat(*(a[i] for a in data)) for i in idx])
    np.testing.assert_array_equal(vec, loop)


def test_vectorised_blocks_equal_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import equicore.metrics.bootstrap as B

    _, tp, pred, gt = _seg_data(30, 4)
    whole = bootstrap_interval(miou_stat, (tp, pred, gt), n_resamples=200, seed=0)
    monkeypatch.setattr(B, "_BLOCK_ELEMENTS", 30 * 7)  # 7 resamples per block
    assert bootstrap_interval(miou_stat, (tp, pred, gt), n_resamples=200, seed=0) == whole


def test_fast_at_realistic_size() -> None:
    n, r = 5000, 1000
    correct = _correct(n, 0.7, 0)
    rng = np.random.default_rng(0)
    tp = rng.integers(0, 2000, (n, 21))
    pred, gt = tp + rng.integers(0, 500, (n, 21)), tp + rng.integers(0, 500, (n, 21))
    t0 = time.perf_counter()
    bootstrap_interval(accuracy_stat, correct, n_resamples=r)
    t1 = time.perf_counter()
    bootstrap_interval(miou_stat, (tp, pred, gt), n_resamples=r)
    t2 = time.perf_counter()
    # well under a second each on an idle core; loose bounds for shared CI machines
    assert t1 - t0 < 3.0 and t2 - t1 < 3.0


# ---------------------------------------------------------------------------------------------------------------
# segmentation statistics equal the confusion-matrix metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_stat_equals_confusion_matrix_miou(seed: int) -> None:
    preds, target = _label_maps(23, seed)
    cms, tp, pred, gt = _seg_data(23, seed)
    cm = MF.confusion_matrix(preds, target, NUM_CLASSES, IGNORE)  # dataset-level, from all pixels at once
    np.testing.assert_array_equal(cms.sum(0), cm.numpy())
    assert math.isnan(float(MF.iou_per_class(cm)[NUM_CLASSES - 1]))  # the absent class is skipped by both
    assert miou_stat(tp, pred, gt) == pytest.approx(MF.mean_iou(cm), rel=1e-12)
    assert pixel_accuracy_stat(tp, pred, gt) == pytest.approx(MF.pixel_accuracy(cm), rel=1e-12)
    # a resample (with repeated images) equals the confusion matrix of the resampled images
    idx = resample_indices(23, 3, seed)
    vec = miou_stat(tp, pred, gt, weights=resample_counts(idx, 23))
    for r, i in enumerate(idx):
        cm_r = MF.confusion_matrix(preds[torch.from_numpy(i)], target[torch.from_numpy(i)], NUM_CLASSES, IGNORE)
        assert vec[r] == pytest.approx(MF.mean_iou(cm_r), rel=1e-12)


def test_miou_skips_classes_absent_from_the_resample() -> None:
    # class 1 occurs only in image 1: resamples without image 1 average over class 0 alone
    tp = np.array([[5, 0], [5, 2]])
    pred = np.array([[5, 0], [5, 4]])
    gt = np.array([[10, 0], [5, 2]])
    assert miou_stat(tp[[0, 0]], pred[[0, 0]], gt[[0, 0]]) == 0.5
    assert miou_stat(tp, pred, gt) == pytest.approx((10 / 15 + 2 / 4) / 2)


def test_nan_resamples_are_dropped() -> None:
    # image 0 has no labelled pixel: resamples of image 0 only (p = 1/4 at n = 2) have no mIoU
    tp, pred = np.array([[0, 0], [3, 1]]), np.array([[0, 0], [4, 1]])
    gt = np.array([[0, 0], [3, 2]])
    iv = bootstrap_interval(miou_stat, (tp, pred, gt), n_resamples=400, seed=0)
    assert 60 < iv.n_dropped < 140
    assert iv.low == iv.high == iv.value  # every defined resample has the same counts up to a factor
    assert bootstrap_interval(miou_stat, (tp, pred, gt), n_resamples=400, seed=0, vectorize=False) == iv


def test_mostly_nan_resamples_give_nan_interval() -> None:
    x = np.array([0.0, 0.0, 0.0, 1.0])
    stat = lambda v: float(v.sum()) if v.sum() > 1 else math.nan  # noqa: E731  (defined in ~26% of resamples)
    iv = bootstrap_interval(stat, x, n_resamples=200, seed=0)
    assert iv.n_dropped > 100 and math.isnan(iv.low) and math.isnan(iv.high)
    _, tp, pred, gt = _seg_data(5, 0)
    empty = bootstrap_interval(miou_stat, (tp * 0, pred * 0, gt * 0), n_resamples=50)
    assert math.isnan(empty.value) and math.isnan(empty.low) and empty.n_dropped == 50


def test_segmentation_counts() -> None:
    cms = np.array([[[3, 1], [2, 4]]])
    tp, pred, gt = segmentation_counts(cms)
    np.testing.assert_array_equal(tp, [[3, 4]])
    np.testing.assert_array_equal(pred, [[5, 5]])
    np.testing.assert_array_equal(gt, [[4, 6]])


# ---------------------------------------------------------------------------------------------------------------
# paired differences


def test_paired_identical_is_exactly_zero() -> None:
    correct = _correct(300, 0.6, 0)
    iv = paired_delta_interval(accuracy_stat, correct, correct.copy())
    assert (iv.value, iv.low, iv.high) == (0.0, 0.0, 0.0)
    _, tp, pred, gt = _seg_data(20, 0)
    iv = paired_delta_interval(miou_stat, (tp, pred, gt), (tp, pred, gt), n_resamples=100)
    assert (iv.value, iv.low, iv.high) == (0.0, 0.0, 0.0)


def test_paired_is_narrower_than_unpaired_for_correlated_models() -> None:
    n, r = 800, 1000
    rng = np.random.default_rng(0)
    a = rng.random(n) < 0.6
    b = a.copy()
    b[rng.choice(n, 40, replace=False)] ^= True  # b agrees with a on 95% of the images
    paired = paired_delta_interval(accuracy_stat, a, b, n_resamples=r, seed=0)
    assert paired.value == pytest.approx(b.mean() - a.mean())
    # unpaired: a and b resampled independently
    va = accuracy_stat(a, weights=resample_counts(resample_indices(n, r, 1), n))
    vb = accuracy_stat(b, weights=resample_counts(resample_indices(n, r, 2), n))
    low, high = np.percentile(vb - va, [2.5, 97.5])
    assert paired.half_width < 0.5 * (high - low) / 2


def test_paired_equals_reference_and_loop() -> None:
    a, b = _correct(120, 0.5, 1), _correct(120, 0.7, 2)
    iv = paired_delta_interval(accuracy_stat, a, b, n_resamples=300, seed=4)
    idx = np.random.Generator(np.random.PCG64(4)).integers(0, 120, size=(300, 120))
    deltas = np.array([b[i].mean() - a[i].mean() for i in idx])
    assert (iv.low, iv.high) == tuple(np.percentile(deltas, [2.5, 97.5]))
    assert iv == paired_delta_interval(accuracy_stat, a, b, n_resamples=300, seed=4, vectorize=False)


# ---------------------------------------------------------------------------------------------------------------
# canonical order


def test_canonical_order_makes_shuffled_input_identical() -> None:
    n = 250
    ids = np.array([f"img_{i:05d}" for i in range(n)])
    correct = _correct(n, 0.55, 3)
    _, tp, pred, gt = _seg_data(n, 3)
    ref_acc = bootstrap_interval(accuracy_stat, correct)
    ref_miou = bootstrap_interval(miou_stat, (tp, pred, gt))
    perm = np.random.default_rng(0).permutation(n)  # e.g. another sharding / completion order
    s_ids, s_correct, s_tp, s_pred, s_gt = ids[perm], correct[perm], tp[perm], pred[perm], gt[perm]
    # unsorted input gives another interval ...
    assert bootstrap_interval(accuracy_stat, s_correct) != ref_acc
    # ... sorting by id first restores it exactly
    order = canonical_order(s_ids)
    np.testing.assert_array_equal(s_ids[order], ids)
    assert bootstrap_interval(accuracy_stat, s_correct[order]) == ref_acc
    assert bootstrap_interval(miou_stat, (s_tp[order], s_pred[order], s_gt[order])) == ref_miou


def test_canonical_order_ints_and_errors() -> None:
    np.testing.assert_array_equal(canonical_order([30, 10, 20]), [1, 2, 0])
    with pytest.raises(InvalidInputError, match="ids: duplicate"):
        canonical_order(["a", "b", "a"])
    with pytest.raises(InvalidInputError, match="ids"):
        canonical_order(np.zeros((2, 2)))


# ---------------------------------------------------------------------------------------------------------------
# edge cases and bad input


def test_empty_gives_nan_interval() -> None:
    iv = bootstrap_interval(accuracy_stat, np.zeros(0, dtype=bool))
    assert iv.n == 0 and all(math.isnan(v) for v in (iv.value, iv.low, iv.high))
    iv = paired_delta_interval(miou_stat, (np.zeros((0, 3)),) * 3, (np.zeros((0, 3)),) * 3)
    assert iv.n == 0 and math.isnan(iv.value) and math.isnan(iv.high)


def test_single_image_is_degenerate() -> None:
    iv = bootstrap_interval(accuracy_stat, np.array([True]))
    assert (iv.value, iv.low, iv.high, iv.n) == (1.0, 1.0, 1.0, 1)
    iv = paired_delta_interval(accuracy_stat, np.array([1]), np.array([0]))
    assert (iv.value, iv.low, iv.high) == (-1.0, -1.0, -1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"level": 0.0}, "level"),
        ({"level": 1.0}, "level"),
        ({"level": 1.5}, "level"),
        ({"level": float("nan")}, "level"),
        ({"level": "0.95"}, "level"),
        ({"level": True}, "level"),
        ({"n_resamples": 0}, "n_resamples"),
        ({"n_resamples": 10.0}, "n_resamples"),
        ({"n_resamples": True}, "n_resamples"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_parameters(kwargs: dict, match: str) -> None:
    correct = _correct(10, 0.5, 0)
    with pytest.raises(InvalidInputError, match=match):
        bootstrap_interval(accuracy_stat, correct, **kwargs)
    with pytest.raises(InvalidInputError, match=match):
        paired_delta_interval(accuracy_stat, correct, correct, **kwargs)


def test_bad_data() -> None:
    a, b = np.zeros((10, 3)), np.zeros((9, 3))
    with pytest.raises(InvalidInputError, match=r"data\[1\]"):
        bootstrap_interval(miou_stat, (a, b, a))
    with pytest.raises(InvalidInputError, match="data_b"):
        paired_delta_interval(accuracy_stat, np.zeros(10), np.zeros(9))
    with pytest.raises(InvalidInputError, match=r"data_a\[2\]"):
        paired_delta_interval(miou_stat, (a, a, b), (a, a, a))
    with pytest.raises(InvalidInputError, match=r"data\[0\]"):
        bootstrap_interval(accuracy_stat, (3.0,))
    with pytest.raises(InvalidInputError, match="data"):
        bootstrap_interval(accuracy_stat, ())
    with pytest.raises(InvalidInputError, match="stat"):
        bootstrap_interval("mean", np.zeros(3))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="correct"):
        accuracy_stat(np.array([0.0, 0.5]))
    with pytest.raises(InvalidInputError, match="correct"):
        accuracy_stat(np.zeros((3, 2)))
    with pytest.raises(InvalidInputError, match="gt"):
        miou_stat(a, a, np.zeros((10, 4)))
    with pytest.raises(InvalidInputError, match="cms"):
        segmentation_counts(np.zeros((2, 3, 4)))


def test_bad_stat_results() -> None:
    @weighted_stat
    def wrong_shape(x: np.ndarray, *, weights: np.ndarray | None = None):
        return float(x.mean()) if weights is None else np.zeros(3)

    with pytest.raises(InvalidInputError, match="stat"):
        bootstrap_interval(wrong_shape, np.zeros(10), n_resamples=20)
    with pytest.raises(InvalidInputError, match="stat"):
        bootstrap_interval(lambda x: x, np.zeros(10), n_resamples=20)


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        bootstrap_interval(accuracy_stat, np.zeros(4), level=2)


def test_single_array_and_tensor_inputs() -> None:
    correct = _correct(40, 0.5, 8)
    ref = bootstrap_interval(accuracy_stat, (correct,))
    assert bootstrap_interval(accuracy_stat, correct) == ref
    assert bootstrap_interval(accuracy_stat, [correct]) == ref
    assert bootstrap_interval(accuracy_stat, torch.from_numpy(correct)) == ref
