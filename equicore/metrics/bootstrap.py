"""Seeded percentile-bootstrap confidence intervals over images, including paired differences.

Every results cell (robust accuracy, mIoU, mask AP of one (attack, defense) pair over a set of images) carries a
``level`` (default 95%) interval, and "defense minus vanilla" on the same images carries a *paired* interval.

Method
------
* **Unit of resampling = image.** Pixels (and the instances of one image) are strongly correlated: a model that
  misreads an image gets thousands of neighbouring pixels wrong at once, so resampling pixels would treat them as
  independent and give far too narrow intervals. The images are the independent draws from the data distribution,
  so a resample draws ``n`` images with replacement and recomputes the *dataset-level* statistic on them (for mIoU:
  summed pixel counts, as a confusion matrix does, never a mean of per-image IoUs).
* **Indices.** ``resample_indices(n, R, seed)`` is exactly
  ``np.random.Generator(np.random.PCG64(seed)).integers(0, n, size=(R, n))``: row ``r`` holds the images of
  resample ``r``. The same ``(n, R, seed)`` always gives the same indices, hence the same interval.
* **Interval.** ``value`` is the statistic on the full data; ``low``/``high`` are the percentiles
  ``100 * (1 - level) / 2`` and ``100 - that`` (rounded to 10 decimals, so 0.95 gives exactly 2.5 and 97.5) of the
  ``R`` resampled statistics, with ``np.percentile``'s default ("linear") definition. Resamples whose statistic is
  NaN (e.g. mIoU of a resample without any labelled pixel) are dropped; if more than half are NaN the bounds are NaN.
  ``n == 0`` gives all-NaN (no error); ``n == 1`` gives the degenerate interval ``low == high == value``.
* **Paired differences.** ``paired_delta_interval`` reports ``stat(b) - stat(a)`` and applies the *same* indices to
  ``a`` and ``b`` in each resample, so the image-to-image variation both share cancels (an unpaired interval would
  count it twice and be much wider when the two models succeed and fail on the same images).
* **Canonical order.** Resample ``r`` picks image *positions*, so the interval depends on the order of the images.
  Callers must pass images in a canonical order, sorted by sample id (``canonical_order(ids)``), so that any
  sharding or completion order of the evaluation gives identical intervals; ``a`` and ``b`` of a paired interval
  must be aligned in that same order.
* **Vectorised path.** A resample is equivalent to integer weights, the number of times each image was drawn, so
  statistics that are ratios of sums (accuracy, mIoU, pixel accuracy, means) evaluate all resamples at once as
  ``counts @ per_image_values``. Such a statistic accepts ``weights=[R, n]`` and returns ``[R]``; mark it with
  ``weighted_stat`` and ``bootstrap_interval`` uses it (any other ``stat``, e.g. COCO mask AP recomputed per
  resample, is called once per resample). For integer-valued per-image data (0/1 correctness, pixel counts) whose
  totals stay below 2**53 the sums are exact in float64, so both paths give bit-identical intervals.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from equicore.errors import InvalidInputError

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95

# Resamples per block of the vectorised path: bounds the [rows, n] float64 weight matrix to ~32 MiB.
_BLOCK_ELEMENTS = 1 << 22
_WEIGHTED_ATTR = "supports_weights"

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Interval:
    """``value`` on all ``n`` images and the ``[low, high]`` percentile-bootstrap interval at ``level``."""

    value: float
    low: float
    high: float
    n: int
    n_resamples: int
    level: float
    n_dropped: int = 0  # resamples whose statistic was NaN

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def weighted_stat(fn: _F) -> _F:
    """Mark ``fn(*arrays, weights=None)`` as vectorised: with ``weights`` [R, n] it returns the R resampled values."""
    setattr(fn, _WEIGHTED_ATTR, True)
    return fn


def supports_weights(stat: Callable[..., Any]) -> bool:
    return bool(getattr(stat, _WEIGHTED_ATTR, False))


# ----------------------------------------------------------------------------------------------------------------
# validation


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise InvalidInputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise InvalidInputError(f"{name}: expected an integer >= {minimum}, got {value!r}") from None
    if out < minimum:
        raise InvalidInputError(f"{name}: expected an integer >= {minimum}, got {out}")
    return out


def _check_level(level: Any) -> float:
    if isinstance(level, bool) or not isinstance(level, int | float | np.floating | np.integer):
        raise InvalidInputError(f"level: expected a number in (0, 1), got {level!r}")
    out = float(level)
    if not 0.0 < out < 1.0:  # also rejects NaN
        raise InvalidInputError(f"level: expected a number in (0, 1), got {level!r}")
    return out


def _as_arrays(data: Any, name: str) -> tuple[tuple[np.ndarray, ...], int]:
    """The data as a tuple of arrays with a common first (image) axis, and that axis' length."""
    if isinstance(data, np.ndarray) or (hasattr(data, "__array__") and not isinstance(data, Sequence)):
        data = (data,)  # one array (or a CPU tensor)
    if isinstance(data, str | bytes) or not isinstance(data, Sequence) or len(data) == 0:
        raise InvalidInputError(f"{name}: expected a non-empty tuple of arrays whose first axis is the image axis")
    arrays = []
    for i, x in enumerate(data):
        try:
            a = np.asarray(x)
        except (TypeError, ValueError) as exc:  # ragged nested lists, device tensors
            raise InvalidInputError(f"{name}[{i}]: cannot be converted to an array ({exc})") from None
        if a.ndim == 0:
            raise InvalidInputError(f"{name}[{i}]: expected an array with an image axis, got a scalar")
        arrays.append(a)
    n = arrays[0].shape[0]
    for i, a in enumerate(arrays[1:], start=1):
        if a.shape[0] != n:
            raise InvalidInputError(f"{name}[{i}]: has {a.shape[0]} images, {name}[0] has {n}")
    return tuple(arrays), n


def _check_stat(stat: Any) -> None:
    if not callable(stat):
        raise InvalidInputError(f"stat: expected a callable, got {type(stat).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# resampling


def resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """int64 ``[n_resamples, n]``: row r lists the images (with replacement) of resample r."""
    n = _check_int(n, "n", 0)
    n_resamples = _check_int(n_resamples, "n_resamples", 1)
    seed = _check_int(seed, "seed", 0)
    if n == 0:  # Generator.integers rejects an empty range
        return np.zeros((n_resamples, 0), dtype=np.int64)
    # One call: the bounded-integer generator buffers draws within a call, so splitting it would change the stream.
    return np.random.Generator(np.random.PCG64(seed)).integers(0, n, size=(n_resamples, n), dtype=np.int64)


def resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """float64 ``[R, n]``: how many times each image occurs in each resample (the weights of the vectorised path)."""
    r = indices.shape[0]
    flat = (indices + (np.arange(r, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)


def canonical_order(ids: Any) -> np.ndarray:
    """Stable argsort of the sample ids: reorder every per-image array with it before bootstrapping."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise InvalidInputError(f"ids: expected a 1-D sequence of sample ids, got shape {arr.shape}")
    order = np.argsort(arr, kind="stable")
    s = arr[order]
    if s.size > 1 and bool(np.any(s[1:] == s[:-1])):
        dup = s[1:][s[1:] == s[:-1]][0]
        raise InvalidInputError(f"ids: duplicate sample id {dup!r} (the order of duplicates is not canonical)")
    return order


def _percentiles(level: float) -> tuple[float, float]:
    lo = round(50.0 * (1.0 - level), 10)  # 0.95 -> 2.5 exactly, not 2.500000000000002
    return lo, 100.0 - lo


def percentile_interval(value: float, values: np.ndarray, n: int, n_resamples: int, level: float) -> Interval:
    """The percentile interval of resampled statistic ``values`` (NaNs dropped; NaN if more than half are)."""
    nan = np.isnan(values)
    n_dropped = int(nan.sum())
    if 2 * n_dropped > n_resamples:  # more than half the resamples undefined: no meaningful interval
        return Interval(value, math.nan, math.nan, n, n_resamples, level, n_dropped)
    low, high = np.percentile(values[~nan], _percentiles(level))
    return Interval(value, float(low), float(high), n, n_resamples, level, n_dropped)


def _resampled_values(
    stat: Callable[..., Any], datasets: Sequence[tuple[np.ndarray, ...]], indices: np.ndarray, vectorize: bool
) -> list[np.ndarray]:
    """float64 [R] per dataset: ``stat`` on each resample, the same indices (and weights) for every dataset."""
    r, n = indices.shape
    outs = [np.empty(r, dtype=np.float64) for _ in datasets]
    if vectorize and supports_weights(stat):
        step = max(1, _BLOCK_ELEMENTS // n)
        for start in range(0, r, step):
            block = indices[start : start + step]
            weights = resample_counts(block, n)  # once per block, shared by a and b of a paired interval
            for arrays, out in zip(datasets, outs, strict=True):
                vals = np.asarray(stat(*arrays, weights=weights), dtype=np.float64)
                if vals.shape != (block.shape[0],):
                    raise InvalidInputError(f"stat: with weights [{len(block)}, {n}] it returned shape {vals.shape}")
                out[start : start + step] = vals
        return outs
    for i in range(r):
        for arrays, out in zip(datasets, outs, strict=True):
            out[i] = _scalar(stat(*(a[indices[i]] for a in arrays)))
    return outs


def _scalar(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        raise InvalidInputError(f"stat: expected a scalar result, got {type(x).__name__}") from None


def _check_options(stat: Callable[..., Any], n_resamples: int, level: float, seed: int) -> tuple[int, float, int]:
    _check_stat(stat)
    return _check_int(n_resamples, "n_resamples", 1), _check_level(level), _check_int(seed, "seed", 0)


def bootstrap_interval(
    stat: Callable[..., Any],
    data: Any,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    vectorize: bool = True,
) -> Interval:
    """Percentile-bootstrap interval of ``stat(*data)`` over images.

    ``data``: an array or a tuple of arrays whose first axis is the image axis (same length ``n``, canonical order).
    ``vectorize=False`` forces one ``stat`` call per resample even for a ``weighted_stat``.
    """
    n_resamples, level, seed = _check_options(stat, n_resamples, level, seed)
    arrays, n = _as_arrays(data, "data")
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, n_resamples, level)
    value = _scalar(stat(*arrays))
    if n == 1:  # every resample is the one image
        return Interval(value, value, value, 1, n_resamples, level)
    (values,) = _resampled_values(stat, [arrays], resample_indices(n, n_resamples, seed), vectorize)
    return percentile_interval(value, values, n, n_resamples, level)


def paired_delta_interval(
    stat: Callable[..., Any],
    data_a: Any,
    data_b: Any,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    vectorize: bool = True,
) -> Interval:
    """Paired interval of ``stat(*data_b) - stat(*data_a)`` (e.g. defense minus vanilla on the same images).

    Each resample applies the same image indices to ``a`` and ``b``, so image ``i`` of ``a`` and of ``b`` must be the
    same image (both in canonical order).
    """
    n_resamples, level, seed = _check_options(stat, n_resamples, level, seed)
    arrays_a, n = _as_arrays(data_a, "data_a")
    arrays_b, n_b = _as_arrays(data_b, "data_b")
    if n_b != n:
        raise InvalidInputError(f"data_b: has {n_b} images, data_a has {n} (a paired interval needs the same images)")
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, n_resamples, level)
    value = _scalar(stat(*arrays_b)) - _scalar(stat(*arrays_a))
    if n == 1:
        return Interval(value, value, value, 1, n_resamples, level)
    indices = resample_indices(n, n_resamples, seed)
    values_b, values_a = _resampled_values(stat, [arrays_b, arrays_a], indices, vectorize)
    values = values_b - values_a
    return percentile_interval(value, values, n, n_resamples, level)


# ----------------------------------------------------------------------------------------------------------------
# ready-made statistics: per-image arrays in, dataset-level value out; ``weights`` [R, n] -> [R] values


def _sums(x: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Sum over the image axis: [...] without weights (as [1, ...]), [R, ...] with."""
    x = x.astype(np.float64, copy=False)
    if weights is None:
        return x.sum(axis=0, keepdims=True)
    return weights @ x


def _out(v: np.ndarray, weights: np.ndarray | None) -> float | np.ndarray:
    return float(v[0]) if weights is None else v


@weighted_stat
def accuracy_stat(correct: np.ndarray, *, weights: np.ndarray | None = None) -> float | np.ndarray:
    """Fraction of correct images; ``correct`` is 1-D 0/1 (or bool) per image."""
    c = np.asarray(correct)
    if c.ndim != 1:
        raise InvalidInputError(f"correct: expected a 1-D per-image 0/1 array, got shape {c.shape}")
    if c.dtype != np.bool_ and bool(np.any((c != 0) & (c != 1))):
        raise InvalidInputError("correct: expected values 0/1 (or bool)")
    n = c.shape[0]
    if n == 0:
        return math.nan if weights is None else np.full(weights.shape[0], math.nan)
    # Integer numerator, same denominator in both paths: identical floats from the loop and the vectorised path.
    return _out(_sums(c, weights) / n, weights)


@weighted_stat
def mean_stat(scores: np.ndarray, *, weights: np.ndarray | None = None) -> float | np.ndarray:
    """Mean of a real per-image score (e.g. equivariance); vectorised and loop paths agree up to rounding."""
    s = np.asarray(scores)
    if s.ndim != 1:
        raise InvalidInputError(f"scores: expected a 1-D per-image array, got shape {s.shape}")
    n = s.shape[0]
    if n == 0:
        return math.nan if weights is None else np.full(weights.shape[0], math.nan)
    return _out(_sums(s, weights) / n, weights)


def _seg_counts(tp: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # float64: integer counts stay exact below 2**53 and small unsigned dtypes cannot overflow in gt + pred - tp
    tp, pred, gt = (np.asarray(x, dtype=np.float64) for x in (tp, pred, gt))
    if tp.ndim != 2:
        raise InvalidInputError(f"tp: expected per-image per-class counts [n, C], got shape {tp.shape}")
    for name, a in (("pred", pred), ("gt", gt)):
        if a.shape != tp.shape:
            raise InvalidInputError(f"{name}: shape {a.shape} differs from tp {tp.shape}")
    return tp, pred, gt


@weighted_stat
def miou_stat(
    tp: np.ndarray, pred: np.ndarray, gt: np.ndarray, *, weights: np.ndarray | None = None
) -> float | np.ndarray:
    """Dataset-level mIoU from per-image per-class pixel counts [n, C] (true positives, predicted, ground truth).

    ``IoU_c = sum tp / (sum gt + sum pred - sum tp)``, averaged over classes with a nonzero denominator, exactly
    as ``functional.mean_iou`` on the summed confusion matrix (NaN if no class occurs). Count only pixels that are
    not ``ignore_index`` (``segmentation_counts`` does this from per-image confusion matrices).
    """
    tp, pred, gt = _seg_counts(tp, pred, gt)
    c = tp.shape[1]
    # Per-image union summed == summed gt + pred - tp (exact integers); 2C columns instead of 3C in the matmul.
    sums = _sums(np.concatenate([tp, gt + pred - tp], axis=1), weights)
    stp, union = sums[:, :c], sums[:, c:]
    present = union > 0
    iou = np.divide(stp, union, out=np.zeros_like(union), where=present)
    k = present.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        miou = np.where(k > 0, iou.sum(axis=1) / np.maximum(k, 1), math.nan)
    return _out(miou, weights)


@weighted_stat
def pixel_accuracy_stat(
    tp: np.ndarray, pred: np.ndarray, gt: np.ndarray, *, weights: np.ndarray | None = None
) -> float | np.ndarray:
    """Correct over labelled pixels (``functional.pixel_accuracy``); NaN without labelled pixels. ``pred`` unused."""
    tp, pred, gt = _seg_counts(tp, pred, gt)
    correct, total = _sums(tp.sum(axis=1), weights), _sums(gt.sum(axis=1), weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(total > 0, correct / np.maximum(total, 1), math.nan)
    return _out(acc, weights)


def segmentation_counts(cms: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image confusion matrices [n, C, C] (rows ground truth, columns prediction) -> (tp, pred, gt), each [n, C]."""
    cms = np.asarray(cms)
    if cms.ndim != 3 or cms.shape[1] != cms.shape[2]:
        raise InvalidInputError(f"cms: expected per-image confusion matrices [n, C, C], got shape {cms.shape}")
    return cms.diagonal(axis1=1, axis2=2).copy(), cms.sum(axis=1), cms.sum(axis=2)
