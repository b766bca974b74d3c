"""Metric states: exact under any split, serialisable, and equal to torchmetrics on the same data."""

from __future__ import annotations

import json
import math
import pickle
from typing import Any

import pytest
import torch

import equicore  # noqa: F401  (registrations)
from equicore.errors import InvalidInputError
from equicore.metrics import (
    AccuracyState,
    ConfusionState,
    MeanScoreState,
    MetricState,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    merge_all,
    state_from_dict,
)
from equicore.registry import METRICS, accepted_params
from tests.models_for_tests import TASKS

NUM_CLASSES = 5
IGNORE = 255
N = 41


def metric_cases() -> list:
    out = []
    for name in METRICS.names():
        tasks = METRICS.meta(name).get("tasks", TASKS)
        for task in TASKS:
            marks = () if task in tasks else pytest.mark.skip(reason=f"{name} does not apply to {task}")
            out.append(pytest.param(name, task, marks=marks, id=f"{name}-{task}"))
    return out


def build(name: str) -> MetricState:
    accepted = accepted_params(METRICS.get(name)) or set()
    params: dict[str, Any] = {}
    if "num_classes" in accepted:
        params["num_classes"] = NUM_CLASSES
    if "ignore_index" in accepted:
        params["ignore_index"] = IGNORE
    return METRICS.build(name, **params)


def random_dataset(task: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random predictions, labels (with ignored pixels for segmentation), attack targets and float scores."""
    g = torch.Generator().manual_seed(seed)
    shape = (N,) if task == "classification" else (N, 6, 7)
    labels = torch.randint(0, NUM_CLASSES, shape, generator=g)
    if task == "segmentation":
        labels = labels.masked_fill(torch.rand(shape, generator=g) < 0.15, IGNORE)
    return {
        "preds": torch.randint(0, NUM_CLASSES, shape, generator=g),
        "labels": labels,
        "attack_targets": torch.randint(0, NUM_CLASSES, shape, generator=g),
        # Scores in [-1, 1] with full float64 mantissas: a naive float sum would depend on the order.
        "scores": torch.rand(N, generator=g, dtype=torch.float64) * 2 - 1,
    }


def take(data: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {k: v[lo:hi] for k, v in data.items()}


def split_points(sizes: list[int]) -> list[tuple[int, int]]:
    out, lo = [], 0
    for s in sizes:
        out.append((lo, lo + s))
        lo += s
    assert lo == N
    return out


def random_sizes(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(2, 9, (), generator=g))
    cuts = sorted(torch.randint(0, N + 1, (k - 1,), generator=g).tolist())  # may repeat: empty shards too
    bounds = [0, *cuts, N]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


SPLITS = [[N], [20, 21], [1, 39, 1], [10, 0, 31], *[random_sizes(s) for s in range(6)]]


def same_result(a: MetricState, b: MetricState) -> None:
    assert a.to_dict() == b.to_dict()
    ca, cb = a.compute(), b.compute()
    assert ca.keys() == cb.keys()
    for k in ca:
        assert (math.isnan(ca[k]) and math.isnan(cb[k])) or ca[k] == cb[k], k


@pytest.mark.parametrize("name,task", metric_cases())
@pytest.mark.parametrize("sizes", SPLITS, ids=lambda s: "-".join(map(str, s)))
def test_merged_shards_equal_one_pass_exactly(name: str, task: str, sizes: list[int]) -> None:
    data = random_dataset(task)
    one = build(name)
    one.update(data)
    shards = []
    for lo, hi in split_points(sizes):
        st = build(name)
        # Each shard itself may be fed in several batches.
        mid = (lo + hi) // 2
        st.update(take(data, lo, mid))
        st.update(take(data, mid, hi))
        shards.append(st)
    same_result(merge_all(shards), one)
    # Merge order and grouping do not matter either.
    same_result(merge_all(shards[::-1]), one)
    if len(shards) >= 3:
        same_result(merge_all([merge_all(shards[:2]), merge_all(shards[2:])]), one)
    assert merge_all(shards).n_samples == N


@pytest.mark.parametrize("name,task", metric_cases())
def test_state_survives_pickle_and_dict_round_trip(name: str, task: str) -> None:
    st = build(name)
    st.update(random_dataset(task, seed=3))
    same_result(pickle.loads(pickle.dumps(st)), st)
    d = st.to_dict()
    same_result(state_from_dict(json.loads(json.dumps(d))), st)
    same_result(type(st).from_dict(d), st)
    # A restored state keeps accumulating like the original.
    more = random_dataset(task, seed=4)
    a, b = state_from_dict(d), pickle.loads(pickle.dumps(st))
    a.update(more)
    b.update(more)
    st.update(more)
    same_result(a, st)
    same_result(b, st)


@pytest.mark.parametrize("name", METRICS.names())
def test_empty_state_computes_nan_and_merges_as_identity(name: str) -> None:
    tasks = [t for t in TASKS if t in METRICS.meta(name).get("tasks", TASKS)]
    if not tasks:
        pytest.skip(f"{name} applies to none of {TASKS}")
    task = tasks[0]
    empty = build(name)
    assert all(math.isnan(v) for v in empty.compute().values())
    st = build(name)
    st.update(random_dataset(task))
    same_result(empty.merge(st), st)
    same_result(st.merge(build(name)), st)


def test_merging_different_configs_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="configs differ"):
        ConfusionState(3).merge(ConfusionState(4))
    with pytest.raises(InvalidInputError, match="cannot merge"):
        AccuracyState().merge(MeanScoreState())


def test_mean_score_is_exact_mean() -> None:
    scores = random_dataset("classification")["scores"]
    st = MeanScoreState()
    st.update({"scores": scores})
    assert st.compute()["equivariance_score"] == pytest.approx(float(scores.mean()), abs=1e-12)


# ------------------------------------------------------------------------------------------------ vs torchmetrics


def all_classes_present(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmentation-like data where every class occurs in both labels and predictions (torchmetrics scores a class
    absent from both as ``zero_division`` = 0 while we leave it out of the mean), with ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, NUM_CLASSES, (6, 9, 11), generator=g)
    noise = torch.randint(0, NUM_CLASSES, target.shape, generator=g)
    preds = torch.where(torch.rand(target.shape, generator=g) < 0.6, target, noise)  # correlated, not random
    target = target.masked_fill(torch.rand(target.shape, generator=g) < 0.1, IGNORE)
    valid = target != IGNORE
    assert set(target[valid].unique().tolist()) == set(range(NUM_CLASSES))
    assert set(preds[valid].unique().tolist()) == set(range(NUM_CLASSES))
    return preds, target


@pytest.mark.parametrize("seed", range(3))
def test_miou_equals_torchmetrics_jaccard(seed: int) -> None:
    tmc = pytest.importorskip("torchmetrics.classification")
    preds, target = all_classes_present(seed)
    st = ConfusionState(NUM_CLASSES, IGNORE)
    st.update({"preds": preds[:2], "labels": target[:2]})
    st.update({"preds": preds[2:], "labels": target[2:]})
    out = st.compute()
    macro = tmc.MulticlassJaccardIndex(num_classes=NUM_CLASSES, ignore_index=IGNORE, average="macro")
    per_class = tmc.MulticlassJaccardIndex(num_classes=NUM_CLASSES, ignore_index=IGNORE, average="none")
    assert out["miou"] == pytest.approx(float(macro(preds, target)), abs=1e-6)
    expected = per_class(preds, target)
    ours = torch.tensor([out[f"miou_class_{c}"] for c in range(NUM_CLASSES)], dtype=torch.float64)
    torch.testing.assert_close(ours, expected.double(), rtol=0, atol=1e-6)
    acc = tmc.MulticlassAccuracy(num_classes=NUM_CLASSES, ignore_index=IGNORE, average="micro")
    assert out["miou_pixel_accuracy"] == pytest.approx(float(acc(preds, target)), abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_accuracy_equals_torchmetrics_micro_accuracy(seed: int) -> None:
    tmc = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (97,), generator=g)
    preds = torch.where(torch.rand(97, generator=g) < 0.5, labels, torch.randint(0, NUM_CLASSES, (97,), generator=g))
    st = AccuracyState()
    st.update({"preds": preds, "labels": labels})
    expected = tmc.MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")(preds, labels)
    assert st.compute()["accuracy"] == pytest.approx(float(expected), abs=1e-7)
    assert st.correct == int((preds == labels).sum())


def test_iou_functions_on_a_hand_made_matrix() -> None:
    # rows = truth, cols = prediction
    preds = torch.tensor([0, 0, 1, 1, 2, 0])
    target = torch.tensor([0, 1, 1, 1, 255, 2])
    cm = confusion_matrix(preds, target, 4, ignore_index=255)
    assert cm.tolist() == [[1, 0, 0, 0], [1, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    iou = iou_per_class(cm)
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(float(iou[3]))  # class 3 occurs nowhere: left out of the mean
    assert mean_iou(cm) == pytest.approx((1 / 3 + 2 / 3 + 0.0) / 3)
