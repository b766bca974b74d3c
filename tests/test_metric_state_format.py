"""The serialised form of every registered metric state stays what it was: results already on disk are read back with
``from_dict``.

``tests/fixtures/metric_states_v1.json`` holds, per metric, ``to_dict()`` of a state after a few fixed updates
("single") and of two such shard states merged ("merged"), as written by the state classes before their fields were
declared once (``MetricState.fields``). Regenerate it only for a deliberate format change:
``python -m tests.test_metric_state_format --write``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import equicore  # noqa: F401  (registrations)
from equicore.metrics import MetricState, merge_all, state_from_dict
from equicore.registry import METRICS, accepted_params

FIXTURE = Path(__file__).parent / "fixtures" / "metric_states_v1.json"
NUM_CLASSES = 3
IGNORE = 255


def _mask(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _instance_batch(first_id: int) -> dict[str, Any]:
    """Two 8x8 images: ground-truth instances and detections that overlap them partly."""
    labels, preds = [], []
    for k in range(2):
        image_id = first_id + k
        gt = torch.stack([_mask(8, 8, 0, 0, 4, 4 + k), _mask(8, 8, 4, 3, 8, 8)])
        labels.append({"masks": gt, "labels": torch.tensor([1, 2]), "image_id": image_id})
        det = torch.stack([_mask(8, 8, 0, 0, 4, 5), _mask(8, 8, 5, 3, 8, 7), _mask(8, 8, 0, 5, 3, 8)])
        scores = torch.tensor([0.9, 0.75 - 0.1 * k, 0.3])
        preds.append({"masks": det, "scores": scores, "labels": torch.tensor([1, 2, 2])})
    return {"preds": preds, "labels": labels}


def _dense_batch(seed: int, segmentation: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    shape = (5, 4, 3) if segmentation else (7,)
    labels = torch.randint(0, NUM_CLASSES, shape, generator=g)
    if segmentation:
        labels = labels.masked_fill(torch.rand(shape, generator=g) < 0.2, IGNORE)
    preds = torch.randint(0, NUM_CLASSES, shape, generator=g)
    targets = torch.randint(0, NUM_CLASSES, shape, generator=g)
    scores = torch.rand(shape[0], generator=g, dtype=torch.float64) * 2 - 1
    return {"preds": preds, "labels": labels, "attack_targets": targets, "scores": scores}


def _batches(name: str, shard: int) -> list[dict[str, Any]]:
    tasks = METRICS.meta(name).get("tasks", ())
    if "instance" in tasks and "classification" not in tasks:
        return [_instance_batch(100 * shard + 2 * i) for i in range(2)]
    segmentation = "segmentation" in tasks and "classification" not in tasks
    return [_dense_batch(10 * shard + i, segmentation) for i in range(2)]


def _build(name: str) -> MetricState:
    accepted = accepted_params(METRICS.get(name)) or set()
    return METRICS.build(name, **({"num_classes": NUM_CLASSES} if "num_classes" in accepted else {}))


def updated_state(name: str, shard: int) -> MetricState:
    state = _build(name)
    for batch in _batches(name, shard):
        state.update(batch)
    return state


def current_dicts() -> dict[str, dict[str, Any]]:
    return {
        name: {
            "single": updated_state(name, 0).to_dict(),
            "merged": merge_all([updated_state(name, 0), updated_state(name, 1)]).to_dict(),
        }
        for name in METRICS.names()
    }


def _same_numbers(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


@pytest.fixture(scope="module")
def recorded() -> dict[str, dict[str, Any]]:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_every_registered_metric_has_a_recorded_format(recorded) -> None:
    assert sorted(recorded) == METRICS.names(), "add the new metric to the fixture (see the module docstring)"


@pytest.mark.parametrize("name", METRICS.names())
@pytest.mark.parametrize("which", ["single", "merged"])
def test_to_dict_writes_the_recorded_format(name: str, which: str, recorded) -> None:
    state = updated_state(name, 0)
    if which == "merged":
        state = merge_all([state, updated_state(name, 1)])
    written = state.to_dict()
    assert written == recorded[name][which]
    # Key order too: the dict is written to JSON and parquet metadata as it comes.
    assert json.dumps(written) == json.dumps(recorded[name][which])


@pytest.mark.parametrize("name", METRICS.names())
@pytest.mark.parametrize("which", ["single", "merged"])
def test_recorded_dicts_read_back_to_the_same_state(name: str, which: str, recorded) -> None:
    data = recorded[name][which]
    state = state_from_dict(data)
    assert type(state) is METRICS.get(name)
    assert json.dumps(state.to_dict()) == json.dumps(data)
    original = updated_state(name, 0)
    if which == "merged":
        original = merge_all([original, updated_state(name, 1)])
    assert _same_numbers(state.compute(), original.compute())
    assert state.n_samples == original.n_samples
    # A state read back merges like the one it was written from.
    again = state.merge(updated_state(name, 2)).to_dict()
    assert again == original.merge(updated_state(name, 2)).to_dict()


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_metric_state_format --write")
    FIXTURE.write_text(json.dumps(current_dicts(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE}")
